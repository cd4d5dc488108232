"""What the master tells the outside world: sd_notify, the status file and metrics.

One :class:`Operations` extension (see :mod:`ebsqs.supervisor.extension`) turns the master's
events and snapshots into:

- systemd notifications: ``READY=1`` once every child is up, ``STATUS=`` with a one-line summary
  when it changes, ``WATCHDOG=1`` while the pool is healthy, ``RELOADING=1`` / ``READY=1`` around
  a HUP, ``STOPPING=1`` and ``EXTEND_TIMEOUT_USEC`` while a drain makes progress;
- the status file ``ebsqs status`` and ``ebsqs healthcheck`` read, rewritten once a second;
- the metrics: each snapshot handed to :class:`~ebsqs.ops.metrics.Metrics`, served over HTTP when
  ``--metrics-port`` is given;
- queue depth (visible, in flight, delayed, dead letters), read by a
  :class:`~ebsqs.ops.depth.DepthSampler` thread every 15 s, shown in metrics and the status file.

Everything here runs in the master's loop (the HTTP server's thread only reads the snapshot,
the sampler's thread alone talks to the broker), never blocks for long, and never raises into
the master: the notifier, the status file and the sampler log their own failures once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from ebsqs.errors import ConfigurationError
from ebsqs.log import get_logger
from ebsqs.ops.depth import DepthSampler
from ebsqs.ops.metrics import Metrics, MetricsServer
from ebsqs.ops.status import DEGRADED, StatusFile, document, stale_after, status_path
from ebsqs.ops.systemd import STOP_MARGIN, Notifier
from ebsqs.supervisor.config import SupervisorConfig
from ebsqs.supervisor.extension import Extension
from ebsqs.supervisor.snapshot import MasterState, Phase, SupervisorSnapshot

log = get_logger(__name__)


class Operations(Extension):
    """sd_notify, the status file and metrics for one master.

    Build it with :meth:`create` in the master's process before :meth:`Master.run`.
    """

    def __init__(
        self,
        config: SupervisorConfig,
        notifier: Notifier,
        status_file: StatusFile | None,
        server: MetricsServer | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        sampler: DepthSampler | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier
        self.status_file = status_file
        self.sampler = sampler
        self.metrics = metrics or Metrics(sampler.depths if sampler is not None else None)
        self.server = server
        self.clock = clock
        self._last_status = ""
        self._stop_started: float | None = None
        self._drain_progress: tuple[int, int] | None = None

    @classmethod
    def create(
        cls,
        config: SupervisorConfig,
        *,
        status_file: str | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
    ) -> Operations:
        """Set up in the master's process, before the app is imported or anything forks.

        Reads (and removes from the environment, so children and the programs tasks start
        never see them) ``NOTIFY_SOCKET`` and the watchdog variables, and binds the metrics port
        so a port in use fails the start, not the first scrape.

        Raises:
            ConfigurationError: the metrics address cannot be bound.
        """
        notifier = Notifier.from_environ(unset=True)
        path = status_path(status_file, config.pidfile, os.getpid())
        sampler = DepthSampler(config.settings, [spec.name for spec in config.queues])
        metrics = Metrics(sampler.depths)
        server = None
        if metrics_port is not None:
            server = MetricsServer(metrics.render, metrics_port, metrics_host)
            try:
                server.bind()
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot serve metrics on {metrics_host}:{metrics_port}: {exc}"
                ) from None
        return cls(config, notifier, StatusFile(path), server, metrics, sampler=sampler)

    # -- the master's events ---------------------------------------------------------------

    def on_starting(self, snapshot: SupervisorSnapshot) -> None:
        """Serve metrics from here on (after the app's import, before the first fork), and
        build the depth sampler's broker now, before any fork (see :mod:`ebsqs.ops.depth`)."""
        if self.sampler is not None:
            self.sampler.prepare()
        self._publish(snapshot)
        if self.server is not None:
            self.server.serve()

    def on_ready(self, snapshot: SupervisorSnapshot) -> None:
        """``READY=1`` with the first status line; queue depth is sampled from here on (once
        the first children are forked: see :mod:`ebsqs.ops.depth` about forks)."""
        self._last_status = summary(snapshot)
        self.notifier.ready(self._last_status)
        if self.sampler is not None and not self.sampler.started:
            self.sampler.start()
        self._publish(snapshot)

    def on_tick(self, snapshot: SupervisorSnapshot) -> None:
        """Status file and metrics; ``STATUS=`` on change; the watchdog; drain progress."""
        now = self.clock()
        self._publish(snapshot)
        line = summary(snapshot)
        if line != self._last_status and snapshot.state is not MasterState.STARTING:
            self._last_status = line
            self.notifier.status(line)
        if pool_health(snapshot, self.config.heartbeat_timeout) is None:
            self.notifier.ping_watchdog(now)
        if snapshot.state is MasterState.STOPPING:
            self._extend_drain(snapshot, now)

    def on_reload(self, snapshot: SupervisorSnapshot) -> None:
        """``RELOADING=1``: systemd shows the unit reloading until ``READY=1``."""
        self.notifier.reloading()
        self._publish(snapshot)

    def on_reloaded(self, snapshot: SupervisorSnapshot) -> None:
        """``READY=1``: every child runs the new code."""
        self._last_status = summary(snapshot)
        self.notifier.ready(self._last_status)
        self._publish(snapshot)

    def on_stopping(self, snapshot: SupervisorSnapshot, graceful: bool) -> None:
        """``STOPPING=1``; a graceful drain also extends systemd's stop timeout as it goes."""
        self.notifier.stopping()
        if self._stop_started is None:
            self._stop_started = self.clock()
        self._publish(snapshot)

    def on_stopped(self, snapshot: SupervisorSnapshot, exit_code: int) -> None:
        """Remove the status file, stop serving metrics and sampling depth."""
        if self.status_file is not None:
            self.status_file.remove()
        if self.server is not None:
            self.server.stop()
        if self.sampler is not None:
            self.sampler.stop()

    # -- helpers -----------------------------------------------------------------------------

    def _publish(self, snapshot: SupervisorSnapshot) -> None:
        """Hand the snapshot to the metrics and the depth sampler, and write it to the status
        file."""
        self.metrics.update(snapshot, self.clock())
        if self.sampler is not None:
            self.sampler.note_received(
                {queue: counts.received for queue, counts in snapshot.queue_counts.items()}
            )
        if self.status_file is not None:
            self.status_file.write(
                document(
                    snapshot,
                    heartbeat_timeout=self.config.heartbeat_timeout,
                    metrics_url=self.server.url if self.server is not None else None,
                    depths=self.sampler.depths() if self.sampler is not None else None,
                )
            )

    def _extend_drain(self, snapshot: SupervisorSnapshot, now: float) -> None:
        """While draining children finish tasks or exit, push systemd's stop timeout out to
        the rest of the graceful timeout plus the margin; a drain that stalls is left to it."""
        progress = (snapshot.counts.finished, -len(snapshot.children))
        if progress == self._drain_progress or self._stop_started is None:
            return
        self._drain_progress = progress
        left = max(self.config.graceful_timeout - (now - self._stop_started), 0.0)
        self.notifier.extend_timeout(int((left + STOP_MARGIN) * 1e6))


def pool_health(snapshot: SupervisorSnapshot, heartbeat_timeout: float) -> str | None:
    """Why the pool is unhealthy, or None: a child being killed, or one silent for half the
    heartbeat timeout (heartbeats come every second: it missed many, and is hung in all
    likelihood; the master kills it at the full timeout). The watchdog pings stop from that
    moment until the replacement is forked.

    A degraded child (its receives keep failing) does not count here: the broker is what
    fails, and systemd restarting the service would not mend it, only add a restart storm to
    an outage. It shows in ``STATUS=``, ``ebsqs status`` and ``ebsqs healthcheck`` instead."""
    limit = stale_after(heartbeat_timeout)
    for child in snapshot.children:
        if child.phase is Phase.KILLING:
            return f"child {child.queue} #{child.slot} (pid {child.pid}) is being killed"
        if child.heartbeat_age > limit:
            return f"child {child.queue} #{child.slot} (pid {child.pid}) is silent"
    return None


def summary(snapshot: SupervisorSnapshot) -> str:
    """One line for ``systemctl status``: children up per queue, busy (and degraded) ones, and
    totals."""
    parts = []
    for queue, target in snapshot.targets.items():
        mine = [c for c in snapshot.children if c.queue == queue]
        up = sum(1 for c in mine if c.phase is Phase.RUNNING)
        busy = sum(1 for c in mine if c.state == "busy")
        degraded = sum(1 for c in mine if c.state == DEGRADED)
        parts.append(f"{queue} {up}/{target} up, {busy} busy")
        if degraded:
            parts[-1] += f", {degraded} degraded"
    counts = snapshot.counts
    state = "" if snapshot.state is MasterState.RUNNING else f"{snapshot.state}: "
    return (
        f"{state}{'; '.join(parts)}; done {counts.total('succeeded')}, "
        f"failed {counts.total('failed')}, restarts {snapshot.restarts}"
    )
