"""One long poll per idle queue per host: a token the sibling children of a queue share.

Every idle child long-polling its queue costs three requests a minute each. With the token, only
the child holding it long-polls; its siblings wait for it without any request, and the holder
gives it up the moment a receive brings messages, so a sibling polls at once (a backlog wakes
the whole pool, one sibling after another). See :class:`PollToken`.

The token of a queue is an exclusive ``flock`` on one file per queue in a directory that one
supervisor's children share (:func:`token_directory`). The kernel drops a process's flocks when
it dies, however it dies, so a SIGKILLed holder never blocks its siblings. A process waiting
for the token has one thread blocked in ``flock`` on the file (a *grabber*): the kernel wakes it
the moment the token is free, so a sibling takes it within a millisecond, and waiting costs no
CPU but a look at the caller's ``stop`` event every :data:`STOP_CHECK` s (about 0.1-0.2 % of a
core, measured).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from ebsqs.log import get_logger

logger = get_logger(__name__)

#: Seconds between a waiter's looks at its ``stop`` event. The token itself needs no looking:
#: a thread blocked in ``flock`` takes it the moment it is free, without using any CPU.
STOP_CHECK = 0.1

#: Characters of a lock file's name before its ``.lock``: file names stop at 255 bytes.
_MAX_NAME = 200


@dataclass(eq=False, slots=True)
class _LockFile:
    """This process's lock file of one queue, and what its threads are doing with it."""

    fd: int
    held: bool = False
    waiters: int = 0  # threads in wait() for it
    grabber_fd: int | None = None  # the descriptor a grabber thread is blocked on, if any
    closed: bool = False


class PollToken:
    """The right to long-poll one queue, held by at most one process of a host at a time.

    Holding is per process, not per thread: once one thread of a process takes the token of a
    queue, :meth:`acquire` is True in every thread of it, and any of them may release it. Build
    it anywhere: lock files open lazily, in the process that first takes a token, and a child
    forked from a process that holds tokens holds none of them (its copies of the descriptors
    are closed right after the fork, so they never keep a token alive once its holder died).

    Thread-safe within a process. A process that dies gives the token up with it.
    """

    def __init__(self, directory: str) -> None:
        """
        Args:
            directory: where the lock files live, one per queue; shared by the processes that
                take turns (created on first use).
        """
        self.directory = directory
        self._changed = threading.Condition(threading.Lock())
        self._files: dict[str, _LockFile] = {}
        self._unavailable: set[str] = set()  # queues whose lock file cannot be opened
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget_in_child(ref))

    def acquire(self, queue: str) -> bool:
        """Take the token of ``queue`` if no other process holds it; True if held now.

        Where the lock file cannot be opened (an unwritable directory), every caller holds the
        token: the children then poll freely, as without a token, and the failure is logged.
        """
        with self._changed:
            return self._take(queue) is None

    def wait(self, queue: str, timeout: float, stop: threading.Event) -> bool:
        """Take the token of ``queue``, waiting up to ``timeout`` s (less once ``stop`` is set)
        for it to be free; True if held now.

        While it waits, one thread of this process is blocked in ``flock`` on the lock file,
        so the token is taken the moment its holder lets go (or dies), at no CPU cost; the
        caller looks at ``stop`` every :data:`STOP_CHECK` s. Once ``stop`` is set it returns
        False without taking the token: a stopping worker has no poll to make.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while not stop.is_set():
                lock_file = self._take(queue)
                if lock_file is None:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                lock_file.waiters += 1
                try:
                    if lock_file.grabber_fd is None:
                        self._start_grabber(lock_file)
                    self._changed.wait(min(STOP_CHECK, remaining))
                finally:
                    lock_file.waiters -= 1
        return False

    def release(self, queue: str) -> None:
        """Give the token of ``queue`` up, if held (a sibling waiting takes it at once)."""
        with self._changed:
            lock_file = self._files.get(queue)
            if lock_file is None or not lock_file.held:
                return
            lock_file.held = False
            # The file stays open for the next acquire: unlocking is enough for a sibling.
            fcntl.flock(lock_file.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Give every token up."""
        with self._changed:
            for lock_file in self._files.values():
                lock_file.closed = True
                lock_file.held = False
                # The last descriptor of the file drops its flock: this one, or the one a
                # grabber thread still waits on, which it closes when it wakes.
                os.close(lock_file.fd)
            self._files.clear()
            self._unavailable.clear()
            self._changed.notify_all()

    # -- with self._changed held -----------------------------------------------------------

    def _take(self, queue: str) -> _LockFile | None:
        """Lock ``queue``'s file without blocking: None when held now, else the file."""
        if queue in self._unavailable:
            return None
        lock_file = self._files.get(queue) or self._open(queue)
        if lock_file is None or lock_file.held:
            return None
        try:
            fcntl.flock(lock_file.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return lock_file
        lock_file.held = True
        return None

    def _open(self, queue: str) -> _LockFile | None:
        """Open this process's lock file of ``queue``; None (and logged) when it cannot."""
        path = Path(self.directory) / lock_file_name(queue)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # O_CLOEXEC: a program a task starts must not inherit the token (a forked process
            # without exec is handled by _forget_in_child).
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._unavailable.add(queue)
            logger.warning(
                "poll_token_unavailable",
                queue=queue,
                path=str(path),
                error=str(exc),
                consequence="every child of this queue long-polls while idle",
            )
            return None
        lock_file = self._files[queue] = _LockFile(fd)
        return lock_file

    def _start_grabber(self, lock_file: _LockFile) -> None:
        # A duplicate shares the file's open description, so a lock taken through it is this
        # process's token; having its own number, it can never name another file once
        # close() has closed the original.
        lock_file.grabber_fd = os.dup(lock_file.fd)
        thread = threading.Thread(
            target=self._grab, args=(lock_file,), name="poll-token-grabber", daemon=True
        )
        thread.start()

    # -- the grabber thread ----------------------------------------------------------------

    def _grab(self, lock_file: _LockFile) -> None:
        """Block until the lock is free and take it: for the waiters if any are left, else
        let it go at once."""
        fd = lock_file.grabber_fd
        assert fd is not None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # no CPU while blocked; woken by the kernel
            locked = True
        except OSError:  # (no known cause) a waiter's next look starts another grabber
            locked = False
        with self._changed:
            lock_file.grabber_fd = None
            if locked and not lock_file.closed and not lock_file.held:
                if lock_file.waiters:
                    lock_file.held = True
                    self._changed.notify_all()
                else:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _forget(self) -> None:
        """Child side, right after a fork: the parent's tokens and descriptors are not ours.

        Closing our copies does not release the parent's lock (the parent's descriptors still
        refer to it); keeping them would keep the token alive after the parent died. The
        condition is replaced too: another thread of the parent may have held it at the fork,
        and the parent's grabber threads do not exist here.
        """
        self._changed = threading.Condition(threading.Lock())
        for lock_file in self._files.values():
            for fd in (lock_file.fd, lock_file.grabber_fd):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        self._files.clear()
        self._unavailable.clear()


def lock_file_name(queue: str) -> str:
    """The lock file of ``queue``: its name percent-encoded, so any text makes one safe file
    name and two queues never share one (``emails.fifo`` -> ``emails.fifo.lock``); a very long
    name (a queue URL) is cut and told apart by a hash, to stay within a file name's limit."""
    name = quote(queue, safe="")
    if len(name) > _MAX_NAME:
        name = f"{name[: _MAX_NAME - 17]}.{hashlib.sha256(queue.encode()).hexdigest()[:16]}"
    return f"{name}.lock"


def token_directory(status_file: Path) -> Path:
    """Where the children of the supervisor whose status file is ``status_file`` keep their
    tokens: a hidden directory beside it (``master-41.json`` -> ``.master-41.poll-tokens``).

    The status file names one supervisor, so two supervisors on one machine with different
    status files take turns separately, as two hosts would.
    """
    return status_file.with_name(f".{status_file.stem}.poll-tokens")


def remove_directory(directory: str) -> None:
    """Remove a token directory and its lock files, once no process can use them (the master,
    after its last child exited): a lock file unlinked while in use would let a newcomer lock
    a new file of the same name beside the holder."""
    path = Path(directory)
    with contextlib.suppress(OSError):
        for lock_file in path.glob("*.lock"):
            lock_file.unlink(missing_ok=True)
        path.rmdir()


def _forget_in_child(ref: weakref.ref[PollToken]) -> None:
    token = ref()
    if token is not None:
        token._forget()
