"""ebsqs.payload: compression, thresholds, the claim-check pointer and what a worker refuses.

Pure logic runs without S3. Where S3 is touched it is real: fauxqs's S3 on 127.0.0.1 (the same
endpoint as its SQS, reached through ``AWS_ENDPOINT_URL_S3``). S3 failures no emulator produces
on demand (throttling, a 503, a refusal) are answered in-process by botocore's ``before-send``
hook, as in tests/integration/test_sqs_broker.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import re
import tracemalloc
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.compat import HTTPHeaders
from botocore.config import Config
from structlog.testing import capture_logs

from ebsqs.brokers.base import BodyLimit, OutgoingMessage, ReceivedMessage
from ebsqs.brokers.checks import message_bytes
from ebsqs.config import Settings
from ebsqs.errors import EnvelopeError, MessageTooLargeError
from ebsqs.payload import (
    COMPRESSED_PREFIX,
    DIGEST_ATTRIBUTE,
    LEGACY_POINTER_CLASS,
    LEGACY_SIZE_ATTRIBUTE,
    POINTER_CLASS,
    SIGNATURE_ATTRIBUTE,
    SIZE_ATTRIBUTE,
    ObjectRef,
    Packed,
    PayloadError,
    Payloads,
    PayloadUnavailable,
    is_pointer,
)
from tests import servers

pytestmark = pytest.mark.timeout(30)

LIMIT = BodyLimit(1024 * 1024, "the queue's MaximumMessageSize")
BUCKET = "ebsqs-payloads-unit"
#: No retries: a crafted failure is answered once, and S3 down fails at once.
ONE_ATTEMPT = Config(retries={"mode": "standard", "total_max_attempts": 1})


def settings(**changes: Any) -> Settings:
    return Settings().replace(**changes)


def received(packed: Packed, queue: str = "q") -> ReceivedMessage:
    """The message a worker would receive for ``packed`` (Number attributes arrive as text)."""
    return ReceivedMessage(
        queue=queue,
        message_id=uuid.uuid4().hex,
        receipt="r",
        body=packed.body,
        attributes={name: str(value) for name, value in packed.attributes.items()},
    )


def message(body: str, **attributes: str) -> ReceivedMessage:
    return ReceivedMessage(queue="q", message_id="m", receipt="r", body=body, attributes=attributes)


def pointer(bucket: str, key: str, cls: str = POINTER_CLASS) -> str:
    return json.dumps([cls, {"s3BucketName": bucket, "s3Key": key}])


def text_body(size: int) -> str:
    """An envelope-like JSON body of ``size`` bytes that compresses well."""
    filler = "lorem ipsum dolor sit amet " * (size // 27 + 1)
    head = '{"v":1,"task":"t","args":["'
    return head + filler[: size - len(head) - 3] + '"]}'


def noise(size: int) -> str:
    """ASCII text of ``size`` characters that zlib cannot shrink below its base64 form."""
    return base64.b64encode(random.randbytes(size))[:size].decode()


# -- S3 on fauxqs ------------------------------------------------------------------------


@pytest.fixture
def s3_env(fauxqs_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """boto3 pointed at fauxqs (SQS and S3) for this test; the endpoint."""
    servers.apply_sqs_env(monkeypatch, fauxqs_server)
    return fauxqs_server


@pytest.fixture
def bucket(s3_env: str) -> str:
    """A fresh bucket on fauxqs's S3."""
    import boto3

    name = f"ebsqs-unit-{uuid.uuid4().hex[:16]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3(s3_env: str) -> Any:
    import boto3

    return boto3.session.Session().client("s3")


@pytest.fixture
def payloads(bucket: str) -> Iterator[Payloads]:
    made = Payloads(settings(large_payload_bucket=bucket, large_payload_over=1000))
    yield made
    made.close()


class S3Hook:
    """Answers one S3 operation with a crafted response, recording each request's headers."""

    def __init__(self, payloads: Payloads, operation: str, response: AWSResponse | None) -> None:
        self.headers: list[dict[str, str]] = []
        self._response = response
        # The stubs type handlers as returning None; a before-send handler may return a response.
        payloads.client.meta.events.register(f"before-send.s3.{operation}", self)  # type: ignore[arg-type]

    def __call__(self, request: AWSPreparedRequest, **_: object) -> AWSResponse | None:
        self.headers.append({k: _text(v) for k, v in request.headers.items()})
        return self._response


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Raw:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: object) -> Iterator[bytes]:
        yield self._data


def s3_error(code: str, status: int) -> AWSResponse:
    body = f"<Error><Code>{code}</Code><Message>crafted</Message></Error>".encode()
    head = HTTPHeaders()
    head["Content-Type"] = "application/xml"
    return AWSResponse("http://crafted.invalid/", status, head, _Raw(body))


# -- what passes through ------------------------------------------------------------------


def test_a_small_body_passes_through_untouched() -> None:
    body = text_body(5000)
    packed = Payloads(settings(large_payload_bucket=BUCKET)).pack(body, LIMIT, task="t", queue="q")
    assert packed.body is body
    assert packed.attributes == {} and packed.stored is None


def test_plain_bodies_unpack_unchanged_without_a_client() -> None:
    payloads = Payloads(settings(large_payload_bucket=BUCKET, signing_keys=("k",)))
    for body in ('{"v":1,"task":"t"}', '{"func":"a.b"}', "[1, 2]", "", "not json"):
        text, ref = payloads.unpack(message(body, **{SIZE_ATTRIBUTE: "12"}))
        assert text is body and ref is None
    assert payloads._client is None


def test_is_pointer_is_a_prefix_check_of_both_class_names() -> None:
    assert is_pointer(pointer("b", "k"))  # the Python Extended Client's json.dumps spacing
    assert is_pointer(pointer("b", "k", LEGACY_POINTER_CLASS))
    assert is_pointer(f'["{POINTER_CLASS}",{{"s3BucketName":"b","s3Key":"k"}}]')  # Java's
    assert not is_pointer('{"v":1}')
    assert not is_pointer(f'{{"note":"{POINTER_CLASS}"}}')
    assert not is_pointer(f'["other", "{POINTER_CLASS}"]')
    assert not is_pointer(f'["{POINTER_CLASS}x", {{}}]')
    assert not is_pointer("")


# -- compression --------------------------------------------------------------------------


def test_compression_over_the_threshold_round_trips_in_its_documented_form() -> None:
    body = text_body(20_000).replace("lorem", "lörem €")
    payloads = Payloads(settings(compress_over=1000))
    packed = payloads.pack(body, LIMIT, task="t", queue="q")
    assert packed.body.startswith("ebsqs-z1:") and packed.stored is None
    assert len(packed.body) < len(body) // 5
    # The format is plain stdlib: prefix, base64, zlib of the UTF-8 bytes.
    raw = zlib.decompress(base64.b64decode(packed.body.removeprefix("ebsqs-z1:"), validate=True))
    assert raw == body.encode()
    assert payloads.unpack(received(packed)) == (body, None)


def test_compression_under_its_threshold_or_not_helping_leaves_the_body() -> None:
    payloads = Payloads(settings(compress_over=1000))
    small = text_body(1000)
    assert payloads.pack(small, LIMIT, task="t", queue="q").body is small
    random_text = noise(5000)
    assert payloads.pack(random_text, LIMIT, task="t", queue="q").body is random_text


def test_compression_brings_a_body_under_the_limit_without_s3() -> None:
    body = text_body(3 * 1024 * 1024)
    with pytest.raises(MessageTooLargeError):
        Payloads(settings()).pack(body, LIMIT, task="t", queue="q")
    packed = Payloads(settings(compress_over=64 * 1024)).pack(body, LIMIT, task="t", queue="q")
    assert packed.stored is None and len(packed.body) <= LIMIT.bytes


def test_a_compression_bomb_is_refused_without_inflating_it() -> None:
    cap = 1024 * 1024
    bomb = COMPRESSED_PREFIX + base64.b64encode(zlib.compress(b"\0" * (64 * cap), 9)).decode()
    payloads = Payloads(settings(max_payload_bytes=cap))
    tracemalloc.start()
    try:
        with pytest.raises(PayloadError, match="max_payload_bytes"):
            payloads.unpack(message(bomb))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * cap  # the 64 MiB it holds were never made


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (COMPRESSED_PREFIX + "not base64!", "not base64"),
        (COMPRESSED_PREFIX + base64.b64encode(b"plain bytes").decode(), "not zlib"),
        (COMPRESSED_PREFIX + base64.b64encode(zlib.compress(b"x" * 500)[:-6]).decode(), "trunc"),
        (COMPRESSED_PREFIX + base64.b64encode(zlib.compress(b"x") + b"junk").decode(), "trail"),
        (COMPRESSED_PREFIX + base64.b64encode(zlib.compress(b"\xff\xfe")).decode(), "UTF-8"),
    ],
)
def test_bad_compressed_bodies_are_payload_errors(body: str, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason) as caught:
        Payloads(settings()).unpack(message(body))
    assert isinstance(caught.value, EnvelopeError)  # dead-lettered like any bad body


# -- thresholds and sizes -----------------------------------------------------------------


def test_over_the_limit_with_no_bucket_names_size_limit_source_and_the_fix() -> None:
    body = text_body(LIMIT.bytes + 1)
    with pytest.raises(MessageTooLargeError) as caught:
        Payloads(settings()).pack(body, LIMIT, task="app.big", queue="q")
    error = caught.value
    assert (error.size, error.limit, error.source) == (LIMIT.bytes + 1, LIMIT.bytes, LIMIT.source)
    assert "app.big" in str(error) and "large_payload_bucket" in str(error)


def test_at_the_limit_passes_and_large_payload_over_alone_changes_nothing() -> None:
    body = text_body(LIMIT.bytes)
    payloads = Payloads(settings(large_payload_over=10))  # no bucket: nowhere to offload
    assert payloads.pack(body, LIMIT, task="t", queue="q").body is body


def test_a_limit_too_small_even_for_the_pointer_fails_before_writing() -> None:
    payloads = Payloads(settings(large_payload_bucket=BUCKET, signing_keys=("k",)))
    with pytest.raises(MessageTooLargeError, match="as an S3 pointer") as caught:
        payloads.pack(text_body(1000), BodyLimit(300, "test"), task="t", queue="q")
    # Pointer body plus its three attributes (name, type, value each) is what SQS counts.
    assert caught.value.size > 300
    assert payloads._client is None  # nothing was written


def test_a_body_over_max_payload_bytes_fails_at_pack_before_writing() -> None:
    payloads = Payloads(
        settings(large_payload_bucket=BUCKET, large_payload_over=1000, max_payload_bytes=100_000)
    )
    with pytest.raises(MessageTooLargeError, match="EBSQS_MAX_PAYLOAD_BYTES") as caught:
        payloads.pack(text_body(200_000), LIMIT, task="t", queue="q")
    assert caught.value.limit == 100_000
    assert "large_payload_bucket to send" not in str(caught.value)
    assert payloads._client is None


@pytest.mark.fauxqs
def test_offloaded_message_attributes_are_counted_and_typed(payloads: Payloads, s3: Any) -> None:
    body = text_body(5000) + "€"
    packed = payloads.pack(body, LIMIT, task="t", queue="prod-emails")
    assert packed.stored is not None
    assert re.fullmatch(r"ebsqs-payloads/prod-emails/[0-9a-f]{32}", packed.stored.key)
    assert packed.attributes[SIZE_ATTRIBUTE] == len(body.encode())  # an int: SQS Number
    assert packed.attributes[DIGEST_ATTRIBUTE] == hashlib.sha256(body.encode()).hexdigest()
    assert SIGNATURE_ATTRIBUTE not in packed.attributes  # no signing keys
    assert json.loads(packed.body) == [
        POINTER_CLASS,
        {"s3BucketName": packed.stored.bucket, "s3Key": packed.stored.key},
    ]
    outgoing = OutgoingMessage(
        packed.body, attributes={k: str(v) for k, v in packed.attributes.items()}
    )
    assert message_bytes(outgoing) < 300
    stored = s3.get_object(Bucket=packed.stored.bucket, Key=packed.stored.key)["Body"].read()
    assert stored == body.encode()
    assert payloads.unpack(received(packed, "prod-emails")) == (body, packed.stored)


@pytest.mark.fauxqs
def test_the_threshold_is_the_smaller_of_large_payload_over_and_the_limit(bucket: str) -> None:
    payloads = Payloads(settings(large_payload_bucket=bucket, large_payload_over=2000))
    assert payloads.pack(text_body(2000), LIMIT, task="t", queue="q").stored is None
    assert payloads.pack(text_body(2001), LIMIT, task="t", queue="q").stored is not None
    generous = Payloads(settings(large_payload_bucket=bucket, large_payload_over=10**9))
    small_limit = BodyLimit(4000, "test")
    assert generous.pack(text_body(4000), small_limit, task="t", queue="q").stored is None
    assert generous.pack(text_body(4001), small_limit, task="t", queue="q").stored is not None
    default = Payloads(settings(large_payload_bucket=bucket))
    assert default.pack(text_body(LIMIT.bytes), LIMIT, task="t", queue="q").stored is None


@pytest.mark.fauxqs
def test_a_compressed_body_still_too_large_is_offloaded_compressed(bucket: str, s3: Any) -> None:
    payloads = Payloads(
        settings(large_payload_bucket=bucket, large_payload_over=1000, compress_over=1000)
    )
    body = json.dumps([random.randbytes(100_000).hex()])  # hex: zlib halves it, no more
    packed = payloads.pack(body, LIMIT, task="t", queue="q")
    assert packed.stored is not None
    stored = s3.get_object(Bucket=bucket, Key=packed.stored.key)["Body"].read()
    assert stored.startswith(b"ebsqs-z1:") and len(stored) < len(body)
    assert packed.attributes[SIZE_ATTRIBUTE] == len(stored)
    assert payloads.unpack(received(packed)) == (body, packed.stored)


# -- hostile pointers ---------------------------------------------------------------------


def test_a_pointer_to_another_bucket_is_refused_unread() -> None:
    payloads = Payloads(settings(large_payload_bucket=BUCKET))
    with pytest.raises(PayloadError, match=r"'someone-elses-bucket'.*large_payload_bucket"):
        payloads.unpack(message(pointer("someone-elses-bucket", "secrets.txt")))
    assert payloads._client is None


def test_a_pointer_to_a_worker_without_a_bucket_says_which_setting() -> None:
    payloads = Payloads(settings())
    with pytest.raises(PayloadError, match="EBSQS_LARGE_PAYLOAD_BUCKET=theirs"):
        payloads.unpack(message(pointer("theirs", "k"), **{SIZE_ATTRIBUTE: "10"}))
    assert payloads._client is None


@pytest.mark.parametrize(
    "body",
    [
        f'["{POINTER_CLASS}", {{"s3BucketName": "{BUCKET}"',  # cut off
        f'["{POINTER_CLASS}"]',
        f'["{POINTER_CLASS}", ["{BUCKET}", "k"]]',
        f'["{POINTER_CLASS}", {{"s3BucketName": "{BUCKET}"}}]',
        f'["{POINTER_CLASS}", {{"s3BucketName": "{BUCKET}", "s3Key": ""}}]',
        f'["{POINTER_CLASS}", {{"s3BucketName": "{BUCKET}", "s3Key": 7}}]',
        f'["{POINTER_CLASS}", {{"s3BucketName": "{BUCKET}", "s3Key": "{"k" * 1025}"}}]',
        f'["{POINTER_CLASS}", {{"s3BucketName": "{BUCKET}", "s3Key": "k"}}, 3]',
        f'["{POINTER_CLASS}", {{"s3BucketName": "{BUCKET}", "s3Key": "k", "x": "{"y" * 9000}"}}]',
    ],
)
def test_malformed_pointers_are_payload_errors_without_s3(body: str) -> None:
    payloads = Payloads(settings(large_payload_bucket=BUCKET))
    assert is_pointer(body)
    with pytest.raises(PayloadError):
        payloads.unpack(message(body))
    assert payloads._client is None


def test_an_announced_size_over_the_cap_is_refused_before_fetching() -> None:
    payloads = Payloads(settings(large_payload_bucket=BUCKET, max_payload_bytes=1000))
    for name in (SIZE_ATTRIBUTE, LEGACY_SIZE_ATTRIBUTE):
        with pytest.raises(PayloadError, match="1001 bytes, over max_payload_bytes"):
            payloads.unpack(message(pointer(BUCKET, "k"), **{name: "1001"}))
    assert payloads._client is None


@pytest.mark.fauxqs
def test_an_object_over_the_cap_is_refused_by_its_length(bucket: str, s3: Any) -> None:
    s3.put_object(Bucket=bucket, Key="big", Body=b"x" * 5000)
    payloads = Payloads(settings(large_payload_bucket=bucket, max_payload_bytes=4096))
    hook = S3Hook(payloads, "GetObject", None)
    with pytest.raises(PayloadError, match="5000 bytes, over max_payload_bytes"):
        payloads.unpack(message(pointer(bucket, "big")))  # no size attribute: the Extended
    assert hook.headers[0]["Range"] == "bytes=0-4096"  # at most cap + 1 bytes were asked for


@pytest.mark.fauxqs
def test_an_object_at_the_cap_is_read(bucket: str, s3: Any) -> None:
    s3.put_object(Bucket=bucket, Key="edge", Body=b"y" * 4096)
    payloads = Payloads(settings(large_payload_bucket=bucket, max_payload_bytes=4096))
    text, ref = payloads.unpack(message(pointer(bucket, "edge")))
    assert text == "y" * 4096 and ref == ObjectRef(bucket, "edge")


@pytest.mark.fauxqs
def test_a_missing_object_is_a_payload_error(payloads: Payloads, bucket: str) -> None:
    with pytest.raises(PayloadError, match="does not exist"):
        payloads.unpack(message(pointer(bucket, "ebsqs-payloads/q/gone")))


@pytest.mark.fauxqs
def test_a_tampered_object_fails_its_digest(payloads: Payloads, bucket: str, s3: Any) -> None:
    packed = payloads.pack(text_body(5000), LIMIT, task="t", queue="q")
    assert packed.stored is not None
    s3.put_object(Bucket=bucket, Key=packed.stored.key, Body=b'{"v":1,"task":"evil"}')
    with pytest.raises(PayloadError, match="SHA-256"):
        payloads.unpack(received(packed))


@pytest.mark.fauxqs
def test_an_object_that_is_not_utf8_is_a_payload_error(bucket: str, s3: Any) -> None:
    s3.put_object(Bucket=bucket, Key="bin", Body=b"\xff\xfe\x00")
    payloads = Payloads(settings(large_payload_bucket=bucket))
    with pytest.raises(PayloadError, match="not UTF-8"):
        payloads.unpack(message(pointer(bucket, "bin")))


@pytest.mark.fauxqs
def test_a_compressed_object_is_inflated_under_the_same_cap(bucket: str, s3: Any) -> None:
    bomb = COMPRESSED_PREFIX + base64.b64encode(zlib.compress(b"{" * 10_000_000, 9)).decode()
    s3.put_object(Bucket=bucket, Key="bomb", Body=bomb.encode())
    payloads = Payloads(settings(large_payload_bucket=bucket, max_payload_bytes=1_000_000))
    with pytest.raises(PayloadError, match="inflates past max_payload_bytes"):
        payloads.unpack(message(pointer(bucket, "bomb")))


# -- signatures ---------------------------------------------------------------------------


def test_with_signing_keys_an_unsigned_pointer_is_refused_unread() -> None:
    payloads = Payloads(settings(large_payload_bucket=BUCKET, signing_keys=("k1",)))
    digest = hashlib.sha256(b"x").hexdigest()
    with pytest.raises(PayloadError, match="ebsqs-payload-signature"):
        payloads.unpack(message(pointer(BUCKET, "k"), **{DIGEST_ATTRIBUTE: digest}))
    with pytest.raises(PayloadError, match="requires signed payloads"):
        payloads.unpack(message(pointer(BUCKET, "k")))  # as the Extended Client sends
    assert payloads._client is None


def test_a_signature_over_another_object_is_refused_unread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    payloads = Payloads(settings(large_payload_bucket=BUCKET, signing_keys=("k1",)))
    fetched: list[ObjectRef] = []

    def fetch(ref: ObjectRef) -> bytes:
        fetched.append(ref)
        return b"x"

    monkeypatch.setattr(payloads, "_fetch", fetch)
    digest = hashlib.sha256(b"x").hexdigest()
    text = f"ebsqs-payload-1\n{BUCKET}\nother-key\n{digest}".encode()
    attributes = {
        DIGEST_ATTRIBUTE: digest,
        SIGNATURE_ATTRIBUTE: hmac.new(b"k1", text, hashlib.sha256).hexdigest(),
    }
    with pytest.raises(PayloadError, match="matches none"):
        payloads.unpack(message(pointer(BUCKET, "k"), **attributes))
    assert fetched == []
    # The same attributes, on the object they were made for, pass: the documented format.
    assert payloads.unpack(message(pointer(BUCKET, "other-key"), **attributes))[0] == "x"
    assert fetched == [ObjectRef(BUCKET, "other-key")]


@pytest.mark.fauxqs
def test_signed_payloads_verify_across_a_key_rotation(bucket: str) -> None:
    old = Payloads(
        settings(large_payload_bucket=bucket, large_payload_over=100, signing_keys=("old",))
    )
    packed = old.pack(text_body(5000), LIMIT, task="t", queue="q")
    assert isinstance(packed.attributes[SIGNATURE_ATTRIBUTE], str)
    rotated = Payloads(settings(large_payload_bucket=bucket, signing_keys=("new", "old")))
    body, ref = rotated.unpack(received(packed))
    assert body == text_body(5000) and ref == packed.stored
    retired = Payloads(settings(large_payload_bucket=bucket, signing_keys=("new",)))
    with pytest.raises(PayloadError, match="matches none"):
        retired.unpack(received(packed))
    unsigned_worker = Payloads(settings(large_payload_bucket=bucket))
    assert unsigned_worker.unpack(received(packed))[0] == text_body(5000)


@pytest.mark.fauxqs
def test_the_first_key_signs(bucket: str) -> None:
    rotated = Payloads(
        settings(large_payload_bucket=bucket, large_payload_over=100, signing_keys=("new", "old"))
    )
    packed = rotated.pack(text_body(5000), LIMIT, task="t", queue="q")
    assert packed.stored is not None
    digest = packed.attributes[DIGEST_ATTRIBUTE]
    text = f"ebsqs-payload-1\n{bucket}\n{packed.stored.key}\n{digest}".encode()
    assert packed.attributes[SIGNATURE_ATTRIBUTE] == hmac.new(b"new", text, "sha256").hexdigest()


# -- S3 failing ---------------------------------------------------------------------------


@pytest.mark.fauxqs
@pytest.mark.parametrize(("code", "status"), [("SlowDown", 503), ("InternalError", 500)])
def test_throttling_and_server_errors_are_transient(bucket: str, code: str, status: int) -> None:
    payloads = Payloads(settings(large_payload_bucket=bucket), config=ONE_ATTEMPT)
    hook = S3Hook(payloads, "GetObject", s3_error(code, status))
    with pytest.raises(PayloadUnavailable, match=code) as caught:
        payloads.unpack(message(pointer(bucket, "k")))
    assert len(hook.headers) == 1
    assert not isinstance(caught.value, EnvelopeError)  # released, never dead-lettered


@pytest.mark.fauxqs
def test_access_denied_is_transient_and_names_the_permission(bucket: str) -> None:
    payloads = Payloads(settings(large_payload_bucket=bucket), config=ONE_ATTEMPT)
    S3Hook(payloads, "GetObject", s3_error("AccessDenied", 403))
    with pytest.raises(PayloadUnavailable, match=f"s3:GetObject on arn:aws:s3:::{bucket}/"):
        payloads.unpack(message(pointer(bucket, "k")))


@pytest.mark.fauxqs
def test_a_failed_put_is_a_clear_error_at_pack(bucket: str) -> None:
    payloads = Payloads(settings(large_payload_bucket=bucket, large_payload_over=100))
    S3Hook(payloads, "PutObject", s3_error("NoSuchBucket", 404))
    with pytest.raises(PayloadUnavailable, match=f"create bucket '{bucket}'"):
        payloads.pack(text_body(5000), LIMIT, task="t", queue="q")


def test_discard_failures_are_logged_and_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{servers.free_port()}"
    servers.apply_sqs_env(monkeypatch, endpoint)
    payloads = Payloads(settings(large_payload_bucket=BUCKET), config=ONE_ATTEMPT)
    with capture_logs() as logs:
        payloads.discard(ObjectRef(BUCKET, "ebsqs-payloads/q/abc"))
    [event] = [e for e in logs if e["event"] == "payload_discard_failed"]
    assert event["bucket"] == BUCKET and event["key"] == "ebsqs-payloads/q/abc"
    assert endpoint in event["error"]


@pytest.mark.fauxqs
def test_discard_deletes_the_object(payloads: Payloads, bucket: str, s3: Any) -> None:
    packed = payloads.pack(text_body(5000), LIMIT, task="t", queue="q")
    assert packed.stored is not None
    payloads.discard(packed.stored)
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    payloads.discard(packed.stored)  # twice is fine: S3 deletes are idempotent


# -- the client ---------------------------------------------------------------------------


def test_the_client_is_made_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    servers.apply_sqs_env(monkeypatch, f"http://127.0.0.1:{servers.free_port()}")
    payloads = Payloads(settings(large_payload_bucket=BUCKET))
    first = payloads.client
    assert payloads.client is first
    assert first.meta.endpoint_url == os.environ["AWS_ENDPOINT_URL_S3"]
    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)  # as seen in a forked child
    assert payloads.client is not first
    payloads.close()
