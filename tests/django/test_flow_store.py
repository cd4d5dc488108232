"""The Django store on each database of the fixture project (SQLite, PostgreSQL): the same
operations as the other stores, the migration's tables, and callers racing for one limit."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from ebsqs.flow.django_store import DjangoStore
from tests.django.conftest import djproject_env
from tests.django.helpers import managed
from tests.faults.conftest import rig  # noqa: F401 - the fault suite's rig, for the acceptance run
from tests.faults.harness import Rig
from tests.flow.test_supervised_rate import judge, measure

pytestmark = pytest.mark.timeout(90)

T0 = 1_900_000_000.0


@pytest.fixture
def store(db_alias: str) -> Iterator[DjangoStore]:
    from django.db import connections

    made = DjangoStore(db_alias)
    made.entries.objects.using(db_alias).all().delete()
    made.leases.objects.using(db_alias).all().delete()
    yield made
    connections[db_alias].close()


def test_slots(store: DjangoStore) -> None:
    slots = [store.take_slot("rate:t", 0.5, f"t{i}", T0, 0.0) for i in range(3)]
    assert slots == pytest.approx([T0, T0 + 0.5, T0 + 1.0])
    assert store.take_slot("rate:t", 0.5, "t2", T0 + 0.1, 0.0) == pytest.approx(T0 + 1.0)
    assert store.take_slot("rate:t", 0.5, "t2", T0 + 1.0, 0.0) == pytest.approx(T0 + 1.0)
    assert store.take_slot("rate:t", 0.5, "t2", T0 + 1.0, 0.0) == pytest.approx(T0 + 1.5)


def test_leases_and_claims(store: DjangoStore) -> None:
    assert store.acquire("running:t", 1, "h1", 10, T0)
    assert not store.acquire("running:t", 1, "h2", 10, T0)
    assert store.acquire("running:t", 1, "h2", 10, T0 + 11)  # h1's lease ran out
    store.release("running:t", "h2")
    assert store.acquire("running:t", 1, "h3", 10, T0 + 11)
    assert store.claim("unique:t", "first", 60, T0) is None
    assert store.claim("unique:t", "second", 60, T0) == "first"
    assert store.get("unique:t", T0) == "first"
    store.unclaim("unique:t", "first")
    assert store.claim("unique:t", "third", 60, T0 + 1) is None
    assert store.claim("unique:t", "fourth", 60, T0 + 62) is None  # the window passed


@pytest.mark.postgres
def test_racing_callers_each_get_their_own_slot(pg_alias: str) -> None:
    from django.db import connections

    store = DjangoStore(pg_alias)
    store.entries.objects.using(pg_alias).filter(key__startswith="rate:race").delete()
    store.take_slot("rate:race", 0.1, "first", T0, 0.0)
    slots: list[float] = []
    lock = threading.Lock()

    def take(thread: int) -> None:
        try:
            for i in range(10):
                slot = store.take_slot("rate:race", 0.1, f"{thread}-{i}", T0, 0.0)
                with lock:
                    slots.append(slot)
        finally:
            connections[pg_alias].close()

    threads = [threading.Thread(target=take, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    # 40 callers, 40 distinct turns 0.1 s apart after the first: the row lock serialised them.
    assert sorted(round((s - T0) * 10) for s in slots) == list(range(1, 41))


@pytest.mark.postgres
def test_the_django_store_holds_four_children_to_ten_a_second(
    rig: Rig,  # noqa: F811 - the fixture imported above
    fauxqs_server: str,
    pg_alias: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The acceptance run of ``test_supervised_rate.py`` under ``manage.py ebsqs supervise``,
    the limit kept in PostgreSQL."""
    rig.create(visibility=30, max_receive_count=10)
    carried = {k: v for k, v in rig.env(fauxqs_server).items() if k.startswith(("AWS_", "EBSQS_"))}
    env = djproject_env(**carried, EBSQS_FLOW_STORE=f"django:{pg_alias}")
    log = rig.tmp_path / "supervise.log"
    argv = ["ebsqs", "supervise", "--app", "tests.fixtures.flow_tasks", "--wait", "1"]
    with managed(*argv, "--queues", f"{rig.queue}:4", "--log-format", "json", env=env, log=log):
        seen = measure(rig, log)
    with capsys.disabled():
        print(f"\ndjango store (postgres): {seen}")
    judge(rig, seen)
