"""The Django dashboard: who may see and do what, CSRF, and the masters' table."""

from __future__ import annotations

import datetime
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.core.cache import cache
from django.test import Client
from django.utils import timezone

from ebsqs import producer
from ebsqs.brokers import OutgoingMessage
from ebsqs.brokers.base import Broker
from ebsqs.config import load_settings
from ebsqs.contrib.django import publish
from ebsqs.contrib.django.models import MasterSnapshot
from ebsqs.counters import Counters, TaskStats
from ebsqs.envelope import Envelope, encode
from ebsqs.producer import ensure_queue
from ebsqs.supervisor.snapshot import MasterState, SupervisorSnapshot
from ebsqs.worker.settle import ERROR, ERROR_TYPE, REASON, TASK

pytestmark = pytest.mark.timeout(60)

PAGES = ["/ebsqs/", "/ebsqs/workers", "/ebsqs/tasks", "/ebsqs/dead-letters?queue=default"]


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    MasterSnapshot.objects.all().delete()
    cache.clear()
    yield
    User.objects.all().delete()
    MasterSnapshot.objects.all().delete()


@pytest.fixture
def broker() -> Broker:
    settings = load_settings()
    producer.broker_for.cache_clear()  # the views use the producer's broker: a fresh one
    the_broker = producer.broker_for(settings.broker_url)
    ensure_queue(the_broker, settings, settings.physical_queue("default"))
    the_broker.purge(settings.physical_queue("default"))
    the_broker.purge(settings.dead_letter_queue("default"))
    return the_broker


def user(*permissions: str, staff: bool = True) -> User:
    person = User.objects.create_user(f"u{uuid.uuid4().hex[:8]}", password="pw", is_staff=staff)
    for name in permissions:
        person.user_permissions.add(Permission.objects.get(codename=name.split(".")[1]))
    return person


def client_for(person: User | None, csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    if person is not None:
        client.force_login(person)
    return client


def dead_letter(broker: Broker) -> str:
    body = encode(Envelope("shop.charge", args=("order-7",), kwargs={"card": "4242"}))
    attributes = {REASON: "failed", ERROR_TYPE: "Boom", ERROR: "card declined", TASK: "shop.charge"}
    return broker.send("default-dlq", OutgoingMessage(body, attributes=attributes))


def test_anonymous_users_go_to_the_admin_login() -> None:
    for page in PAGES:
        response = client_for(None).get(page)
        assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_staff_need_the_view_permission(broker: Broker) -> None:
    assert client_for(user()).get("/ebsqs/").status_code == 403
    assert client_for(user("ebsqs.view_dashboard", staff=False)).get("/ebsqs/").status_code == 302
    viewer = client_for(user("ebsqs.view_dashboard"))
    for page in PAGES:
        response = viewer.get(page)
        assert response.status_code == 200, page
        assert b'id="site-name"' in response.content  # the admin's look
        assert b"ebsqs/static/dashboard.css" in response.content


def test_viewers_see_dead_letters_without_arguments_or_buttons(broker: Broker) -> None:
    dead_letter(broker)
    page = client_for(user("ebsqs.view_dashboard")).get("/ebsqs/dead-letters?queue=default")
    html = page.content.decode()
    assert "card declined" in html and "shop.charge" in html
    assert "4242" not in html and "hidden: you may not see task arguments" in html
    assert "Redrive selected" not in html
    assert broker.stats("default-dlq").visible == 1  # released after the view
    shown = client_for(user("ebsqs.view_dashboard", "ebsqs.view_task_arguments")).get(
        "/ebsqs/dead-letters?queue=default"
    )
    assert "card=&#x27;4242&#x27;" in shown.content.decode()


def test_actions_need_the_manage_permission(broker: Broker) -> None:
    dead_letter(broker)
    viewer = client_for(user("ebsqs.view_dashboard"))
    response = viewer.post("/ebsqs/dead-letters?queue=default", {"action": "redrive-all"})
    assert response.status_code == 403
    assert broker.stats("default-dlq").visible == 1


def test_actions_need_the_csrf_token(broker: Broker) -> None:
    message_id = dead_letter(broker)
    manager = client_for(user("ebsqs.view_dashboard", "ebsqs.manage_dead_letters"), csrf=True)
    forged = manager.post("/ebsqs/dead-letters?queue=default", {"action": "redrive-all"})
    assert forged.status_code == 403
    page = manager.get("/ebsqs/dead-letters?queue=default").content.decode()
    assert "Redrive selected" in page and message_id in page
    token = page.split('name="csrfmiddlewaretoken" value="')[1].split('"')[0]
    done = manager.post(
        "/ebsqs/dead-letters?queue=default",
        {"action": "redrive", "id": [message_id], "csrfmiddlewaretoken": token},
    )
    assert done.status_code == 302 and done["Location"].endswith("redriven=1")
    assert broker.stats("default").visible == 1 and broker.stats("default-dlq").visible == 0
    assert "1 dead letter(s) redriven." in manager.get(done["Location"]).content.decode()


def test_a_delete_is_confirmed_first(broker: Broker) -> None:
    dead_letter(broker)
    manager = client_for(user("ebsqs.view_dashboard", "ebsqs.manage_dead_letters"))
    asked = manager.post("/ebsqs/dead-letters?queue=default", {"action": "delete-all"})
    assert asked.status_code == 200 and b"Yes, delete every dead letter" in asked.content
    assert broker.stats("default-dlq").visible == 1
    done = manager.post(
        "/ebsqs/dead-letters?queue=default", {"action": "delete-all", "confirm": "yes"}
    )
    assert done.status_code == 302 and broker.stats("default-dlq").visible == 0


def snapshot(pid: int = 4242) -> SupervisorSnapshot:
    stats = TaskStats(succeeded=3, failed=1)
    for _ in range(4):
        stats.observe(0.02)
    return SupervisorSnapshot(
        pid=pid,
        state=MasterState.RUNNING,
        uptime=60.0,
        targets={"default": 2},
        children=(),
        queue_counts={"default": Counters(tasks={"shop.charge": stats})},
        restarts=0,
        recycled=0,
    )


def test_masters_publish_their_row_and_old_rows_expire(broker: Broker) -> None:
    start = time.time()
    now = [start]
    old = MasterSnapshot.objects.create(
        key="gone:1", host="gone", pid=1, document={},
        updated_at=timezone.now() - datetime.timedelta(hours=1),
    )  # fmt: skip
    publisher = publish.SnapshotPublisher(30.0, clock=lambda: now[0])
    publisher.on_ready(snapshot())
    assert not MasterSnapshot.objects.filter(pk=old.pk).exists()
    [row] = MasterSnapshot.objects.all()
    assert row.pid == 4242 and row.document["tasks"]["shop.charge"]
    now[0] += 1.0
    publisher.on_tick(snapshot())  # within the interval: no write
    assert MasterSnapshot.objects.get().document["written_at"] == start
    now[0] += publish.INTERVAL
    publisher.on_tick(snapshot())
    assert MasterSnapshot.objects.get().document["written_at"] == now[0]
    row.document = {**row.document, "written_at": timezone.now().timestamp()}
    row.updated_at = timezone.now()
    row.save()
    viewer = client_for(user("ebsqs.view_dashboard"))
    assert "master 4242" in viewer.get("/ebsqs/workers").content.decode()
    tasks = viewer.get("/ebsqs/tasks").content.decode()
    assert "shop.charge" in tasks and "25.0 %" in tasks
    publisher.on_stopped(snapshot(), 0)
    assert not MasterSnapshot.objects.exists()


def test_a_failed_write_is_logged_once_and_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.db import DatabaseError
    from structlog.testing import capture_logs

    def broken(*args: Any, **kwargs: Any) -> None:
        raise DatabaseError("database is locked")

    monkeypatch.setattr(publish.SnapshotPublisher, "_write", broken)
    publisher = publish.SnapshotPublisher(30.0, interval=0.0)
    with capture_logs() as logs:
        publisher.on_tick(snapshot())
        publisher.on_tick(snapshot())
    assert [e["event"] for e in logs] == ["dashboard_publish_failed"]


def test_the_table_is_migrated_on_every_database(db_alias: str) -> None:
    MasterSnapshot.objects.using(db_alias).create(
        key="h:1", host="h", pid=1, document={"a": 1}, updated_at=timezone.now()
    )
    assert MasterSnapshot.objects.using(db_alias).get(key="h:1").document == {"a": 1}
    MasterSnapshot.objects.using(db_alias).all().delete()
