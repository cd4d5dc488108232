"""Sending after commit: ``delay_on_commit`` and ``EBSQS["send_on_commit"]``, on both databases."""

from __future__ import annotations

import json

import pytest
from django.db import transaction
from django.test import override_settings

from ebsqs.brokers.memory import MemoryBroker
from ebsqs.errors import SerializationError

pytestmark = pytest.mark.timeout(15)

BROKER = "memory://commit"


class Rollback(Exception):
    pass


def sent() -> list[dict[str, object]]:
    """Bodies waiting in queue ``a`` of the test broker (left there)."""
    broker = MemoryBroker.named("commit")
    if "a" not in broker.list_queues("a"):
        return []
    messages = broker.receive("a", 10, wait_seconds=0, visibility_timeout=60)
    broker.change_visibility(messages, 0)
    return [json.loads(m.body) for m in messages]


@pytest.fixture(autouse=True)
def _broker() -> object:
    with override_settings(EBSQS={"broker_url": BROKER}):
        yield


def test_delay_on_commit_sends_nothing_when_the_transaction_rolls_back(db_alias: str) -> None:
    from shop.tasks import record

    with pytest.raises(Rollback), transaction.atomic(using=db_alias):
        record.delay_on_commit("never")
        raise Rollback
    assert sent() == []


def test_delay_on_commit_sends_once_when_it_commits(db_alias: str) -> None:
    from shop.tasks import record

    with transaction.atomic(using=db_alias):
        task_id = record.delay_on_commit("after")
        with transaction.atomic(using=db_alias):  # a savepoint does not send either
            pass
        assert sent() == []
    bodies = sent()
    assert [(b["id"], b["args"]) for b in bodies] == [(task_id, ["after"])]


def test_delay_on_commit_outside_a_transaction_sends_at_once() -> None:
    from shop.tasks import record

    task_id = record.delay_on_commit("now")
    assert [b["id"] for b in sent()] == [task_id]


def test_delay_on_commit_checks_arguments_at_the_call() -> None:
    from shop.tasks import record

    with pytest.raises(SerializationError, match="positional argument 0"), transaction.atomic():
        record.delay_on_commit(object())
    assert sent() == []


def test_send_on_commit_makes_delay_wait_inside_atomic(db_alias: str) -> None:
    from shop.tasks import record

    ebsqs = {"broker_url": BROKER, "send_on_commit": True}
    with override_settings(EBSQS=ebsqs):
        with pytest.raises(Rollback), transaction.atomic(using=db_alias):
            record.delay("rolled back")
            raise Rollback
        assert sent() == []
        with transaction.atomic(using=db_alias):
            task_id = record.delay("committed")
            assert sent() == []
        assert [b["id"] for b in sent()] == [task_id]
        record.delay("outside")
        assert len(sent()) == 2


def test_without_send_on_commit_delay_sends_inside_atomic() -> None:
    from shop.tasks import record

    with pytest.raises(Rollback), transaction.atomic():
        record.delay("sent anyway")
        raise Rollback
    assert len(sent()) == 1
