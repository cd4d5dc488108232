"""Large bodies: compression, and an S3 claim-check in the SQS Extended Client's wire format.

A producer calls :meth:`Payloads.pack` on each encoded body before it is sent, and a worker
:meth:`Payloads.unpack` on each received message before it is decoded. Bodies under the
thresholds pass both ways untouched, at the cost of a size count and a prefix check.

Three forms travel:

- **plain**: the body as encoded (an ebsqs envelope, a django-eb-sqs body).
- **compressed**: ``ebsqs-z1:`` followed by the standard base64 (with padding) of the zlib
  stream (RFC 1950) of the body's UTF-8 bytes. Written when ``compress_over`` is set, the body
  is larger than that, and the result is smaller than the body. No JSON body starts with
  ``e``, so the prefix cannot be mistaken for one.
- **pointer**: the body is stored as an S3 object (exactly the text that would have been sent,
  so compressed when it was compressed) and the message carries AWS's pointer instead::

      ["software.amazon.payloadoffloading.PayloadS3Pointer",{"s3BucketName":"b","s3Key":"k"}]

  with the message attribute ``ExtendedPayloadSize`` (``Number``: the object's size in bytes).
  That is what the SQS Extended Client (Java, and the ``amazon-sqs-extended-client`` Python
  package) writes and reads, so either side may be ebsqs. Its older versions' class name
  ``com.amazon.sqs.javamessaging.MessageS3Pointer`` and attribute ``SQSLargePayloadSize`` are
  read too. ebsqs writes objects under ``<large_payload_prefix><queue>/<32 hex digits>`` and
  adds no key to the pointer object (the Java library may refuse unknown properties); its
  extras are message attributes: ``ebsqs-payload-sha256`` (hex SHA-256 of the object's bytes)
  and, when signing keys are set, ``ebsqs-payload-signature``: the hex HMAC-SHA256, with the
  first signing key, of the UTF-8 text ``ebsqs-payload-1\\n<bucket>\\n<key>\\n<sha256 hex>``
  (a bucket name holds no newline and the digest is 64 hex digits, so the text is unambiguous).

A worker reads a pointer only into ``large_payload_bucket`` (a hostile message must not make it
read other buckets with its credentials), and with signing keys set only with a valid
signature (so it never fetches an object a producer did not name); it refuses objects over
``max_payload_bytes`` before reading them, checks the digest when the message carries one
(messages from the Extended Client do not), and inflates compressed objects with the same cap.
Those refusals raise :class:`PayloadError` (dead-letter); S3 failing raises
:class:`PayloadUnavailable` (release, try again).

Interoperability: the Extended Client does not inflate ``ebsqs-z1:`` bodies, so leave
``compress_over`` unset while its consumers read ebsqs's queues; and a worker with signing keys
refuses its messages, which carry no signature.

The S3 client is made lazily, once per process (and again in a forked child), from boto3's
standard chain; ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``) points it at another endpoint.
boto3 and botocore are imported only when S3 is first needed, so ``import ebsqs`` stays light.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import threading
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ebsqs.brokers.base import BodyLimit, OutgoingMessage, ReceivedMessage
from ebsqs.brokers.checks import message_bytes, utf8_size
from ebsqs.config import Settings
from ebsqs.errors import BrokerError, EbsqsError, EnvelopeError, MessageTooLargeError

if TYPE_CHECKING:
    from botocore.config import Config
    from botocore.exceptions import ClientError
    from mypy_boto3_s3 import S3Client

__all__ = [
    "COMPRESSED_PREFIX",
    "DIGEST_ATTRIBUTE",
    "LEGACY_POINTER_CLASS",
    "LEGACY_SIZE_ATTRIBUTE",
    "POINTER_CLASS",
    "SIGNATURE_ATTRIBUTE",
    "SIZE_ATTRIBUTE",
    "ObjectRef",
    "Packed",
    "PayloadError",
    "PayloadUnavailable",
    "Payloads",
    "is_pointer",
]

T = TypeVar("T")

COMPRESSED_PREFIX = "ebsqs-z1:"
POINTER_CLASS = "software.amazon.payloadoffloading.PayloadS3Pointer"
LEGACY_POINTER_CLASS = "com.amazon.sqs.javamessaging.MessageS3Pointer"
SIZE_ATTRIBUTE = "ExtendedPayloadSize"
LEGACY_SIZE_ATTRIBUTE = "SQSLargePayloadSize"
DIGEST_ATTRIBUTE = "ebsqs-payload-sha256"
SIGNATURE_ATTRIBUTE = "ebsqs-payload-signature"

_SIGNED_TEXT_VERSION = "ebsqs-payload-1"
#: A pointer body is a bucket name (63 bytes) and a key (1,024 bytes, up to 6 characters each
#: when JSON escapes them) in a few dozen characters of JSON: anything longer is not one.
_MAX_POINTER_CHARS = 8 * 1024
_MAX_KEY_BYTES = 1024
#: A pointer's start; ``re.match`` anchors it, so an ordinary body fails at its first character.
_POINTER_START = re.compile(
    r'\[\s*"(?:' + re.escape(POINTER_CLASS) + "|" + re.escape(LEGACY_POINTER_CLASS) + ')"'
)
#: S3 error codes meaning the object is not there: the message can never be run.
_MISSING = frozenset({"NoSuchKey", "NotFound", "404"})
#: A ranged read of an empty object (the Extended Client refuses to write one; ebsqs never does).
_EMPTY = frozenset({"InvalidRange", "416"})
_DENIED = frozenset({"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "403"})
_SIGNATURE_DENIED = frozenset({"SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"})


class PayloadError(EnvelopeError):
    """A message whose payload cannot be trusted or read, whatever is retried: not a valid
    pointer, a bucket other than ``large_payload_bucket``, a missing object, a digest or
    signature that does not match, a payload over ``max_payload_bytes``, or bad compressed
    data. Dead-lettered with this reason."""


class PayloadUnavailable(BrokerError):
    """S3 failed (unreachable, throttled, a server error, refused credentials or permissions):
    the message is fine, and is released to be tried again, never dead-lettered for this."""


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """An S3 object holding an offloaded payload."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True, slots=True)
class Packed:
    """A body ready to send.

    Attributes:
        body: the text to send: the body itself, its compressed form, or a pointer.
        attributes: message attributes to send with it (an ``int`` is SQS type ``Number``);
            empty unless the body was offloaded.
        stored: the object written to S3, or None. The producer deletes it with
            :meth:`Payloads.discard` if the send fails.
    """

    body: str
    attributes: dict[str, str | int]
    stored: ObjectRef | None


def is_pointer(body: str) -> bool:
    """Whether ``body`` is a claim-check pointer (either class name): a prefix check, no parse."""
    return body[:1] == "[" and _POINTER_START.match(body) is not None


class Payloads:
    """Packs bodies before they are sent and unpacks them after they are received.

    Args:
        settings: ``large_payload_bucket``, ``large_payload_over``, ``large_payload_prefix``,
            ``compress_over``, ``max_payload_bytes`` and ``signing_keys`` are read.
        config: botocore settings merged over the defaults (short timeouts, three attempts),
            e.g. a proxy.

    Thread-safe: one S3 client per process is shared by every thread.
    """

    def __init__(self, settings: Settings, *, config: Config | None = None) -> None:
        self.settings = settings
        self._config = config
        self._lock = threading.Lock()
        self._lock_pid = os.getpid()
        self._client: S3Client | None = None
        self._client_pid = 0

    # -- sending ---------------------------------------------------------------------------

    def pack(self, body: str, limit: BodyLimit, *, task: str, queue: str) -> Packed:
        """The message to send for ``body`` on ``queue``.

        Compressed when ``compress_over`` is set and passed (and compression helps); offloaded
        to S3 when it is still over the threshold (``large_payload_over``, at most the queue's
        limit) and a bucket is set. Everything that can fail is checked before the object is
        written.

        Args:
            body: the encoded body.
            limit: the queue's largest message (body and attributes).
            task: the task's name, for errors.
            queue: the (physical) queue's name: the object key's folder.

        Raises:
            MessageTooLargeError: the body is over the queue's limit and no bucket is set, or
                over ``max_payload_bytes`` (which workers would refuse).
            PayloadUnavailable: S3 refused or could not be reached; nothing was sent.
        """
        settings = self.settings
        size = utf8_size(body)
        if settings.compress_over is not None and size > settings.compress_over:
            self._check_payload_size(size, task)
            body, size = _compressed_if_smaller(body, size)
        threshold = limit.bytes
        bucket = settings.large_payload_bucket
        if bucket is not None and settings.large_payload_over is not None:
            threshold = min(threshold, settings.large_payload_over)
        if size <= threshold:
            return Packed(body, {}, None)
        if bucket is None:
            raise MessageTooLargeError(size, limit.bytes, task, limit.source)
        self._check_payload_size(size, task)
        return self._offload(body, bucket, limit, task=task, queue=queue)

    def _check_payload_size(self, size: int, task: str) -> None:
        cap = self.settings.max_payload_bytes
        if size > cap:
            error = MessageTooLargeError(size, cap, task, "max_payload_bytes")
            error.args = (
                f"message for task {task!r} is {size} bytes, over max_payload_bytes ({cap}), "
                "the largest payload a worker fetches or inflates; raise EBSQS_MAX_PAYLOAD_BYTES "
                "on producers and workers alike, or pass a reference (an S3 key, a database id) "
                "instead of the data",
            )
            raise error

    def _offload(
        self, body: str, bucket: str, limit: BodyLimit, *, task: str, queue: str
    ) -> Packed:
        data = body.encode("utf-8")
        digest = hashlib.sha256(data).hexdigest()
        ref = ObjectRef(bucket, f"{self.settings.large_payload_prefix}{queue}/{uuid.uuid4().hex}")
        attributes: dict[str, str | int] = {SIZE_ATTRIBUTE: len(data), DIGEST_ATTRIBUTE: digest}
        keys = self.settings.signing_keys
        if keys:
            attributes[SIGNATURE_ATTRIBUTE] = _signature(ref, digest, keys[0])
        pointer = json.dumps(
            [POINTER_CLASS, {"s3BucketName": ref.bucket, "s3Key": ref.key}], separators=(",", ":")
        )
        # String and Number attributes count the same (six bytes of type name): as text here.
        sent = OutgoingMessage(pointer, attributes={k: str(v) for k, v in attributes.items()})
        size = message_bytes(sent)
        if size > limit.bytes:
            raise MessageTooLargeError(size, limit.bytes, task, f"{limit.source}, as an S3 pointer")

        def put(client: S3Client) -> None:
            client.put_object(
                Bucket=ref.bucket,
                Key=ref.key,
                Body=data,
                ContentType="text/plain; charset=utf-8",
            )

        self._call("PutObject", ref, put)
        return Packed(pointer, attributes, ref)

    # -- receiving -------------------------------------------------------------------------

    def unpack(self, message: ReceivedMessage) -> tuple[str, ObjectRef | None]:
        """The body a received message carries, and the S3 object it came from (or None).

        Plain bodies come back unchanged after a prefix check; compressed ones are inflated;
        pointers are checked, fetched and verified.

        Raises:
            PayloadError: the payload cannot be trusted or read (dead-letter the message).
            PayloadUnavailable: S3 failed; release the message to be tried again.
        """
        body = message.body
        if body.startswith(COMPRESSED_PREFIX):
            return _inflate(body, self.settings.max_payload_bytes, "body"), None
        if not is_pointer(body):
            return body, None
        ref = self._allowed(_pointer_ref(body))
        attributes = message.attributes
        digest = attributes.get(DIGEST_ATTRIBUTE)
        self._check_signature(ref, digest, attributes.get(SIGNATURE_ATTRIBUTE))
        self._check_announced_size(ref, attributes)
        data = self._fetch(ref)
        if digest is not None:
            actual = hashlib.sha256(data).hexdigest()
            if not hmac.compare_digest(actual.encode(), digest.strip().lower().encode()):
                raise PayloadError(
                    f"payload {ref}: its SHA-256 is {actual}, not the {_short(digest)} the "
                    "message carries: the object was changed or replaced after it was sent"
                )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(f"payload {ref} is not UTF-8 text ({exc})") from None
        if text.startswith(COMPRESSED_PREFIX):
            text = _inflate(text, self.settings.max_payload_bytes, f"payload {ref}")
        return text, ref

    def _allowed(self, ref: ObjectRef) -> ObjectRef:
        bucket = self.settings.large_payload_bucket
        if bucket is None:
            raise PayloadError(
                f"message points to {_short(ref)}, and this worker reads no S3 payloads: set "
                f"EBSQS_LARGE_PAYLOAD_BUCKET={_short(ref.bucket)} if that bucket is yours"
            )
        if ref.bucket != bucket:
            raise PayloadError(
                f"message points to bucket {_short(ref.bucket)!r}, not large_payload_bucket "
                f"{bucket!r}: refused unread (a worker reads payloads from its own bucket only)"
            )
        return ref

    def _check_signature(self, ref: ObjectRef, digest: str | None, signature: str | None) -> None:
        keys = self.settings.signing_keys
        if not keys:
            return
        if digest is None or signature is None:
            missing = SIGNATURE_ATTRIBUTE if signature is None else DIGEST_ATTRIBUTE
            raise PayloadError(
                f"message points to {ref} without the {missing} attribute, and this worker "
                "requires signed payloads (signing_keys is set): refused unread; producers "
                "need the same signing keys (SQS Extended Client messages carry no signature)"
            )
        given = signature.strip().lower().encode()
        if not any(hmac.compare_digest(_signature(ref, digest, k).encode(), given) for k in keys):
            raise PayloadError(
                f"message points to {ref} with a signature that matches none of the accepted "
                "signing keys: refused unread"
            )

    def _check_announced_size(self, ref: ObjectRef, attributes: Mapping[str, str]) -> None:
        """Refuse, before any S3 call, a payload the message itself says is too large."""
        announced = attributes.get(SIZE_ATTRIBUTE, attributes.get(LEGACY_SIZE_ATTRIBUTE))
        try:
            size = int(announced) if announced is not None else 0
        except ValueError:
            return  # not a number: the object's own length is checked when it is fetched
        if size > self.settings.max_payload_bytes:
            raise _over_cap(ref, size, self.settings.max_payload_bytes)

    def _fetch(self, ref: ObjectRef) -> bytes:
        """The object's bytes; refused unread when it is larger than ``max_payload_bytes``."""
        cap = self.settings.max_payload_bytes

        def get(client: S3Client) -> bytes:
            # One ranged request: at most cap + 1 bytes come back, so a larger object is known
            # by its length without reading it (and nothing can swap it between two requests).
            response = client.get_object(Bucket=ref.bucket, Key=ref.key, Range=f"bytes=0-{cap}")
            stream = response["Body"]
            try:
                if response.get("ContentLength", 0) > cap:
                    raise _over_cap(ref, _total_size(response), cap)
                data = stream.read(cap + 1)
            finally:
                stream.close()
            if len(data) > cap:  # a server that ignored the range and announced no length
                raise _over_cap(ref, len(data), cap)
            return data

        return self._call("GetObject", ref, get)

    def discard(self, ref: ObjectRef) -> None:
        """Delete an offloaded payload whose message is settled (or was never sent).

        A failure is logged (``payload_discard_failed``) and swallowed: the task is done, and a
        lifecycle rule on ``large_payload_prefix`` removes what is left.
        """
        try:
            self._call(
                "DeleteObject", ref, lambda c: c.delete_object(Bucket=ref.bucket, Key=ref.key)
            )
        except PayloadUnavailable as exc:
            # Imported here, not at the top: `import ebsqs` loads no logging library.
            from ebsqs.log import get_logger

            get_logger(__name__).warning(
                "payload_discard_failed", bucket=ref.bucket, key=ref.key, error=str(exc)
            )

    # -- the client ------------------------------------------------------------------------

    @property
    def client(self) -> S3Client:
        """This process's boto3 S3 client, created on first use (and again after a fork).

        Public so callers can register botocore event hooks (tracing, metrics) on it.
        """
        pid = os.getpid()
        client = self._client
        if client is not None and self._client_pid == pid:
            return client
        with self._process_lock():
            if self._client is None or self._client_pid != pid:
                self._client = self._create_client()
                self._client_pid = pid
            return self._client

    def _process_lock(self) -> threading.Lock:
        """The lock guarding the client, replaced in a forked child (where a lock copied while
        a parent thread held it would never be released)."""
        pid = os.getpid()
        if self._lock_pid != pid:
            self._lock = threading.Lock()
            self._lock_pid = pid
        return self._lock

    def _create_client(self) -> S3Client:
        # Imported on first use: a producer that never offloads never loads boto3.
        import boto3
        from botocore.config import Config

        # Short timeouts: a worker holding a message must not hang on S3. The read timeout is
        # per socket read, not per object, so large objects are not cut off.
        config = Config(
            retries={"mode": "standard", "total_max_attempts": 3},
            connect_timeout=3,
            read_timeout=10,
            max_pool_connections=50,
        )
        if self._config is not None:
            config = config.merge(self._config)
        # A session of our own: boto3's default session is not thread-safe, its clients are.
        return boto3.session.Session().client("s3", config=config)

    def close(self) -> None:
        """Drop this process's client (a later call makes a new one)."""
        with self._process_lock():
            client, self._client = self._client, None
            if client is not None and self._client_pid == os.getpid():
                client.close()

    def _call(self, operation: str, ref: ObjectRef, request: Callable[[S3Client], T]) -> T:
        """Run one S3 request (botocore retries it), translating its errors into ours."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client = self.client
        # ValueError is boto3's answer to a malformed endpoint URL; BotoCoreError to a profile
        # that does not exist.
        except (ValueError, BotoCoreError) as exc:
            raise PayloadUnavailable(
                f"cannot make an S3 client for {operation} of {ref}: {exc} (check "
                "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and AWS_PROFILE)"
            ) from exc
        try:
            return request(client)
        except ClientError as exc:
            raise _client_error(exc, operation, ref, self._endpoint()) from exc
        except BotoCoreError as exc:
            raise PayloadUnavailable(
                f"S3 {operation} of {ref} failed: cannot reach S3 at {self._endpoint()} (check "
                f"AWS_ENDPOINT_URL_S3, the network, and AWS credentials): {exc}"
            ) from exc

    def _endpoint(self) -> str:
        client = self._client
        return client.meta.endpoint_url if client is not None else "boto3's default endpoint"


def _compressed_if_smaller(body: str, size: int) -> tuple[str, int]:
    """The compressed form of ``body`` and its size, or ``body`` itself if that is no larger."""
    packed = base64.b64encode(zlib.compress(body.encode("utf-8")))
    compressed_size = len(COMPRESSED_PREFIX) + len(packed)
    if compressed_size >= size:
        return body, size
    return COMPRESSED_PREFIX + packed.decode("ascii"), compressed_size


def _inflate(text: str, cap: int, what: str) -> str:
    """The text a compressed form holds, inflating at most ``cap`` bytes (zip bombs)."""
    try:
        data = base64.b64decode(text[len(COMPRESSED_PREFIX) :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PayloadError(f"{what} is marked compressed but is not base64 ({exc})") from None
    inflater = zlib.decompressobj()
    try:
        inflated = inflater.decompress(data, cap + 1)
    except zlib.error as exc:
        raise PayloadError(f"{what} is marked compressed but is not zlib data ({exc})") from None
    if len(inflated) > cap:
        raise PayloadError(
            f"{what} inflates past max_payload_bytes ({cap} bytes): refused (a compression bomb, "
            "or a payload larger than workers accept: raise EBSQS_MAX_PAYLOAD_BYTES)"
        )
    if not inflater.eof or inflater.unused_data:
        raise PayloadError(f"{what} holds truncated or trailing zlib data")
    try:
        return inflated.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"{what} inflates to bytes that are not UTF-8 ({exc})") from None


def _pointer_ref(body: str) -> ObjectRef:
    """The object a pointer body names (checked: two strings in the Extended Client's shape)."""
    if len(body) > _MAX_POINTER_CHARS:
        raise PayloadError(
            f"body starts as an S3 pointer but is {len(body)} characters long: not a pointer"
        )
    try:
        parsed: Any = json.loads(body)
    except ValueError as exc:
        raise PayloadError(f"body starts as an S3 pointer but is not JSON ({exc})") from None
    if not (isinstance(parsed, list) and len(parsed) == 2 and isinstance(parsed[1], dict)):
        raise PayloadError(
            'S3 pointer must be ["<class>", {"s3BucketName": ..., "s3Key": ...}]: '
            f"got {_short(body)}"
        )
    bucket, key = parsed[1].get("s3BucketName"), parsed[1].get("s3Key")
    if not isinstance(bucket, str) or not bucket or not isinstance(key, str) or not key:
        raise PayloadError(
            f"S3 pointer needs a non-empty s3BucketName and s3Key (strings): got {_short(body)}"
        )
    if utf8_size(key) > _MAX_KEY_BYTES:
        raise PayloadError(f"S3 pointer's key is over S3's {_MAX_KEY_BYTES} bytes: not an object")
    return ObjectRef(bucket, key)


def _signature(ref: ObjectRef, digest: str, key: str) -> str:
    text = f"{_SIGNED_TEXT_VERSION}\n{ref.bucket}\n{ref.key}\n{digest}"
    return hmac.new(key.encode(), text.encode("utf-8"), hashlib.sha256).hexdigest()


def _total_size(response: Mapping[str, Any]) -> int:
    """An object's whole size from a ranged answer's ``Content-Range`` (``bytes 0-9/1234``)."""
    total = str(response.get("ContentRange", "")).rpartition("/")[2]
    return int(total) if total.isdigit() else int(response.get("ContentLength", 0))


def _over_cap(ref: ObjectRef, size: int, cap: int) -> PayloadError:
    return PayloadError(
        f"payload {ref} is {size} bytes, over max_payload_bytes ({cap}): refused unread "
        "(raise EBSQS_MAX_PAYLOAD_BYTES on workers if such payloads are expected)"
    )


def _client_error(exc: ClientError, operation: str, ref: ObjectRef, endpoint: str) -> EbsqsError:
    """Our error for S3's answer: only a missing or empty object is the message's fault."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    message = error.get("Message", "")
    if code in _MISSING and operation == "GetObject":
        return PayloadError(
            f"payload {ref} does not exist: deleted after an earlier delivery ran, expired by "
            "the bucket's lifecycle rule, or never written"
        )
    if code in _EMPTY and operation == "GetObject":
        return PayloadError(f"payload {ref} is empty: no message body is")
    if code == "NoSuchBucket":
        fix = f"create bucket {ref.bucket!r} or fix EBSQS_LARGE_PAYLOAD_BUCKET"
    elif code in _DENIED:
        fix = (
            f"allow s3:{operation} on arn:aws:s3:::{ref.bucket}/* in this identity's IAM policy "
            "(and kms:Decrypt / kms:GenerateDataKey if the bucket uses a KMS key)"
        )
    elif code in _SIGNATURE_DENIED:
        fix = "check AWS credentials: S3 does not accept them"
    else:
        fix = "S3 was unavailable, throttled or failing; it is tried again"
    return PayloadUnavailable(
        f"S3 {operation} of {ref} at {endpoint} failed ({code}: {message}); {fix}"
    )


def _short(value: object, limit: int = 120) -> str:
    """Text of a value for a message, cut: it may come from a hostile message."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}..."
