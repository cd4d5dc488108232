"""The flow stores' operations, each store against the same expectations (host SQLite, Redis).

Times are passed in (``now``), so the GCRA arithmetic is checked exactly; only Redis's own key
expiry is waited for.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ebsqs.errors import ConfigurationError
from ebsqs.flow.store import FlowStore, FlowStoreError, HostStore, store_for
from tests.flow.conftest import needs_redis
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(20)

T0 = 1_900_000_000.0


def test_slots_are_spaced_by_the_interval_and_kept_per_ticket(store: FlowStore, tag: str) -> None:
    key = f"rate:{tag}"
    # The first caller runs now; the next ones are told their turns, 0.1 s apart.
    slots = [store.take_slot(key, 0.1, f"t{i}", T0, 0.0) for i in range(5)]
    assert slots == pytest.approx([T0, T0 + 0.1, T0 + 0.2, T0 + 0.3, T0 + 0.4])
    # A ticket asking again before its turn keeps its slot and takes no new one.
    assert store.take_slot(key, 0.1, "t3", T0 + 0.05, 0.0) == pytest.approx(T0 + 0.3)
    assert store.take_slot(key, 0.1, "new", T0 + 0.05, 0.0) == pytest.approx(T0 + 0.5)
    # At its turn the slot is used up: the same ticket later is a new caller.
    assert store.take_slot(key, 0.1, "t3", T0 + 0.31, 0.0) == pytest.approx(T0 + 0.3)
    assert store.take_slot(key, 0.1, "t3", T0 + 0.32, 0.0) == pytest.approx(T0 + 0.6)


def test_an_idle_limit_starts_again_from_now(store: FlowStore, tag: str) -> None:
    key = f"rate:{tag}"
    assert store.take_slot(key, 1.0, "a", T0, 0.0) == T0
    # Long after: no debt and no saved-up burst; the caller runs at once, the next waits.
    assert store.take_slot(key, 1.0, "b", T0 + 100, 0.0) == pytest.approx(T0 + 100)
    assert store.take_slot(key, 1.0, "c", T0 + 100, 0.0) == pytest.approx(T0 + 101)


def test_a_slot_within_early_is_taken_now(store: FlowStore, tag: str) -> None:
    key = f"rate:{tag}"
    store.take_slot(key, 0.1, "a", T0, 0.0)
    assert store.take_slot(key, 0.1, "b", T0, 0.15) == pytest.approx(T0 + 0.1)
    # b's slot was used up at once (within early): it holds no ticket.
    assert store.take_slot(key, 0.1, "b", T0, 0.0) == pytest.approx(T0 + 0.2)


def test_concurrency_leases(store: FlowStore, tag: str) -> None:
    key = f"running:{tag}"
    assert store.acquire(key, 2, "h1", 60, T0)
    assert store.acquire(key, 2, "h2", 60, T0)
    assert not store.acquire(key, 2, "h3", 60, T0)
    assert store.acquire(key, 2, "h1", 60, T0)  # a holder asking again keeps its slot
    store.release(key, "h1")
    assert store.acquire(key, 2, "h3", 60, T0)
    store.release(key, "nobody")  # nothing to give back: no error


def test_a_lease_runs_out(tmp_path: Path) -> None:
    store = HostStore(tmp_path / "flow.sqlite3")
    assert store.acquire("running:x", 1, "h1", 10, T0)
    assert not store.acquire("running:x", 1, "h2", 10, T0 + 9)
    assert store.acquire("running:x", 1, "h2", 10, T0 + 11)  # h1's lease ran out


def test_the_host_store_frees_the_lease_of_a_dead_process(tmp_path: Path) -> None:
    path = tmp_path / "flow.sqlite3"
    # Another process takes the only slot for an hour, then dies without giving it back.
    code = (
        "import sys; from ebsqs.flow.store import HostStore; "
        f"assert HostStore({str(path)!r}).acquire('running:x', 1, 'dead', 3600, {T0})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=20)
    store = HostStore(path)
    assert store.acquire("running:x", 1, "alive", 3600, T0 + 1)
    assert not store.acquire("running:x", 1, "third", 3600, T0 + 1)  # this process lives


def test_claims(store: FlowStore, tag: str) -> None:
    key = f"unique:{tag}"
    assert store.claim(key, "first", 60, T0) is None
    assert store.claim(key, "second", 60, T0) == "first"
    assert store.get(key, T0) == "first"
    store.unclaim(key, "second")  # not its claim: kept
    assert store.get(key, T0) == "first"
    store.unclaim(key, "first")
    assert store.get(key, T0) is None
    assert store.claim(key, "third", 60, T0) is None


def test_a_host_claim_expires(tmp_path: Path) -> None:
    store = HostStore(tmp_path / "flow.sqlite3")
    assert store.claim("k", "first", 10, T0) is None
    assert store.claim("k", "second", 10, T0 + 11) is None
    assert store.get("k", T0 + 11) == "second"


@needs_redis
def test_a_redis_claim_expires(tag: str) -> None:
    store = store_for("redis://127.0.0.1:6379/0")
    assert store.claim(f"k:{tag}", "first", 0.2, T0) is None
    wait_until(lambda: store.claim(f"k:{tag}", "second", 60, T0) is None, 5)
    assert store.get(f"k:{tag}", T0) == "second"


def test_an_unreachable_store_raises_its_own_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(FlowStoreError):
        HostStore(tmp_path / "file" / "flow.sqlite3").claim("k", "v", 1, T0)
    with pytest.raises(FlowStoreError):
        store_for("redis://127.0.0.1:9/0").claim("k", "v", 1, T0)  # the discard port


def test_store_urls() -> None:
    assert isinstance(store_for("host"), HostStore)
    assert isinstance(store_for("sqlite:///tmp/x.sqlite3"), HostStore)
    with pytest.raises(ConfigurationError, match="redis://host:6379/0"):
        store_for("memcached://x")
