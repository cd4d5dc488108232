"""The heartbeat pipe: how a child tells the master it is alive and what it is doing.

One pipe per child: the child holds the write end, the master the read end, so the master knows
who spoke without an id in the message, and a child's death shows up as end-of-file. A frame is a
4-byte big-endian length followed by a compact JSON array (:class:`Beat`'s fields in order).
Frames stay under ``PIPE_BUF`` (4096 bytes), so each ``write`` is atomic, and the child writes
without blocking: if the master is too busy to read, a beat is dropped rather than stalling the
child's keeper thread (which also extends message visibility).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from ebsqs.counters import Counters
from ebsqs.supervisor.snapshot import CurrentTask
from ebsqs.worker import RunningTask, WorkerStatus

_HEADER = struct.Struct("!I")
#: Writes up to this size are atomic on a pipe (POSIX guarantees at least 512; Linux 4096).
MAX_FRAME = 4096
_MAX_TEXT = 200


class HeartbeatError(ValueError):
    """A frame that is not a heartbeat (the master logs it and reads on)."""


@dataclass(frozen=True, slots=True)
class Beat:
    """One heartbeat.

    Attributes:
        pid: the child's pid.
        state: the worker's state (``starting``, ``idle``, ``busy``, ``draining``, ``stopped``).
        in_flight: messages the child holds, running or fetched.
        running: tasks running now.
        task: the name of the running task nearest its hard limit (else the oldest), or None.
        task_id: that task's id.
        task_age: seconds that task had been running at ``sent_at``.
        deadline_in: seconds from ``sent_at`` to that task's hard limit (negative once past).
        rss: the child's resident memory in bytes.
        sent_at: the child's wall clock when it sent this.
        counts: the worker's queue-level :class:`~ebsqs.counters.Counters`, cumulative
            (:meth:`Counters.queue_wire`).
        tasks: per task name, :meth:`TaskStats.to_wire` of its cumulative stats. A child with
            more tasks than fit one frame sends a different part each second (and every part
            in its last beats), so the master merges what it gets per task
            (:meth:`Counters.updated`).
        loop_age: seconds since the worker loop's own thread last made progress, as of
            ``sent_at``; None while it blocks on purpose (a long poll, a task it runs itself, a
            drain). A beat comes from a thread of its own, so this is how the master tells a
            frozen loop from a busy one.
        error: the text of what last went wrong in the child (a task's error type and first
            line, a rejection, a failed receive), at most 200 characters; None until then.
    """

    pid: int
    state: str
    in_flight: int = 0
    running: int = 0
    task: str | None = None
    task_id: str | None = None
    task_age: float | None = None
    deadline_in: float | None = None
    rss: int = 0
    sent_at: float = 0.0
    counts: list[int] | None = None
    tasks: dict[str, list[Any]] | None = None
    loop_age: float | None = None
    error: str | None = None

    @classmethod
    def from_status(cls, pid: int, status: WorkerStatus, rss: int, part: int | None = None) -> Beat:
        """The beat describing a worker's :class:`WorkerStatus`.

        Args:
            pid: the child's pid.
            status: the worker's status.
            rss: the child's resident memory.
            part: which part of the per-task stats to carry (see :meth:`parts`); by default
                the parts take turns, one per second.
        """
        return cls.parts(pid, status, rss, part)[0]

    @classmethod
    def parts(cls, pid: int, status: WorkerStatus, rss: int, part: int | None = -1) -> list[Beat]:
        """Beats that carry every task's stats between them: all of them with ``part=-1``
        (for the last words of an exiting child), else the one beat with that part."""
        base = cls._without_tasks(pid, status, rss)
        budget = MAX_FRAME - len(encode(base)) - 16
        chunks = _task_chunks(status.counters, budget)
        if part == -1:
            return [dataclasses.replace(base, tasks=chunk) for chunk in chunks]
        index = int(status.at) % len(chunks) if part is None else part % len(chunks)
        return [dataclasses.replace(base, tasks=chunks[index])]

    @classmethod
    def brief(cls, pid: int, status: WorkerStatus, rss: int) -> Beat:
        """A beat without per-task stats (the master keeps the ones it has): cheap enough for
        the loop's thread to send before every task with a hard limit."""
        return cls._without_tasks(pid, status, rss)

    @classmethod
    def _without_tasks(cls, pid: int, status: WorkerStatus, rss: int) -> Beat:
        current = _current(status.running)
        deadline = current.deadline if current else None
        return cls(
            pid=pid,
            state=str(status.state),
            in_flight=status.held,
            running=len(status.running),
            task=current.task[:_MAX_TEXT] if current else None,
            task_id=current.task_id[:_MAX_TEXT] if current else None,
            task_age=round(status.at - current.started_at, 3) if current else None,
            deadline_in=None if deadline is None else round(deadline - status.at, 3),
            rss=rss,
            sent_at=time.time(),
            counts=status.counters.queue_wire(),
            loop_age=None if status.loop_age is None else round(status.loop_age, 3),
            error=status.last_error[:_MAX_TEXT] if status.last_error else None,
        )

    def counters(self) -> Counters:
        """What this beat carries as :class:`Counters` (only some tasks, when there are many).

        Raises:
            HeartbeatError: the counts are malformed.
        """
        try:
            return Counters.from_wire(self.counts or [], self.tasks)
        except (TypeError, ValueError) as exc:
            raise HeartbeatError(f"malformed counts: {exc}") from None

    def current_task(self, age: float = 0.0) -> CurrentTask | None:
        """The running task this beat names, if any, as seen ``age`` seconds after the beat."""
        if self.task is None:
            return None
        return CurrentTask(
            self.task,
            self.task_id or "",
            None if self.task_age is None else self.task_age + age,
            None if self.deadline_in is None else self.deadline_in - age,
        )


def _current(running: tuple[RunningTask, ...]) -> RunningTask | None:
    """The task to report: the one whose hard limit comes first, else the oldest."""
    if not running:
        return None
    return min(running, key=lambda r: (r.deadline is None, r.deadline or 0.0, r.started_at))


def _task_chunks(counters: Counters, budget: int) -> list[dict[str, list[Any]]]:
    """Per-task stats in chunks whose JSON fits ``budget`` bytes each (at least one chunk)."""
    chunks: list[dict[str, list[Any]]] = [{}]
    used = 2
    for name, wire in counters.task_wire():
        key = name[:_MAX_TEXT]
        size = len(json.dumps(key)) + len(json.dumps(wire, separators=(",", ":"))) + 2
        if size + 2 > budget:
            continue  # cannot happen with names cut to _MAX_TEXT; never break the beat
        if used + size > budget:
            chunks.append({})
            used = 2
        chunks[-1][key] = wire
        used += size
    return chunks


def encode(beat: Beat) -> bytes:
    """One frame: length prefix and JSON array."""
    payload = json.dumps(dataclasses.astuple(beat), separators=(",", ":")).encode()
    frame = _HEADER.pack(len(payload)) + payload
    if len(frame) > MAX_FRAME:
        raise HeartbeatError(f"heartbeat frame of {len(frame)} bytes exceeds {MAX_FRAME}")
    return frame


def decode(payload: bytes) -> Beat:
    """The beat in one frame's payload (without the length prefix).

    Raises:
        HeartbeatError: the payload is not a heartbeat.
    """
    try:
        values = json.loads(payload)
        return Beat(*values)
    except (ValueError, TypeError) as exc:
        raise HeartbeatError(f"malformed heartbeat: {exc}") from None


class BeatWriter:
    """The child's end of its pipe. Thread-safe: the keeper and the main thread both send."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """In the child, after the fork: make writes non-blocking."""
        os.set_blocking(self.fd, False)

    def send(self, beat: Beat) -> bool:
        """Write one beat; False when the master is gone (its end of the pipe is closed).

        A full pipe (a master too busy to read) drops the beat and still returns True.
        """
        frame = encode(beat)
        with self._lock:
            try:
                os.write(self.fd, frame)
            except BlockingIOError:
                return True
            except OSError:  # EPIPE: the master is gone
                return False
        return True

    def close(self) -> None:
        """Close the write end (the master then sees end-of-file)."""
        with self._lock, contextlib.suppress(OSError):
            os.close(self.fd)


class BeatReader:
    """The master's end of one child's pipe: buffers partial frames, yields whole beats."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.closed = False
        self.malformed = 0
        self._buffer = bytearray()
        os.set_blocking(fd, False)

    def read(self) -> list[Beat]:
        """Every whole beat readable now; sets :attr:`closed` at end-of-file.

        A malformed frame is skipped and counted in :attr:`malformed`.
        """
        while not self.closed:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                self.closed = True
            self._buffer += chunk
        return self._frames()

    def _frames(self) -> list[Beat]:
        beats: list[Beat] = []
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if size > MAX_FRAME:
                # Out of step (cannot happen with atomic writes): drop the buffer and resync.
                self._buffer.clear()
                self.malformed += 1
                break
            end = _HEADER.size + size
            if len(self._buffer) < end:
                break
            payload = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            try:
                beats.append(decode(payload))
            except HeartbeatError:
                self.malformed += 1
        return beats

    def close(self) -> None:
        """Close the read end."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.closed = True
