"""The master: forks worker children per queue, watches their heartbeats, and replaces, reloads,
scales and stops them, like gunicorn's arbiter.

Everything happens in one loop in the master's main thread: sleep until a heartbeat, a signal or
a timer; act on recorded signals; reap exited children; then act on the
:class:`~ebsqs.supervisor.table.Table`'s decisions. Signal handlers only record the signal and
wake the loop through a self-pipe. The master's loop starts no thread of its own; its
extensions do two: the metrics server with ``--metrics-port`` (:mod:`ebsqs.ops.metrics`), which
holds no lock a child could need after a fork and whose socket children close, and the queue
depth sampler (:mod:`ebsqs.ops.depth`).

The master imports the app once, before the first fork, and its loop never talks to the broker;
only the depth sampler's thread does, with a broker of its own that children never use.

Signals: TERM / INT drain gracefully (a second one stops fast); QUIT stops fast; HUP rolls every
child onto freshly imported code; TTIN / TTOU add / remove one child per queue.
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from types import FrameType
from typing import NoReturn

import psutil
import structlog

from ebsqs import executors, middleware
from ebsqs.brokers import from_url
from ebsqs.errors import AppImportError, ConfigurationError, ExitCode
from ebsqs.log import get_logger
from ebsqs.supervisor.child import Child, ChildSpec, exit_child
from ebsqs.supervisor.config import SupervisorConfig
from ebsqs.supervisor.extension import Extension, Extensions
from ebsqs.supervisor.heartbeat import BeatReader
from ebsqs.supervisor.process import ExitStatus, set_title, signal_name
from ebsqs.supervisor.reload import import_app
from ebsqs.supervisor.snapshot import KillReason, MasterState, Phase, SupervisorSnapshot
from ebsqs.supervisor.table import ChildRecord, Slot, Table, Verdict
from ebsqs.worker.idle import remove_directory
from ebsqs.worker.suspects import SuspectFile

log = get_logger(__name__)

#: The loop wakes at least this often (timeouts, ``on_tick``) even when nothing happens.
TICK = 1.0

_HANDLED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGCHLD,
)
_STOPPED = (MasterState.STOPPING, MasterState.HALTING)


class Master:
    """The supervisor's master process. ``Master(config).run()`` returns the exit code."""

    def __init__(self, config: SupervisorConfig, extensions: Sequence[Extension] = ()) -> None:
        self.config = config
        self.extensions = Extensions(extensions)
        self.pid = os.getpid()
        self.state = MasterState.STARTING
        self.table = Table(config, random.Random())
        self.exit_code = ExitCode.OK
        self.app_modules: frozenset[str] = frozenset()
        self.clock: Callable[[], float] = time.monotonic
        self._started = self.clock()
        self._stop_started = 0.0
        self._ready = False
        self._next_tick = 0.0
        self._tick_state: MasterState | None = None
        self._signals: deque[int] = deque()
        self._wake_r, self._wake_w = -1, -1
        self._selector = selectors.DefaultSelector()
        self._readers: dict[int, BeatReader] = {}
        self._actions: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self.on_stop_signal,
            signal.SIGINT: self.on_stop_signal,
            signal.SIGQUIT: lambda: self.fast_stop("SIGQUIT"),
            signal.SIGHUP: self.reload,
            signal.SIGTTIN: lambda: self.scale(+1),
            signal.SIGTTOU: lambda: self.scale(-1),
        }

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        """Import the app, fork the children and supervise them until stopped.

        Returns:
            0 after a requested stop; ``ExitCode.BOOT`` when the app or a child could not
            start (nothing is restarted in a loop).
        """
        try:
            self.start()
            while not self.finished:
                self.loop_once()
        except (AppImportError, ConfigurationError) as exc:
            log.critical("master_boot_failed", error_type=type(exc).__name__, error=str(exc))
            self.exit_code = ExitCode.BOOT
        finally:
            self.halt()
        return int(self.exit_code)

    def start(self) -> None:
        """Signals, pidfile, the app's one import, checks; the first children fork in the loop.

        Raises:
            AppImportError: a task module fails to import.
            ConfigurationError: an unknown executor, a bad broker URL, a live pidfile.
        """
        set_title("ebsqs: master")
        structlog.contextvars.bind_contextvars(pid=self.pid)
        self._install_signals()  # first: a TERM during the import is kept, not lost
        self._write_pidfile()
        self.app_modules = import_app(self.config.apps)
        executors.create(self.config.executor, self.config.concurrency)  # fail here, not per child
        # Build (and drop) a broker object: it checks the URL and imports the broker's module
        # (boto3 for sqs://) once, so children share it; it opens nothing.
        from_url(self.config.settings.broker_url)
        log.info(
            "master_started",
            pid=self.pid,
            queues=dict(self.table.targets),
            executor=self.config.executor,
            concurrency=self.config.concurrency,
            app_modules=len(self.app_modules),
        )
        self.extensions.on_starting(self.snapshot())

    @property
    def finished(self) -> bool:
        """The master is stopping and every child is gone."""
        return self.state in _STOPPED and not self.table.children

    def loop_once(self) -> None:
        """One iteration: wait, then signals, exits, decisions, extensions."""
        self.sleep()
        self.handle_signals()
        self.reap()
        self.manage()
        self._tick()

    def _tick(self) -> None:
        """``on_tick`` once a second, and at once on a change of state: the loop wakes on every
        heartbeat, and a snapshot of every child is not worth building each time."""
        now = self.clock()
        if now < self._next_tick and self.state is self._tick_state:
            return
        self._next_tick = now + TICK
        self._tick_state = self.state
        self.extensions.on_tick(self.snapshot())

    def sleep(self) -> None:
        """Wait for a heartbeat, a signal or the next timer, reading whatever arrived."""
        now = self.clock()
        timeout = TICK
        upcoming = self.table.next_event(filling=self.state not in _STOPPED)
        if upcoming is not None:
            timeout = min(timeout, max(upcoming - now, 0.005))
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                self._drain_wake_pipe()
            else:
                self.read_beats(key.data)

    def snapshot(self) -> SupervisorSnapshot:
        """Every child and the lifetime counters, frozen (for status, health and metrics)."""
        now = self.clock()
        return self.table.snapshot(now, self.pid, self.state, now - self._started)

    # -- signals ---------------------------------------------------------------------------

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        for signum in _HANDLED:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: record the signal and wake the loop. Nothing else."""
        self._signals.append(signum)
        with contextlib.suppress(BlockingIOError):  # full: the loop is awake anyway
            os.write(self._wake_w, b"\0")

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def handle_signals(self) -> None:
        """Act on the signals recorded since the last iteration, in order."""
        while self._signals:
            signum = self._signals.popleft()
            if signum == signal.SIGCHLD:
                continue  # reap() runs every iteration
            log.info("signal_received", signal=signal_name(signum))
            self._actions[signum]()

    def on_stop_signal(self) -> None:
        """TERM / INT: drain gracefully; a second one while stopping: stop fast."""
        if self.state in _STOPPED:
            self.fast_stop("second stop signal")
        else:
            self.stop("stop signal")

    # -- children --------------------------------------------------------------------------

    def spawn(self, slot: Slot) -> None:
        """Fork a child for ``slot``. Master side; the child runs :meth:`Child.run` and exits."""
        now = self.clock()
        max_tasks = self.table.max_tasks()
        spec = ChildSpec(slot.queue, slot.index, self.table.generation, max_tasks, self.pid)
        read_fd, write_fd = os.pipe()
        child = Child(self.config, spec, write_fd, [*self._own_fds(), read_fd], self.app_modules)
        middleware.before_fork()  # e.g. Django closes its database connections here
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            log.error("child_spawn_failed", queue=slot.queue, slot=slot.index, error=str(exc))
            self.table.spawn_failed(slot, now)
            return
        if pid == 0:
            self._become_child(child)
        os.close(write_fd)  # master side: only the child writes
        self._readers[pid] = BeatReader(read_fd)
        self._selector.register(read_fd, selectors.EVENT_READ, pid)
        reason = slot.restart_reason
        record = self.table.spawned(slot, pid, now, max_tasks)
        log.info(
            "child_restarted" if reason else "child_spawned",
            queue=slot.queue,
            slot=slot.index,
            pid=pid,
            generation=record.generation,
            max_tasks=max_tasks,
            **({"reason": reason, "restarts": slot.restarts} if reason else {}),
        )

    def _become_child(self, child: Child) -> NoReturn:
        """Child side, right after the fork: run the child, then exit; never return into the
        master's code (its loop, its ``finally`` blocks, the CLI)."""
        code = int(ExitCode.ERROR)
        try:
            code = child.run()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(ExitCode.ERROR)
        except BaseException as exc:  # anything else ends the child too, logged
            log.exception("child_failed", error=repr(exc))
        finally:
            exit_child(code)

    def _own_fds(self) -> list[int]:
        """The master's descriptors, which a new child closes."""
        return [
            self._wake_r,
            self._wake_w,
            self._selector.fileno(),
            *(reader.fd for reader in self._readers.values() if reader.fd >= 0),
        ]

    def read_beats(self, pid: int) -> None:
        """Read the heartbeats child ``pid`` sent; close its pipe at end-of-file."""
        reader = self._readers.get(pid)
        if reader is None:
            return
        malformed = reader.malformed
        now = self.clock()
        for beat in reader.read():
            if self.table.beat(pid, beat, now):
                self._log_child("child_retired", self.table.children[pid], logger=log.info)
        if reader.malformed > malformed:
            log.warning("heartbeat_malformed", pid=pid, frames=reader.malformed - malformed)
        if reader.closed:
            self._close_reader(pid)

    def _close_reader(self, pid: int) -> None:
        reader = self._readers.pop(pid, None)
        if reader is not None and reader.fd >= 0:
            self._selector.unregister(reader.fd)
            reader.close()

    def reap(self) -> None:
        """Collect every exited child and act on what its exit means."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.read_beats(pid)  # its last words: the final counters
            self._close_reader(pid)
            if pid in self.table.children:
                self._reaped(pid, ExitStatus.from_wait(status))

    def _reaped(self, pid: int, status: ExitStatus) -> None:
        now = self.clock()
        child, verdict = self.table.exited(pid, status, now)
        fields = {
            **status.describe(),
            "verdict": str(verdict),
            "uptime": round(now - child.started, 3),
        }
        if verdict is Verdict.CRASHED:
            delay = max(child.slot.not_before - now, 0.0)
            self._log_child(
                "child_exited",
                child,
                log.error,
                restart_in=round(delay, 3),
                failures=child.slot.failures,
                **fields,
            )
        elif verdict is Verdict.BOOT_FAILED:
            self._log_child("child_exited", child, log.critical, **fields)
            self.exit_code = ExitCode.BOOT
            if status.code == ExitCode.BOOT:
                self.stop("a child could not boot (see child_boot_failed); not restarting it")
            else:
                self.stop(
                    f"every child of queue {child.slot.queue!r} crashed before consuming, "
                    f"{self.config.boot_crash_limit} times in a row (see child_exited); "
                    "not restarting them"
                )
        else:
            self._log_child("child_exited", child, log.info, **fields)
        self.extensions.on_child_exited(child.snapshot(now), status, verdict)

    def murder(self, child: ChildRecord, why: KillReason, reason: str) -> None:
        """A hung child: SIGABRT (its faulthandler dumps every thread's stack), and SIGCONT so a
        stopped child can act on it; SIGKILL follows after the murder grace."""
        self.table.condemn(child, self.clock(), why, reason)
        self._log_child("child_killed", child, log.critical, signal="SIGABRT")
        task = child.beat.current_task() if child.beat is not None else None
        suspects = self.config.poll_token_dir
        if why is not KillReason.OVERDUE and task and task.task_id and suspects is not None:
            SuspectFile(suspects).add(task.task_id)  # it went silent running this (see there)
        self._signal(child, signal.SIGABRT)
        self._signal(child, signal.SIGCONT)

    def kill(self, child: ChildRecord) -> None:
        """SIGKILL: a hung child that outlived the murder grace, or a drain past its timeout."""
        self.table.sigkilled(child)
        self._log_child("child_killed", child, log.warning, signal="SIGKILL")
        self._signal(child, signal.SIGKILL)

    def retire(self, child: ChildRecord, reason: str) -> None:
        """Ask a child to drain (SIGTERM): it stops receiving, releases what it has not started,
        finishes what runs. SIGKILL follows after the graceful timeout."""
        self.table.retire(child, self.clock(), reason)
        self._log_child("child_retired", child, log.info)
        self._signal(child, signal.SIGTERM)

    def restart(self, child: ChildRecord, reason: str) -> None:
        """Replace a healthy child gracefully: the replacement starts, then the old one drains."""
        slot = child.slot
        slot.restart_reason = reason
        self.table.recycled += 1
        self.spawn(slot)
        self.retire(child, reason)

    def _signal(self, child: ChildRecord, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # it exited: reap() will see it
            os.kill(child.pid, signum)

    def _log_child(
        self, event: str, child: ChildRecord, logger: Callable[..., object], **fields: object
    ) -> None:
        task = child.beat.current_task(self.clock() - child.last_beat) if child.beat else None
        logger(
            event,
            queue=child.slot.queue,
            slot=child.slot.index,
            pid=child.pid,
            phase=str(child.phase),
            **({"reason": child.reason} if child.reason else {}),
            **({"task": task.name, "task_id": task.task_id} if task else {}),
            **fields,
        )

    # -- decisions -------------------------------------------------------------------------

    def manage(self) -> None:
        """Act on the table's decisions: kill the hung, replace, roll, scale, fill."""
        now = self.clock()
        for child, why, reason in self.table.hung(now):
            self.murder(child, why, reason)
        for child in self.table.overdue(now):
            self.kill(child)
        if self.state in _STOPPED:
            return
        for child, reason in self.table.to_recycle():
            self.restart(child, reason)
        for child in self.table.to_roll():
            self.restart(child, "reload")
        for child in self.table.surplus():
            self.retire(child, "scaled down")
        for slot in self.table.slots_to_fill(now):
            self.spawn(slot)
        self._announce()

    def _announce(self) -> None:
        """Readiness, and the end of a reload, once each."""
        if not self._ready and self.table.all_ready():
            self._ready = True
            self.state = MasterState.RUNNING
            log.info("supervisor_ready", children=len(self.table.children))
            self.extensions.on_ready(self.snapshot())
        if self.table.reload_finished():
            self.state = MasterState.RUNNING
            set_title("ebsqs: master")
            log.info("reload_completed", generation=self.table.generation)
            self.extensions.on_reloaded(self.snapshot())

    def reload(self) -> None:
        """HUP: roll every child onto code imported afresh (by the new children, after fork)."""
        if self.state in _STOPPED:
            return
        self.table.reload()
        self.state = MasterState.RELOADING
        set_title("ebsqs: master reloading")
        log.info("reload_started", generation=self.table.generation)
        self.extensions.on_reload(self.snapshot())

    def scale(self, delta: int) -> None:
        """TTIN / TTOU: one more or one fewer child per queue (never below one)."""
        if self.state in _STOPPED:
            return
        self.table.scale(delta)
        log.info("children_scaled", targets=dict(self.table.targets))

    # -- stopping --------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Graceful drain: every child drains; SIGKILL after the graceful timeout."""
        if self.state in _STOPPED:
            return
        self.state = MasterState.STOPPING
        self._stop_started = self.clock()
        set_title("ebsqs: master stopping")
        log.info(
            "drain_started",
            reason=reason,
            children=len(self.table.children),
            graceful_timeout=self.config.graceful_timeout,
        )
        self.extensions.on_stopping(self.snapshot(), graceful=True)
        for child in list(self.table.children.values()):
            if child.phase in (Phase.BOOTING, Phase.RUNNING):
                self.retire(child, reason)

    def fast_stop(self, reason: str) -> None:
        """Fast stop: children release every message at once (SIGQUIT) and exit; SIGKILL after
        ``fast_stop_timeout``."""
        if self.state is MasterState.HALTING:
            return
        if self.state is not MasterState.STOPPING:
            self._stop_started = self.clock()
        self.state = MasterState.HALTING
        set_title("ebsqs: master halting")
        log.warning("fast_stop_started", reason=reason, children=len(self.table.children))
        self.extensions.on_stopping(self.snapshot(), graceful=False)
        now = self.clock()
        for child in list(self.table.children.values()):
            if child.phase is Phase.KILLING:
                continue
            self.table.retire(child, now, reason)
            self.table.hurry(child, now, self.config.fast_stop_timeout)
            self._signal(child, signal.SIGQUIT)

    def halt(self) -> None:
        """Last: kill any child left (only after an error in the loop), release descriptors,
        the pidfile and the poll tokens' directory, and say how it ended."""
        for child in list(self.table.children.values()):
            self._signal(child, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child.pid, 0)
            self.table.children.pop(child.pid, None)
        for pid in list(self._readers):
            self._close_reader(pid)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self._selector.close()
        self._remove_pidfile()
        if self.config.poll_token_dir is not None:  # every child is gone: nobody holds a token
            remove_directory(self.config.poll_token_dir)
        snapshot = self.snapshot()
        if self.state in _STOPPED:
            log.info(
                "drain_completed",
                seconds=round(self.clock() - self._stop_started, 3),
                **snapshot.counts.totals(),
                restarts=snapshot.restarts,
                recycled=snapshot.recycled,
            )
        self.extensions.on_stopped(snapshot, int(self.exit_code))
        log.info("master_stopped", exit_code=int(self.exit_code))

    # -- pidfile ---------------------------------------------------------------------------

    def _write_pidfile(self) -> None:
        path = self.config.pidfile
        if path is None:
            return
        other = _read_pid(path)
        if other is not None and other != self.pid and psutil.pid_exists(other):
            raise ConfigurationError(f"pidfile {path} names a running process ({other})")
        temporary = f"{path}.{self.pid}.tmp"
        with open(temporary, "w", encoding="ascii") as handle:
            handle.write(f"{self.pid}\n")
        os.replace(temporary, path)

    def _remove_pidfile(self) -> None:
        path = self.config.pidfile
        if path is not None and _read_pid(path) == self.pid:
            os.unlink(path)


def _read_pid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def run(config: SupervisorConfig, extensions: Sequence[Extension] = ()) -> int:
    """Run a master until it stops; return its exit code (for ``sys.exit``)."""
    return Master(config, extensions).run()
