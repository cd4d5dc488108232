"""Django's Tasks framework on ebsqs (the ``django-tasks`` backport on Django 5.2), in-process."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator

import pytest
from django.test import override_settings
from django.utils import timezone

from ebsqs.brokers.memory import MemoryBroker
from ebsqs.contrib.django.tasks_backend import NAME_PREFIX
from ebsqs.registry import registry
from tests.django.helpers import run_worker

pytestmark = pytest.mark.timeout(20)

try:
    from django.tasks import TaskResultStatus
    from django.tasks.signals import task_finished
except ImportError:
    from django_tasks import TaskResultStatus
    from django_tasks.signals import task_finished


@pytest.fixture(autouse=True)
def _broker() -> Iterator[None]:
    with override_settings(EBSQS={"broker_url": "memory://djtasks"}):
        yield


def bodies(queue: str = "djtasks") -> list[dict[str, object]]:
    broker = MemoryBroker.named("djtasks")
    messages = broker.receive(queue, 10, wait_seconds=0, visibility_timeout=60)
    broker.change_visibility(messages, 0)
    return [json.loads(m.body) for m in messages]


def test_django_tasks_are_registered_under_their_module_path() -> None:
    assert f"{NAME_PREFIX}shop.tasks.dj_record" in registry
    assert f"{NAME_PREFIX}shop.tasks.dj_with_context" in registry


def test_enqueue_sends_an_ebsqs_message_and_returns_a_ready_result() -> None:
    from shop.tasks import dj_record

    result = dj_record.enqueue("hello", alias="default")

    assert result.status == TaskResultStatus.READY
    assert result.backend == "default"
    [body] = bodies()
    assert (body["id"], body["task"], body["args"], body["kwargs"]) == (
        result.id,
        f"{NAME_PREFIX}shop.tasks.dj_record",
        ["hello"],
        {"alias": "default"},
    )


def test_enqueued_django_task_runs_on_an_ebsqs_worker(db_alias: str) -> None:
    from shop.models import Row
    from shop.tasks import dj_record, dj_with_context

    finished: list[object] = []

    def on_finished(sender: object, task_result: object, **kwargs: object) -> None:
        finished.append(task_result)

    dj_record.enqueue("from django", db_alias)
    result = dj_with_context.enqueue("ctx")
    task_finished.connect(on_finished)
    try:
        run_worker(["djtasks"])
    finally:
        task_finished.disconnect(on_finished)

    assert Row.objects.using(db_alias).filter(name="from django").count() == 1
    assert Row.objects.filter(name=f"ctx:attempt=1:id={result.id}").count() == 1
    assert sorted(r.status for r in finished) == [TaskResultStatus.SUCCESSFUL] * 2


def test_run_after_becomes_the_message_due_time() -> None:
    from shop.tasks import dj_record

    later = timezone.now() + dt.timedelta(hours=2)
    dj_record.using(run_after=later).enqueue("later")

    broker = MemoryBroker.named("djtasks")
    stats = broker.stats("djtasks")
    assert (stats.visible, stats.delayed) == (0, 1)


def test_queue_name_of_the_django_task_is_the_ebsqs_queue() -> None:
    from shop.tasks import dj_record

    dj_record.using(queue_name="a").enqueue("elsewhere")
    assert [b["args"] for b in bodies("a")] == [["elsewhere"]]
