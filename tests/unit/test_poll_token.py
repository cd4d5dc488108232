"""The poll token against real processes: one holder per queue, prompt hand-off, cheap waiters."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
import pytest
from structlog.testing import capture_logs

from ebsqs.worker.idle import (
    STOP_CHECK,
    PollToken,
    lock_file_name,
    remove_directory,
    token_directory,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(30)

# Spawned, not forked: a fork of this (multi-threaded) test process may inherit a lock a
# thread held at that moment, and the sibling's own fork (the "fork" call) would then hang.
CONTEXT = multiprocessing.get_context("spawn")

#: A generous bound on hand-off: the token is tried every 20 ms, so it is usually taken in less.
HAND_OFF = 0.5


def _serve(conn: Connection, directory: str) -> None:
    """A sibling process: runs the token's calls the test sends, and answers each."""
    token = PollToken(directory)
    stop = threading.Event()
    while True:
        op, *args = conn.recv()
        if op == "acquire":
            conn.send(token.acquire(*args))
        elif op == "release":
            token.release(*args)
            conn.send(time.monotonic())
        elif op == "wait":
            conn.send("waiting")
            cpu = psutil.Process().cpu_times()
            started = time.monotonic()
            queue, timeout = args
            held = token.wait(queue, timeout, stop)
            taken_at = time.monotonic()
            after = psutil.Process().cpu_times()
            used = (after.user - cpu.user) + (after.system - cpu.system)
            conn.send((held, taken_at, taken_at - started, used))
        elif op == "fork":  # a grandchild that outlives this process, as a task's might
            pid = os.fork()
            if pid == 0:
                signal.pause()
                os._exit(0)
            conn.send(pid)
        elif op == "close":
            token.close()
            conn.send(None)


class Sibling:
    """Another process with a :class:`PollToken` of the same directory, driven by the test."""

    def __init__(self, directory: Path) -> None:
        self.conn, child_conn = CONTEXT.Pipe()
        self.process = CONTEXT.Process(
            target=_serve, args=(child_conn, str(directory)), daemon=True
        )
        self.process.start()
        child_conn.close()

    def call(self, *command: Any) -> Any:
        self.conn.send(command)
        assert self.conn.poll(10), f"no answer to {command}"
        return self.conn.recv()

    def acquire(self, queue: str) -> bool:
        return bool(self.call("acquire", queue))

    def release(self, queue: str) -> float:
        """Release; the monotonic time just after (comparable across processes)."""
        return float(self.call("release", queue))

    def start_wait(self, queue: str, timeout: float) -> None:
        assert self.call("wait", queue, timeout) == "waiting"

    def wait_result(self, timeout: float = 10) -> tuple[bool, float, float, float]:
        """(held, monotonic time taken, seconds waited, CPU seconds used while waiting)."""
        assert self.conn.poll(timeout), "the wait did not end"
        held, taken_at, waited, cpu = self.conn.recv()
        return bool(held), taken_at, waited, cpu

    def kill(self) -> float:
        os.kill(self.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        self.process.join(5)
        return killed_at

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


@pytest.fixture
def siblings(tmp_path: Path) -> Iterator[list[Sibling]]:
    made = [Sibling(tmp_path / "tokens") for _ in range(2)]
    yield made
    for sibling in made:
        sibling.stop()


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "tokens"


def locked_elsewhere(directory: Path, queue: str) -> bool:
    """Whether some open file holds the lock of ``queue`` (a fresh descriptor of our own
    conflicts even with one of this process)."""
    fd = os.open(directory / lock_file_name(queue), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# -- one holder per queue ------------------------------------------------------------------------


def test_one_process_holds_a_queues_token_at_a_time(siblings: list[Sibling]) -> None:
    a, b = siblings

    assert a.acquire("emails")
    assert a.acquire("emails")  # held already: still True
    assert not b.acquire("emails")
    a.release("emails")
    assert b.acquire("emails")
    assert not a.acquire("emails")


def test_tokens_of_different_queues_are_independent(siblings: list[Sibling]) -> None:
    a, b = siblings

    assert a.acquire("emails")
    assert b.acquire("reports.fifo")
    assert not b.acquire("emails")
    assert not a.acquire("reports.fifo")


def test_release_of_a_token_not_held_changes_nothing(siblings: list[Sibling]) -> None:
    a, b = siblings
    assert a.acquire("emails")

    b.release("emails")
    b.release("never-taken")

    assert not b.acquire("emails")


def test_close_gives_every_token_up(siblings: list[Sibling]) -> None:
    a, b = siblings
    assert a.acquire("emails") and a.acquire("reports")

    a.call("close")

    assert b.acquire("emails") and b.acquire("reports")
    assert not a.acquire("emails")


# -- hand-off ------------------------------------------------------------------------------------


def test_a_waiter_takes_a_released_token_promptly(siblings: list[Sibling]) -> None:
    a, b = siblings
    assert a.acquire("emails")
    b.start_wait("emails", 10)

    released_at = a.release("emails")
    held, taken_at, _, _ = b.wait_result()

    assert held
    assert taken_at - released_at < HAND_OFF, f"taken {taken_at - released_at:.3f} s after"
    assert not a.acquire("emails")


def test_a_waiter_takes_the_token_of_a_killed_holder(siblings: list[Sibling]) -> None:
    a, b = siblings
    assert a.acquire("emails")
    b.start_wait("emails", 10)

    killed_at = a.kill()
    held, taken_at, _, _ = b.wait_result()

    assert held
    assert taken_at - killed_at < HAND_OFF, f"taken {taken_at - killed_at:.3f} s after"


def test_a_process_forked_by_the_holder_does_not_keep_its_token(
    siblings: list[Sibling],
) -> None:
    """A task's forked process inherits the holder's descriptors: they are closed in it, so
    the token goes when the holder dies, though the forked process lives on."""
    a, b = siblings
    assert a.acquire("emails")
    grandchild = a.call("fork")
    try:
        assert not b.acquire("emails")
        a.kill()
        assert psutil.pid_exists(grandchild)

        assert b.acquire("emails")
    finally:
        os.kill(grandchild, signal.SIGKILL)


def test_a_free_token_is_taken_without_waiting(siblings: list[Sibling]) -> None:
    a, _ = siblings
    a.start_wait("emails", 10)

    held, _, waited, _ = a.wait_result()

    assert held and waited < 0.1


# -- wait's timeout and stop ---------------------------------------------------------------------


def test_wait_is_false_at_its_timeout(siblings: list[Sibling], directory: Path) -> None:
    a, _ = siblings
    assert a.acquire("emails")
    token = PollToken(str(directory))

    started = time.monotonic()
    held = token.wait("emails", 0.3, threading.Event())
    waited = time.monotonic() - started

    assert not held
    assert 0.3 <= waited < 0.3 + HAND_OFF
    token.close()


def test_wait_ends_early_when_stop_is_set(siblings: list[Sibling], directory: Path) -> None:
    a, _ = siblings
    assert a.acquire("emails")
    token = PollToken(str(directory))
    stop = threading.Event()
    result: list[tuple[bool, float]] = []

    def waiter() -> None:
        held = token.wait("emails", 20, stop)
        result.append((held, time.monotonic()))

    thread = threading.Thread(target=waiter)
    thread.start()
    stop.set()
    stopped_at = time.monotonic()
    thread.join(5)

    [(held, ended_at)] = result
    assert not held
    assert ended_at - stopped_at < STOP_CHECK + 0.2
    token.close()


def test_wait_with_stop_already_set_takes_nothing(directory: Path) -> None:
    token = PollToken(str(directory))
    stop = threading.Event()
    stop.set()

    assert not token.wait("emails", 5, stop)
    assert token.acquire("emails")  # the token was free all along
    token.close()


def test_a_wait_that_gave_up_does_not_keep_the_token(
    siblings: list[Sibling], directory: Path
) -> None:
    """The thread that waited for the lock on a timed-out wait's behalf takes it when it is
    freed, finds nobody waiting, and lets it go: a sibling gets it."""
    a, b = siblings
    assert a.acquire("emails")
    token = PollToken(str(directory))
    assert not token.wait("emails", 0.2, threading.Event())

    a.release("emails")

    wait_until(lambda: b.acquire("emails"), HAND_OFF, message="the token stayed taken")
    assert not token.acquire("emails")
    token.close()


def test_close_while_waiting_leaves_the_token_to_the_others(
    siblings: list[Sibling], directory: Path
) -> None:
    a, b = siblings
    assert a.acquire("emails")
    token = PollToken(str(directory))
    assert not token.wait("emails", 0.2, threading.Event())
    token.close()

    a.release("emails")

    wait_until(lambda: b.acquire("emails"), HAND_OFF, message="the token stayed taken")


def test_threads_waiting_in_one_process_all_hold_its_token(
    siblings: list[Sibling], directory: Path
) -> None:
    a, _ = siblings
    assert a.acquire("emails")
    token = PollToken(str(directory))
    stop = threading.Event()
    held: list[bool] = []
    threads = [
        threading.Thread(target=lambda: held.append(token.wait("emails", 10, stop)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()

    a.release("emails")
    for thread in threads:
        thread.join(5)

    assert held == [True, True, True]
    assert locked_elsewhere(directory, "emails")
    token.release("emails")
    assert not locked_elsewhere(directory, "emails")
    token.close()


# -- threads of one process ----------------------------------------------------------------------


def test_threads_of_a_process_share_its_token(directory: Path) -> None:
    """Holding is per process: threads racing to take, release or both leave the token held
    exactly when the process says so, with one descriptor per queue."""
    token = PollToken(str(directory))
    barrier = threading.Barrier(2)
    answers: list[bool] = []
    rounds = 100

    def racer(actions: list[str]) -> None:
        for action in actions:
            barrier.wait()
            if action == "acquire":
                answers.append(token.acquire("emails"))
            else:
                token.release("emails")
            barrier.wait()

    plans = (["acquire", "release"] * rounds, ["acquire", "release", "release", "acquire"] * 50)
    threads = [threading.Thread(target=racer, args=(plan,)) for plan in plans]
    fds_before = psutil.Process().num_fds()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)

    assert all(answers)  # nobody else ever held it
    assert psutil.Process().num_fds() <= fds_before + 1
    # Whatever state the race left, the process's view and the kernel's agree.
    assert token.acquire("emails") and locked_elsewhere(directory, "emails")
    token.release("emails")
    assert not locked_elsewhere(directory, "emails")
    token.close()


def test_threads_racing_never_take_a_token_another_process_holds(
    siblings: list[Sibling], directory: Path
) -> None:
    a, _ = siblings
    assert a.acquire("emails")
    token = PollToken(str(directory))
    taken: list[bool] = []

    def racer() -> None:
        for _ in range(200):
            taken.append(token.acquire("emails"))
            token.release("emails")

    threads = [threading.Thread(target=racer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)

    assert len(taken) == 400 and not any(taken)
    a.release("emails")
    assert token.acquire("emails")
    token.close()


# -- cost ----------------------------------------------------------------------------------------


def test_a_waiter_uses_almost_no_cpu(siblings: list[Sibling]) -> None:
    a, b = siblings
    assert a.acquire("emails")

    b.start_wait("emails", 2)
    held, _, waited, cpu = b.wait_result()

    assert not held and waited >= 2
    assert cpu / waited < 0.05, f"{cpu:.3f} CPU-s in {waited:.2f} s"


# -- files ---------------------------------------------------------------------------------------


def test_lock_file_names_are_safe_and_distinct() -> None:
    names = ["emails", "emails.fifo", "a_b-c", "../up", "a/b", "a%2Fb", ".", "..", "é"]

    files = [lock_file_name(name) for name in names]

    assert lock_file_name("emails.fifo") == "emails.fifo.lock"
    assert len(set(files)) == len(files)
    assert all("/" not in f and f not in (".", "..") and f.endswith(".lock") for f in files)
    long = "https://sqs.eu-west-1.amazonaws.com/123456789012/" + "q" * 80
    names_of_long = {lock_file_name(long + suffix) for suffix in ("a", "b", ".fifo")}
    assert len(names_of_long) == 3 and all(len(name) <= 255 for name in names_of_long)


def test_the_directory_sits_beside_the_status_file() -> None:
    assert token_directory(Path("/run/u/ebsqs/master-41.json")) == Path(
        "/run/u/ebsqs/.master-41.poll-tokens"
    )
    assert token_directory(Path("/srv/a/status.json")) != token_directory(
        Path("/srv/b/status.json")
    )


def test_the_directory_is_made_on_first_use_and_removed(directory: Path) -> None:
    token = PollToken(str(directory / "deeper"))
    assert not (directory / "deeper").exists()  # nothing opened before first use

    assert token.acquire("emails")
    token.close()
    remove_directory(str(directory / "deeper"))

    assert not (directory / "deeper").exists()


def test_an_unusable_directory_lets_every_child_poll(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    token = PollToken(str(tmp_path / "file" / "tokens"))

    with capture_logs() as logs:
        assert token.acquire("emails")
        assert token.acquire("emails")

    assert [entry["event"] for entry in logs] == ["poll_token_unavailable"]
    token.release("emails")
    token.close()
