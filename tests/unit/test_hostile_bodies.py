"""Hostile bodies: each one is an EnvelopeError that says what is wrong, and harms no other.

Decoding is total (issue 16 item 1, issue 10 item 10): whatever a body holds, ``decode`` either
returns an envelope or raises EnvelopeError, quickly, so the worker dead-letters that one
message and runs the rest of its batch.
"""

from __future__ import annotations

import json
import random
import time

import pytest

from ebsqs import task
from ebsqs.brokers import OutgoingMessage, QueueSettings
from ebsqs.brokers.memory import MemoryBroker
from ebsqs.config import Settings
from ebsqs.envelope import MAX_DEPTH, Envelope, decode, encode, sign
from ebsqs.errors import EnvelopeError
from ebsqs.executors.inline import InlineExecutor
from ebsqs.registry import TaskRegistry
from ebsqs.worker import Worker, WorkerOptions

pytestmark = pytest.mark.timeout(10)

KEY = "k-current"
HEAD = '{"v":1,"task":"t","id":"i"'
DEEP = "[" * 100_000 + "]" * 100_000  # 200 KB: the body that crash-looped children


def v1(**fields: object) -> str:
    """A version-1 body with ``fields`` (raw JSON text values) after the required ones."""
    return HEAD + "".join(f',"{name}":{value}' for name, value in fields.items()) + "}"


def legacy(**fields: object) -> str:
    """A django-eb-sqs body with ``fields`` (raw JSON text values)."""
    return "{" + ",".join(f'"{name}":{value}' for name, value in fields.items()) + "}"


def signed_at(when: float) -> str:
    """A body correctly signed with KEY, claiming to be signed at epoch ``when``."""
    return sign(v1(signed_at=when), KEY)


HOSTILE: list[tuple[str, str | bytes, str]] = [
    # Size and depth, refused before parsing.
    ("100,000 nested arrays", v1(args=DEEP), r"100001 levels deep, over the limit of 100"),
    ("nested arrays alone", DEEP, r"levels deep, over the limit of 100 \(ebsqs.envelope"),
    ("nested objects", '{"a":' * 5000 + "1" + "}" * 5000, "levels deep"),
    ("2 MB body", v1(args=json.dumps(["x" * 2_000_000])), r"over 1048576 bytes"),
    (
        "1.2 MB of UTF-8 in fewer characters",
        v1(args=json.dumps(["€" * 400_000], ensure_ascii=False)),
        r"1200\d+ bytes",
    ),
    ("unterminated strings", '"\\"' * 300_000, "not JSON"),
    # Numbers.
    ("1e999999", v1(due="1e999999"), r"1e999999, out of a float's range"),
    ("-1e999999", v1(enqueued_at="-1e999999"), "out of a float's range"),
    ("10**100000", v1(args=f"[1{'0' * 100_000}]"), r"integer of 100001 digits, over the limit"),
    ("NaN", v1(due="NaN"), "NaN, which is not JSON"),
    ("Infinity", v1(args="[-Infinity]"), "-Infinity, which is not JSON"),
    # Text.
    ("invalid UTF-8", b'{"v":1,"task":"t","id":"\xff"}', "not valid UTF-8"),
    ("raw lone surrogate", v1(args='["\udc80"]'), r"lone surrogate \(U\+DC80\) at character"),
    ("escaped lone surrogate", v1(args='["\\ud800x"]'), "escaped lone surrogate"),
    ("escaped low surrogate", v1(args='["\\udc00"]'), "escaped lone surrogate"),
    # Not an object, not JSON.
    ("empty", "", "not JSON"),
    ("truncated", '{"v":1,', "not JSON"),
    ("trailing data", v1() + "{}", "not JSON"),
    ("array", "[1,2]", "JSON array, not an object"),
    ("string", '"hi"', "JSON string, not an object"),
    ("number", "7", "JSON integer, not an object"),
    ("null", "null", "JSON null, not an object"),
    ("bytes of bytes", b"\x80\x81", "not valid UTF-8"),
    # Every field of a version-1 body, with the wrong type or value.
    ("no version", '{"task":"t","id":"i"}', "unsupported envelope version None"),
    ("version true", '{"v":true,"task":"t","id":"i"}', "version True"),
    ("version as text", '{"v":"1","task":"t","id":"i"}', "version '1'"),
    ("version 2", '{"v":2,"task":"t","id":"i"}', "version 2"),
    (
        "task a number",
        '{"v":1,"task":5,"id":"i"}',
        r"'task' must be a non-empty string, got integer",
    ),
    ("task empty", '{"v":1,"task":"","id":"i"}', "'task' must be a non-empty string"),
    ("id null", '{"v":1,"task":"t","id":null}', "'id' must be a non-empty string, got null"),
    ("args text", v1(args='"abc"'), r"'args' has the wrong type \(string\)"),
    ("args object", v1(args="{}"), r"'args' has the wrong type \(object\)"),
    ("kwargs array", v1(kwargs="[]"), r"'kwargs' has the wrong type \(array\)"),
    ("attempt text", v1(attempt='"2"'), r"'attempt' has the wrong type \(string\)"),
    ("attempt true", v1(attempt="true"), r"'attempt' has the wrong type \(boolean\)"),
    ("attempt 0", v1(attempt="0"), "'attempt' must be at least 1, got 0"),
    ("attempt float", v1(attempt="1.5"), r"'attempt' has the wrong type \(float\)"),
    ("max_retries negative", v1(max_retries="-1"), "'max_retries' must be at least 0"),
    ("max_retries array", v1(max_retries="[3]"), "'max_retries' has the wrong type"),
    ("due text", v1(due='"tomorrow"'), r"'due' has the wrong type \(string\)"),
    ("due true", v1(due="true"), r"'due' has the wrong type \(boolean\)"),
    ("enqueued_at text", v1(enqueued_at='"now"'), "'enqueued_at' has the wrong type"),
    ("trace array", v1(trace="[]"), "'trace' has the wrong type"),
    ("trace values", v1(trace='{"traceparent":1}'), "'trace' must map names to strings"),
    # django-eb-sqs bodies.
    ("legacy func", legacy(func="3"), "'func' must be a non-empty string"),
    ("legacy args", legacy(func='"f"', args='"x"'), "'args' has the wrong type"),
    ("legacy kwargs", legacy(func='"f"', kwargs="[1]"), "'kwargs' has the wrong type"),
    ("legacy maxRetries", legacy(func='"f"', maxRetries="1e308"), r"'maxRetries'.*float"),
    ("legacy maxRetries text", legacy(func='"f"', maxRetries='"3"'), "'maxRetries'"),
    ("legacy retry", legacy(func='"f"', retry="[1]"), "'retry' has the wrong type"),
    ("legacy id", legacy(func='"f"', id="5"), "'id' must be a non-empty string, got integer"),
    (
        "pickle",
        legacy(func='"f"', args='"gASVBQAAAAAAAABdlC4="', pickle="true"),
        "pickle is refused",
    ),
]

SIGNED: list[tuple[str, str, str]] = [
    ("unsigned", v1(), "not signed, and this worker requires signed bodies"),
    ("bad signature", '{"sig":"' + "0" * 64 + '",' + v1()[1:], "does not match any accepted"),
    ("tampered", signed_at(time.time()).replace('"t"', '"u"'), "does not match"),
    ("short signature", '{"sig":"abc",' + v1()[1:], "does not match"),
    ("signed by another key", sign(v1(signed_at=time.time()), "k-unknown"), "does not match"),
    (
        "expired",
        signed_at(time.time() - 3600),
        # Built at import: a long run reaches this test minutes later, so only the floor holds.
        r"signed (3[6-9]\d\d|[4-9]\d\d\d) s ago, over signature_max_age \(300 s\)",
    ),
    ("no signing time", sign(v1(), KEY), r"no signing time \('signed_at'\)"),
    ("signing time text", sign(v1(signed_at='"now"'), KEY), "no signing time"),
    ("old whole-payload form", v1(sig='"' + "0" * 64 + '"'), "older whole-payload form"),
]


@pytest.mark.parametrize(("case", "body", "fragment"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_body_is_an_envelope_error_saying_what_is_wrong(
    case: str, body: str | bytes, fragment: str
) -> None:
    with pytest.raises(EnvelopeError, match=fragment):
        decode(body)


@pytest.mark.parametrize(("case", "body", "fragment"), SIGNED, ids=[c[0] for c in SIGNED])
def test_badly_signed_body_is_an_envelope_error(case: str, body: str, fragment: str) -> None:
    with pytest.raises(EnvelopeError, match=fragment):
        decode(body, signing_key=[KEY, "k-previous"], max_signature_age=300)


def test_the_limits_are_not_hit_by_ordinary_bodies() -> None:
    """Brackets inside strings are not nesting; the deepest allowed nesting still decodes."""
    deepest = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)  # one level is the args array
    body = v1(args=deepest, kwargs=json.dumps({"text": "[{" * 10_000 + '\\"'}))
    assert decode(body).kwargs["text"].startswith("[{[{")
    assert decode(v1(args=f"[1{'0' * 4299}]")).args == (10**4299,)
    assert decode(v1(args='["\\ud83d\\ude00"]')).args == ("😀",)  # an escaped pair is text


def test_hostile_bodies_are_refused_quickly() -> None:
    """Every check is linear: the worst of the table takes well under a second."""
    worst = [DEEP, '"\\"' * 300_000, v1(args=f"[{'9' * 500_000}]"), "[" * 1_000_000]
    for body in worst:
        started = time.perf_counter()
        with pytest.raises(EnvelopeError):
            decode(body)
        assert time.perf_counter() - started < 0.5


def test_any_mutation_of_a_body_decodes_or_is_an_envelope_error() -> None:
    """Totality beyond the table: random damage to real bodies never raises anything else."""
    rng = random.Random(16)
    signed = encode(
        Envelope(task="m.f", args=(1, "€", [2.5]), kwargs={"k": {"a": None}}), signing_key=KEY
    )
    legacy_body = encode(Envelope(task="m.f", args=(1,)), legacy=True)
    alphabet = '{}[]",:0123456789.eE+-\\utrfn \udc80€'
    for _ in range(3000):
        chars = list(rng.choice([signed, legacy_body]))
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(chars))
            if rng.random() < 0.5:
                chars[position] = rng.choice(alphabet)
            else:
                del chars[position]
        try:
            decode("".join(chars), signing_key=rng.choice([None, KEY]), max_signature_age=60)
        except EnvelopeError as exc:
            assert str(exc)


runs: list[int] = []


def test_one_hostile_body_in_a_batch_of_ten_is_dead_lettered_alone() -> None:
    """Nine valid bodies and 100,000 nested arrays, received in one batch: the nine run once,
    the hostile one is dead-lettered with its reason, and nothing is lost."""
    runs.clear()
    reg = TaskRegistry()
    task(name="count", registry=reg)(runs.append)
    broker = MemoryBroker()
    broker.ensure_queue("q", QueueSettings(dead_letter_queue="q-dlq"))
    bodies = [encode(Envelope(task="count", args=(i,))) for i in range(9)]
    hostile = encode(Envelope(task="count", args=(0,))).replace('"args":[0]', f'"args":[{DEEP}]')
    bodies.insert(4, hostile)
    for body in bodies:
        broker.send("q", OutgoingMessage(body))
    worker = Worker(
        broker,
        Settings(broker_url="memory://unused"),
        InlineExecutor(registry=reg),
        WorkerOptions(queues=("q",), wait_seconds=0),
        registry=reg,
    )
    worker.start()
    worker.loop_once()
    assert worker.counters.receives == 1 and worker.counters.received == 10
    deadline = time.monotonic() + 5
    while len(runs) < 9 and time.monotonic() < deadline:
        worker.loop_once()
    worker.drain(time.monotonic() + 5)
    assert sorted(runs) == list(range(9))
    [letter] = broker.receive("q-dlq", 10, 0)
    assert letter.body == hostile
    assert letter.attributes["ebsqs-error-type"] == "EnvelopeError"
    assert "100002 levels deep, over the limit of 100" in letter.attributes["ebsqs-error"]
    assert broker.stats("q") == broker.stats("q").__class__("q", 0, 0, 0)


def test_bytes_bodies_are_capped_before_they_are_decoded() -> None:
    with pytest.raises(EnvelopeError, match="body is 2000000 bytes, over the limit of 1048576"):
        decode(b"x" * 2_000_000)
    assert decode(encode(Envelope(task="t", args=("é",))).encode()).args == ("é",)
