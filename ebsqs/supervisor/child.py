"""One worker child: built in the master before the fork, initialised and run after it.

The master builds a :class:`Child` (plain data and an executor, no connections), forks, and the
new process calls :meth:`Child.run`, which never returns into the master's code: the master's
fork wrapper hands its result to ``os._exit``. Everything that must be per-process is created in
:meth:`Child.init_process`, after the fork: signal handlers, logging, the random seed, the broker
(and so its boto3 client or SQLite connection), the worker loop.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import NoReturn

import psutil

from ebsqs import executors, log, middleware, producer
from ebsqs.brokers import Broker, from_url
from ebsqs.errors import ConfigurationError, ExitCode, QueueDoesNotExist
from ebsqs.executors.base import Executor
from ebsqs.executors.execution import Job, Outcome
from ebsqs.log import get_logger
from ebsqs.middleware import Middleware
from ebsqs.registry import registry
from ebsqs.supervisor.config import SupervisorConfig
from ebsqs.supervisor.heartbeat import Beat, BeatWriter
from ebsqs.supervisor.process import set_parent_death_signal, set_title
from ebsqs.supervisor.reload import reimport_app
from ebsqs.worker import FastStop, Worker, WorkerOptions, WorkerState, WorkerStatus
from ebsqs.worker.idle import PollToken
from ebsqs.worker.suspects import SuspectFile

logger = get_logger(__name__)

#: Errors at boot that a restart cannot fix: the child exits with ExitCode.BOOT.
BOOT_ERRORS = (ConfigurationError, QueueDoesNotExist)

#: Signals that are the master's business; a child ignores them if they reach it (a terminal's
#: Ctrl-C or a hangup goes to the whole process group, and the master decides).
_MASTER_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """Who a child is: its queue and slot, its generation, and its limits.

    Attributes:
        queue: the logical queue it consumes.
        slot: its 1-based number within the queue.
        generation: 0 for the first import; higher after reloads (it re-imports the app).
        max_tasks: recycle after this many tasks, or None.
        master_pid: the pid of the master that forked it.
    """

    queue: str
    slot: int
    generation: int
    max_tasks: int | None
    master_pid: int


class Child:
    """A worker child. Construct it in the master, then fork; call :meth:`run` in the child."""

    def __init__(
        self,
        config: SupervisorConfig,
        spec: ChildSpec,
        beat_fd: int,
        inherited_fds: Sequence[int],
        app_modules: frozenset[str],
    ) -> None:
        """Master side, before the fork: plain data and the (not yet started) executor.

        Args:
            config: the supervisor's configuration.
            spec: queue, slot, generation and limits of this child.
            beat_fd: the write end of this child's heartbeat pipe.
            inherited_fds: the master's descriptors the child must close after the fork (its
                self-pipe, its selector, other children's heartbeat pipes).
            app_modules: the app's own modules, re-imported by reloaded generations.
        """
        self.config = config
        self.spec = spec
        self.beats = BeatWriter(beat_fd)
        self.inherited_fds = tuple(inherited_fds)
        self.app_modules = app_modules
        self.executor: Executor = executors.create(config.executor, config.concurrency, registry)
        self.worker: Worker | None = None
        self.broker: Broker | None = None
        self._stop_requested: int | None = None
        self._master_gone = threading.Event()
        self._process: psutil.Process | None = None
        self._rss = 0
        self._title_state = ""

    # -- after the fork --------------------------------------------------------------------

    def run(self) -> int:
        """Child side, after the fork: boot, consume until stopped, drain; the exit code.

        Returns:
            ``ExitCode.BOOT`` when the child cannot start (the master then stops instead of
            restarting it), ``ExitCode.ERROR`` on an unexpected failure, else ``ExitCode.OK``.
        """
        try:
            self.init_process()
        except BOOT_ERRORS as exc:
            logger.critical("child_boot_failed", error_type=type(exc).__name__, error=str(exc))
            return ExitCode.BOOT
        except Exception as exc:  # report any boot failure; the master restarts the slot
            logger.exception("child_boot_crashed", error=repr(exc))
            return ExitCode.ERROR
        try:
            return self.work()
        finally:
            self.shutdown()

    def init_process(self) -> None:
        """Child side, after the fork: make this process a worker of its own.

        Order matters: the master's signal handlers and descriptors go first (a signal must
        not land in the master's queue here), then the parent-death signal (and a check that
        the master did not die before it was set), then logging, and only then the app and the
        broker, so every client and connection belongs to this process.

        Raises:
            ConfigurationError: the app fails to import or the configuration cannot work.
            QueueDoesNotExist: the queue is missing and may not be created.
        """
        self._reset_signals()
        self._close_inherited()
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != self.spec.master_pid:
            raise SystemExit(ExitCode.OK)  # the master died before we could ask to be told
        random.seed()
        spec = self.spec
        log.configure(
            self.config.log_format,
            self.config.log_level,
            role="worker",
            queue=spec.queue,
            slot=spec.slot,
            pid=os.getpid(),
        )
        faulthandler.enable(all_threads=True)  # SIGABRT from the master dumps every thread
        self._process = psutil.Process()
        self.beats.prepare()
        self._title("starting")
        self._send(Beat(os.getpid(), str(WorkerState.STARTING), sent_at=time.time()))
        if spec.generation > 0:
            reimport_app(self.config.apps, self.app_modules)
        producer.broker_for.cache_clear()  # .delay() inside tasks gets this process's broker
        self.broker = from_url(self.config.settings.broker_url)
        self.worker = self._build_worker(self.broker)
        self._install_stop_signals(self.worker)
        limit = self.config.max_memory_bytes
        if limit is not None:
            middleware.add(MemoryGuard(self.worker, self._process, limit))
        self.worker.start()
        self.heartbeat(self.worker.status())  # the first "idle" beat tells the master we're up

    def _build_worker(self, broker: Broker) -> Worker:
        settings = self.config.settings
        token_dir = self.config.poll_token_dir
        return Worker(
            broker,
            settings,
            self.executor,
            WorkerOptions(
                queues=(self.spec.queue,),
                wait_seconds=settings.wait_seconds,
                visibility_timeout=settings.visibility_timeout,
                max_tasks=self.spec.max_tasks,
                heartbeat=self.heartbeat,
                ack_wait=settings.ack_wait,
                # Built here, after the fork: each child opens its own lock files.
                poll_token=PollToken(token_dir) if token_dir is not None else None,
                suspects=SuspectFile(token_dir) if token_dir is not None else (),
            ),
        )

    def work(self) -> int:
        """Child side: the loop, then a drain bounded by the graceful timeout."""
        worker = self.worker
        assert worker is not None
        try:
            while not worker.stopping:
                worker.loop_once()
            # Leave a second of the master's graceful timeout to release what is left.
            worker.drain(time.monotonic() + max(self.config.graceful_timeout - 1, 0))
        except FastStop:
            for signum in (signal.SIGTERM, signal.SIGQUIT):
                signal.signal(signum, signal.SIG_IGN)
            worker.abandon()
        except Exception as exc:  # log it here; the master restarts the slot
            logger.exception("child_crashed", error=repr(exc))
            return ExitCode.ERROR
        return ExitCode.OVERRUN if worker.overran else ExitCode.OK

    def shutdown(self) -> None:
        """Child side: a last heartbeat (final counters), then close the broker and the pipe."""
        if self.worker is not None:
            self.heartbeat(self.worker.status(), final=True)
        if self.broker is not None:
            self.broker.close()
        self.beats.close()

    # -- heartbeats (keeper thread, and the main thread at boot and exit) -------------------

    def heartbeat(self, status: WorkerStatus, final: bool = False) -> None:
        """Child side, about once a second from the worker's heartbeat thread: report to the
        master, and notice when the master is gone (the parent-pid check backs up the
        parent-death signal, which not every platform has). ``final``: the last words, with
        every task's stats even when they take several beats. A brief status (from the loop's
        thread, before a task with a hard limit) sends one beat without per-task stats and
        with the last memory reading."""
        assert self._process is not None
        if status.brief:
            self._send(Beat.brief(os.getpid(), status, self._rss))
            return
        rss = self._rss = self._process.memory_info().rss
        status.counters.log_dropped = log.dropped_lines()
        beats = Beat.parts(os.getpid(), status, rss, -1 if final else None)
        sent = all([self._send(beat) for beat in beats])
        if os.getppid() != self.spec.master_pid or not sent:
            self._on_master_gone()
        if status.state != self._title_state:
            self._title(status.state)

    def _send(self, beat: Beat) -> bool:
        return self._master_gone.is_set() or self.beats.send(beat)

    def _on_master_gone(self) -> None:
        """The master died: drain and exit, as on SIGTERM (the handler runs in the loop's
        thread), bounded by the graceful timeout."""
        if self._master_gone.is_set():
            return
        self._master_gone.set()
        # Logged from the heartbeat thread: it runs in a copy of the loop's context, so the
        # line carries role, queue, slot and pid.
        logger.warning("master_gone", master_pid=self.spec.master_pid)
        if self.worker is None or not self.worker.stopping:
            os.kill(os.getpid(), signal.SIGTERM)
        # Nobody will SIGKILL this drain now: bound it by the graceful timeout, then stop fast
        # (SIGQUIT: release what is held and exit), even inside a task with no time limit.
        timer = threading.Timer(
            self.config.graceful_timeout, os.kill, (os.getpid(), signal.SIGQUIT)
        )
        timer.daemon = True
        timer.start()

    def _title(self, state: str) -> None:
        self._title_state = state
        set_title(f"ebsqs: worker[{self.spec.queue}] #{self.spec.slot} {state}")

    # -- signals and descriptors -----------------------------------------------------------

    def _reset_signals(self) -> None:
        """Replace the master's handlers: its queue and self-pipe are not ours."""
        for signum in _MASTER_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for signum in (signal.SIGTERM, signal.SIGQUIT):
            signal.signal(signum, self._on_early_stop)

    def _on_early_stop(self, signum: int, frame: FrameType | None) -> None:
        """A stop signal before the worker exists: remember it; the worker stops at once."""
        self._stop_requested = signum
        if signum == signal.SIGQUIT:
            raise SystemExit(ExitCode.OK)

    def _install_stop_signals(self, worker: Worker) -> None:
        """TERM: drain (a second one: stop fast); QUIT: stop fast."""

        master_pid = self.spec.master_pid

        def on_term(signum: int, frame: FrameType | None) -> None:
            if worker.stopping and os.getppid() != master_pid:
                return  # the master died: the parent-death signal must not escalate a drain
            worker.on_stop_signal(signum)  # cuts a long poll short; a second TERM: FastStop

        def on_quit(signum: int, frame: FrameType | None) -> None:
            worker.stop()
            worker.on_stop_signal(signum)  # raises FastStop: already stopping

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGQUIT, on_quit)
        if self._stop_requested is not None:
            worker.stop()

    def _close_inherited(self) -> None:
        for fd in self.inherited_fds:
            with contextlib.suppress(OSError):
                os.close(fd)


class MemoryGuard(Middleware):
    """Recycles the child once its resident memory passes ``--max-memory-per-child``.

    Checked by the child itself after every task, in the loop's thread: the master's once-a-second
    view from heartbeats lets a leaking task run many times over the limit in between (a batch of
    prefetched messages). The worker stops taking messages and drains; the master replaces it.
    """

    def __init__(self, worker: Worker, process: psutil.Process, limit: int) -> None:
        self.worker = worker
        self.process = process
        self.limit = limit

    def after_outcome(self, job: Job, outcome: Outcome) -> None:
        """Stop the worker (gracefully) when the task left the process over the limit."""
        if self.worker.stopping:
            return
        rss = self.process.memory_info().rss
        if rss > self.limit:
            logger.warning(
                "child_memory_exceeded",
                rss_mib=rss >> 20,
                limit_mib=self.limit >> 20,
                task=job.envelope.task,
            )
            self.worker.stop()


def exit_child(code: int) -> NoReturn:
    """Leave the child process now, without running the master's cleanup (atexit handlers,
    ``finally`` blocks up the master's stack), after flushing what we wrote."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
