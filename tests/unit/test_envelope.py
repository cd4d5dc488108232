"""The wire format: round trips, refusals, legacy bodies, signing."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import time
from pathlib import Path

import pytest

from ebsqs.envelope import Envelope, decode, encode, sign
from ebsqs.errors import EnvelopeError, SerializationError

FIXTURES = Path(__file__).parent.parent / "fixtures" / "django-eb-sqs-1.44-bodies.json"
SHARED = (
    Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "django-eb-sqs-1.44-bodies.json"
)

pytestmark = pytest.mark.timeout(10)


def legacy_bodies() -> list[dict[str, str]]:
    path = FIXTURES if FIXTURES.exists() else SHARED
    return list(json.loads(path.read_text()))


def test_round_trip_keeps_every_field() -> None:
    sent = Envelope(
        task="m.f",
        args=(1, "a"),
        kwargs={"k": [1, {"x": None}]},
        max_retries=3,
        attempt=2,
        due=1234.5,
        trace={"traceparent": "00-ab"},
    )
    got = decode(encode(sent))
    assert got == sent


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("{", "not JSON"),
        ("[1]", "not an object"),
        ('{"v": 1}', "'task'"),
        ('{"v": 9, "task": "t", "id": "i"}', "version"),
        ('{"v": 1, "task": "t", "id": "i", "args": "x"}', "'args'"),
        ('{"v": 1, "task": "t", "id": "i", "attempt": true}', "'attempt'"),
        ('{"func": "", "args": []}', "'func'"),
    ],
)
def test_malformed_bodies_are_envelope_errors(body: str, fragment: str) -> None:
    with pytest.raises(EnvelopeError, match=fragment):
        decode(body)


def test_unserialisable_argument_is_named() -> None:
    with pytest.raises(SerializationError, match=r"argument 'when'.*datetime"):
        encode(Envelope(task="t", kwargs={"when": dt.datetime.now()}))
    with pytest.raises(SerializationError, match="positional argument 1"):
        encode(Envelope(task="t", args=(1, {1, 2})))


def test_nan_is_refused_because_it_is_not_json() -> None:
    with pytest.raises(SerializationError, match="positional argument 0"):
        encode(Envelope(task="t", args=(float("nan"),)))


def test_signed_bodies_verify_and_tampering_is_refused() -> None:
    body = encode(Envelope(task="t", args=(1,)), signing_key="k1")
    assert decode(body, signing_key="k1").args == (1,)
    tampered = body.replace('"args":[1]', '"args":[2]')
    with pytest.raises(EnvelopeError, match="signature"):
        decode(tampered, signing_key="k1")
    with pytest.raises(EnvelopeError, match="not signed"):
        decode(encode(Envelope(task="t")), signing_key="k1")


def test_the_signature_covers_the_bytes_sent_so_json_changes_do_not_break_it() -> None:
    """``{9: "x"}`` arrives as ``{"9": "x"}``: a signature over the Python payload failed."""
    body = encode(Envelope(task="t", args=({9: "x"},), kwargs={"n": 1.0}), signing_key="k1")
    signed = "{" + body[len('{"sig":"') + 64 + 2 :]
    digest = hmac.new(b"k1", signed.encode(), hashlib.sha256).hexdigest()
    assert body.startswith(f'{{"sig":"{digest}",')
    assert decode(body, signing_key="k1").args == ({"9": "x"},)


def test_key_rotation_signs_with_the_first_key_and_accepts_every_listed_one() -> None:
    old = encode(Envelope(task="t"), signing_key="old")
    new = encode(Envelope(task="t"), signing_key=["new", "old"])
    assert decode(old, signing_key=("new", "old")).task == "t"
    assert decode(new, signing_key=("new", "old")).task == "t"
    assert decode(new, signing_key="new").task == "t"
    with pytest.raises(EnvelopeError, match="does not match any accepted signing key"):
        decode(new, signing_key="old")  # retired keys never sign


def test_signature_age_is_checked_against_the_signing_time() -> None:
    before = time.time()
    body = encode(Envelope(task="t"), signing_key="k1")
    assert before <= json.loads(body)["signed_at"] <= time.time()
    assert decode(body, signing_key="k1", max_signature_age=60).task == "t"
    stale = sign(encode(Envelope(task="t"))[:-1] + f',"signed_at":{before - 120}}}', "k1")
    with pytest.raises(EnvelopeError, match=r"signed 12\d s ago, over signature_max_age \(60 s\)"):
        decode(stale, signing_key="k1", max_signature_age=60)
    assert decode(stale, signing_key="k1").task == "t"  # no limit set: age does not matter


def test_bodies_signed_over_the_whole_payload_still_verify_without_an_age_limit() -> None:
    """Workers upgrade before producers: the earlier form (a sorted re-encoding) is read."""
    payload = json.loads(encode(Envelope(task="t", args=(1,))))
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    payload["sig"] = hmac.new(b"k1", canonical, hashlib.sha256).hexdigest()
    body = json.dumps(payload)
    assert decode(body, signing_key=["k2", "k1"]).args == (1,)
    with pytest.raises(EnvelopeError, match="does not match"):
        decode(body.replace('"args": [1]', '"args": [2]'), signing_key="k1")
    with pytest.raises(EnvelopeError, match="older whole-payload form"):
        decode(body, signing_key="k1", max_signature_age=3600)


def test_a_worker_without_a_key_reads_signed_bodies() -> None:
    body = encode(Envelope(task="t", args=("€",)), signing_key="k1")
    assert decode(body).args == ("€",)


def test_text_travels_as_utf8_and_sizes_are_its_bytes() -> None:
    body = encode(Envelope(task="t", args=("€" * 50_000,)))
    assert "€" * 50_000 in body and "\\u20ac" not in body
    assert 150_000 < len(body.encode()) < 150_300
    assert decode(body).args == ("€" * 50_000,)


def test_characters_sqs_refuses_raw_are_escaped_and_lone_surrogates_are_named() -> None:
    body = encode(Envelope(task="t", args=("a\ufffe\uffffé",)))
    assert "\ufffe" not in body and "\\ufffe" in body and "é" in body
    assert decode(body).args == ("a\ufffe\uffffé",)
    with pytest.raises(SerializationError, match=r"argument 'name' holds a lone surrogate"):
        encode(Envelope(task="t", kwargs={"name": "caf\udce9"}))


def test_django_eb_sqs_bodies_decode_with_attempt_semantics() -> None:
    bodies = {case["case"]: case["body"] for case in legacy_bodies()}
    first = decode(bodies["kwargs, decorator queue and max_retries"])
    assert (first.task, first.attempt, first.max_retries, first.legacy) == (
        "shop_tasks.process_message",
        1,
        2,
        True,
    )
    assert first.kwargs["tenant_id"] == 7
    # maxRetries=3 counted attempts: the retry body (retry=1) is attempt 2 of 3.
    retry = decode(bodies["retry of the first case (as Worker.retry writes it)"])
    assert (retry.attempt, retry.retries_left) == (2, 1)
    assert decode(bodies["positional args, default queue"]).args == (42,)


def test_pickled_legacy_body_is_refused_by_default_and_read_when_allowed() -> None:
    body = next(c["body"] for c in legacy_bodies() if "pickle" in c["case"])
    with pytest.raises(EnvelopeError, match="pickle"):
        decode(body)
    assert decode(body, accept_pickle=True).args == ({"a": {1, 2}},)


def test_legacy_producer_writes_what_django_eb_sqs_reads() -> None:
    body = json.loads(encode(Envelope(task="m.f", args=(1,), max_retries=2), legacy=True))
    assert body["func"] == "m.f" and body["maxRetries"] == 3 and body["retry"] == 0
    assert decode(json.dumps(body)).max_retries == 2


def test_legacy_bodies_name_their_logical_queue_and_refuse_long_delays() -> None:
    body = json.loads(encode(Envelope(task="m.f"), legacy=True, queue="emails"))
    assert body["queue"] == "emails"
    with pytest.raises(SerializationError, match="15 minutes"):
        encode(Envelope(task="m.f", due=1e10), legacy=True, queue="emails")


def test_task_ids_are_version_4_uuids_and_differ_across_a_fork() -> None:
    import os
    import uuid

    from ebsqs.envelope import new_id

    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == 2000
    assert all(uuid.UUID(i).version == 4 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id, then leave at once
        os.write(write, new_id().encode())
        os._exit(0)
    os.close(write)
    child_id = os.read(read, 100).decode()
    os.waitpid(pid, 0)
    assert child_id != new_id()
