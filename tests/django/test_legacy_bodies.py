"""Messages written by the real django-eb-sqs 1.44 run under ebsqs (tests/fixtures has the bodies).

The bodies were captured from django-eb-sqs's ``.delay()`` calls on a ``shop_tasks`` module
(``tests/fixtures/djproject/shop_tasks.py`` is its ebsqs port). As django-eb-sqs did, the queues
carry its default prefix ``eb-sqs-``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.test import override_settings

from ebsqs.brokers import OutgoingMessage, QueueSettings
from ebsqs.brokers.memory import MemoryBroker
from ebsqs.envelope import decode
from tests.django.helpers import run_worker

pytestmark = pytest.mark.timeout(20)

BODIES = json.loads(
    (
        Path(__file__).resolve().parent.parent / "fixtures" / "django-eb-sqs-1.44-bodies.json"
    ).read_text()
)
PREFIX = "eb-sqs-"
BROKER = MemoryBroker.named("legacy")


@pytest.fixture(autouse=True)
def _setup() -> Iterator[None]:
    import shop_tasks

    shop_tasks.RUNS.clear()
    shop_tasks.FAIL.clear()
    with override_settings(EBSQS={"broker_url": "memory://legacy"}, EB_SQS_QUEUE_PREFIX=PREFIX):
        yield


def put(queue: str, *bodies: str) -> None:
    physical = PREFIX + queue
    BROKER.ensure_queue(physical, QueueSettings(dead_letter_queue=f"{physical}-dlq"))
    for body in bodies:
        BROKER.send(physical, OutgoingMessage(body))


def dead_letters(queue: str) -> list[tuple[str, dict[str, str]]]:
    name = f"{PREFIX}{queue}-dlq"
    if name not in BROKER.list_queues(name):
        return []
    messages = BROKER.receive(name, 10, wait_seconds=0, visibility_timeout=60)
    return [(m.body, dict(m.attributes)) for m in messages]


def case(name: str) -> dict[str, str]:
    return next(entry for entry in BODIES if entry["case"].startswith(name))


def test_captured_bodies_run_and_the_pickled_one_is_refused() -> None:
    import shop_tasks

    for entry in BODIES:
        put(entry["queue"], entry["body"])

    run_worker(["emails", "default"])

    headers, features = [{"From": "a@example.com"}], [{"links": 3}]
    email = {"tenant_id": 7, "email_id": "m-1", "headers": headers, "feature_set": features}
    assert sorted(shop_tasks.RUNS, key=repr) == sorted(
        [
            ("process_message", (), email, 1),
            ("process_message", (), email, 2),  # the retry body: django-eb-sqs's retry=1
            ("ping", (42,), {}, 1),
            ("ping", ("x",), {}, 1),
            ("ping", (1,), {}, 1),
        ],
        key=repr,
    )
    [(body, attributes)] = dead_letters("emails")
    assert body == case("pickled")["body"]
    assert attributes["ebsqs-reason"] == "rejected"
    assert "pickle" in attributes["ebsqs-error"]
    assert dead_letters("default") == []


def test_django_eb_sqs_max_retries_keeps_counting_attempts() -> None:
    """maxRetries=3 meant three runs in django-eb-sqs; a failing task still runs three times."""
    import shop_tasks

    shop_tasks.FAIL.add("m-1")
    put("emails", case("kwargs")["body"])

    run_worker(["emails"])

    assert [attempt for *_, attempt in shop_tasks.RUNS] == [1, 2, 3]
    [(_, attributes)] = dead_letters("emails")
    assert (attributes["ebsqs-reason"], attributes["ebsqs-attempts"]) == ("failed", "3")


def test_unregistered_function_is_dead_lettered_and_never_imported(tmp_path: Path) -> None:
    import os

    mark = Path(os.environ["DJPROJECT_EVIL_MARK"])
    body = json.loads(case("positional")["body"])
    body["func"] = "evil_on_import.run"
    put("default", json.dumps(body))

    run_worker(["default"])

    [(dead, attributes)] = dead_letters("default")
    assert json.loads(dead)["func"] == "evil_on_import.run"
    assert attributes["ebsqs-reason"] == "rejected"
    assert "not registered" in attributes["ebsqs-error"]
    assert "evil_on_import" not in sys.modules
    assert not mark.exists()


def test_pickled_body_runs_only_when_explicitly_allowed() -> None:
    import shop_tasks

    ebsqs = {"broker_url": "memory://legacy", "accept_pickle": True}
    with override_settings(EBSQS=ebsqs):
        put("emails", case("pickled")["body"])
        run_worker(["emails"])
    assert [("pickled", ({"a": {1, 2}},), {}, 1)] == shop_tasks.RUNS


def test_legacy_producer_writes_bodies_django_eb_sqs_workers_read() -> None:
    """During a mixed-fleet migration, ebsqs producers can keep writing the old format."""
    import shop_tasks

    ebsqs = {"broker_url": "memory://legacy", "legacy_producer": True}
    with override_settings(EBSQS=ebsqs):
        shop_tasks.process_message.delay(tenant_id=7, email_id="m-2")
    [message] = BROKER.receive(PREFIX + "emails", 10, wait_seconds=0, visibility_timeout=60)
    body = json.loads(message.body)
    assert set(body) == set(json.loads(case("kwargs")["body"]))
    # ebsqs's max_retries=3 is four runs: django-eb-sqs's maxRetries (attempts) says 4.
    assert (body["func"], body["maxRetries"], body["retry"], body["pickle"]) == (
        "shop_tasks.process_message",
        4,
        0,
        False,
    )
    assert decode(message.body).max_retries == 3
