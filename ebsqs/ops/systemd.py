"""systemd integration: the sd_notify protocol, the watchdog interval, and unit-file text.

sd_notify is spoken on the socket itself, as ``sd_notify(3)`` documents it, so no libsystemd
is needed: each message is one datagram of ``KEY=value`` lines sent to the ``AF_UNIX``
``SOCK_DGRAM`` socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace). Outside systemd the variable is unset and nothing is sent.

Only the master notifies. Its children report to it over their heartbeat pipes and it speaks
for the whole pool, which is why the unit says ``NotifyAccess=main``: a task that happens to
start something sd_notify-aware can never tell systemd the service is ready or stopping.

The unit :func:`render_unit` writes uses ``KillMode=mixed``. Children drain on a direct SIGTERM
too, so the default ``KillMode=control-group`` also stops cleanly; ``mixed`` is
still better: SIGTERM reaches the master only, which drains its children in order (stop
receiving, release prefetched messages, finish running tasks, send ``EXTEND_TIMEOUT_USEC`` while
that makes progress) instead of racing them, and programs that tasks started (a subprocess a
task waits on) are not stopped mid-task by a signal aimed at the whole group. At
``TimeoutStopSec`` systemd still sends SIGKILL to every process left, so nothing outlives the
unit.

The unit is also sandboxed (:data:`SANDBOX`): read-only system, no capabilities, no devices, a
private /tmp, home directories hidden, a system call filter, and write access only to the
RuntimeDirectory and the directories it names in ``ReadWritePaths`` (the SQLite broker's, the
pidfile's). ``systemd-analyze security`` rates it well under 4 ("OK"); the tests check that.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
import time
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ebsqs.config import DEFAULT_GRACEFUL_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT
from ebsqs.errors import ExitCode
from ebsqs.log import get_logger

log = get_logger(__name__)

#: The variables systemd passes to a notify service.
NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID = "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"

#: Seconds a notification may wait for room in systemd's receive queue before it is dropped.
SEND_TIMEOUT = 1.0

#: Seconds of stop timeout beyond the graceful timeout: time for the master to SIGKILL what is
#: left, release messages and exit before systemd kills everything itself.
STOP_MARGIN = 15.0

#: Exit codes after which systemd must not restart the service: a restart meets the same bad
#: flags (:attr:`ExitCode.USAGE`) or the same broken app or configuration
#: (:attr:`ExitCode.BOOT`). :attr:`ExitCode.ERROR` is left out on purpose: it is also how an
#: unexpected crash ends (an uncaught exception, a fast stop), which a restart may well cure.
#: What keeps a service that fails with it every time from restarting forever is the start
#: limit (:data:`START_LIMIT_BURST` starts in :data:`START_LIMIT_INTERVAL` seconds).
NO_RESTART_EXIT_CODES: tuple[ExitCode, ...] = (ExitCode.USAGE, ExitCode.BOOT)
#: Starts within :data:`START_LIMIT_INTERVAL` after which systemd gives up on the service.
START_LIMIT_BURST = 5
#: Seconds over which starts are counted; with ``RestartSec=5``, five quick failures in a row.
START_LIMIT_INTERVAL = 300

#: Where home directories live: ``ProtectHome=yes`` hides them, so a unit whose program,
#: working directory or writable paths are there gets ``ProtectHome=read-only`` instead.
HOME_ROOTS = ("/home", "/root", "/run/user")

#: The sandbox of the service (systemd.exec(5)), aiming at ``systemd-analyze security`` exposure
#: well under 4. What ebsqs needs is left open: the network (SQS, metrics), AF_UNIX (sd_notify),
#: its own processes in /proc (psutil), the RuntimeDirectory (the status file: systemd keeps it
#: writable under ProtectSystem=strict), and the ReadWritePaths the unit names.
SANDBOX: tuple[str, ...] = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "PrivateMounts=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    # Other users' processes are hidden; the master watches only its own children. Not
    # ProcSubset=pid: psutil reads the boot time in /proc/stat to date process starts.
    "ProtectProc=invisible",
    "RestrictNamespaces=yes",
    "LockPersonality=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "RemoveIPC=yes",
    # Tried with the kernel's equivalent (PR_SET_MDWE): CPython 3.11, ctypes callbacks
    # (libffi's static trampolines), ssl, sqlite3, boto3, fork and every executor run without
    # writable-and-executable memory. Tasks that use a JIT (numba, PyPy) need it removed.
    "MemoryDenyWriteExecute=yes",
    "SystemCallArchitectures=native",
    "SystemCallFilter=@system-service",
    "SystemCallErrorNumber=EPERM",
    "CapabilityBoundingSet=",
    "AmbientCapabilities=",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    # Files are the service user's alone; the status file is made 0644 on purpose (so
    # operators can run `ebsqs status`), and the RuntimeDirectory stays 0755.
    "UMask=0077",
)


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET``; does nothing when there is none.

    Sending never raises into the caller: a failure is logged once (``sd_notify_failed``) and
    later failures stay quiet, since the master's loop must not stop over its reporting.

    A socket is opened per message, as libsystemd does, so nothing is shared across fork.

    Attributes:
        address: the socket address (abstract names start with a NUL byte), or None.
        watchdog_interval: seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec``), or
            None when systemd runs no watchdog for this process.
    """

    def __init__(self, address: str | None, watchdog_interval: float | None = None) -> None:
        self.address = _socket_address(address) if address else None
        self.watchdog_interval = watchdog_interval if self.address else None
        self._failed = False
        self._last_ping: float | None = None

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = False
    ) -> Notifier:
        """The notifier systemd set up for this process.

        Args:
            environ: where to read (default ``os.environ``).
            unset: remove the variables afterwards (as ``sd_notify(unset_environment=1)``), so
                forked children and the programs tasks start never inherit them.
        """
        env = os.environ if environ is None else environ
        notifier = cls(env.get(NOTIFY_SOCKET) or None, watchdog_interval(env, os.getpid()))
        if unset:
            for name in (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID):
                env.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; True when it was sent.

        Values must be single lines (see :func:`one_line`).
        """
        if self.address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendto(payload, self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("sd_notify_failed", socket=_printable(self.address), error=repr(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: startup (or a reload) finished; optionally with a status line."""
        return self.notify("READY=1", *([f"STATUS={one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        """``STATUS=``: a one-line summary shown by ``systemctl status``."""
        return self.notify(f"STATUS={one_line(text)}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is alive and healthy."""
        return self.notify("WATCHDOG=1")

    def watchdog_due(self, now: float) -> bool:
        """True when a watchdog is armed and half its interval passed since the last ping.

        Args:
            now: ``time.monotonic()``.
        """
        if self.watchdog_interval is None:
            return False
        return self._last_ping is None or now - self._last_ping >= self.watchdog_interval

    def ping_watchdog(self, now: float) -> bool:
        """Send ``WATCHDOG=1`` if it is due (see :meth:`watchdog_due`); True when sent.

        The caller decides health: call this only while the service is healthy, so that the
        pings stop, and systemd eventually restarts the service, when it is not.
        """
        if not self.watchdog_due(now):
            return False
        self._last_ping = now
        return self.watchdog()

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC``; send :meth:`ready` when the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """``STOPPING=1``: the service is shutting down."""
        return self.notify("STOPPING=1")

    def extend_timeout(self, usec: int) -> bool:
        """``EXTEND_TIMEOUT_USEC=``: do not time out the current start/stop for ``usec`` more."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(int(usec), 0)}")


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between watchdog pings for process ``pid``: half of ``$WATCHDOG_USEC``.

    None when systemd runs no watchdog, or runs it for another process (``$WATCHDOG_PID``).
    """
    try:
        usec = int(environ.get(WATCHDOG_USEC, ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get(WATCHDOG_PID)
    if owner and owner != str(pid):
        return None
    return usec / 1e6 / 2


def one_line(text: str) -> str:
    """``text`` with line breaks collapsed: a notification value cannot span lines."""
    return " ".join(text.split())


def _socket_address(address: str) -> str | bytes:
    """``$NOTIFY_SOCKET`` as an address for ``sendto``: ``@name`` is the abstract ``\\0name``."""
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address


def _printable(address: str | bytes) -> str:
    if isinstance(address, bytes):
        return "@" + address[1:].decode(errors="replace")
    return address


# -- unit files ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnitOptions:
    """What goes into a unit file.

    Attributes:
        program: the command that runs ebsqs, absolute (``/venv/bin/ebsqs`` or
            ``/venv/bin/python -m ebsqs``); see :func:`ebsqs_program`.
        supervise_args: flags for ``supervise`` (``--app``, ``--queues``...), verbatim.
        graceful_timeout: passed to ``supervise`` and the base of ``TimeoutStopSec``.
        heartbeat_timeout: passed to ``supervise`` and the base of ``WatchdogSec``.
        watchdog_sec: ``WatchdogSec`` (default: see :func:`default_watchdog_sec`); 0 disables.
        user: ``User=``, or None (root for a system unit).
        group: ``Group=``, or None.
        working_directory: ``WorkingDirectory=`` (absolute): where ``--app`` modules import from.
        environment_files: ``EnvironmentFile=`` lines (a leading ``-`` makes one optional).
        template: write ``ebsqs@.service``, whose instance name is the queue list.
        description: ``Description=``.
        read_write_paths: directories the service writes besides its RuntimeDirectory (the
            SQLite broker's, the pidfile's), absolute; everything else is read-only.
    """

    program: tuple[str, ...]
    supervise_args: tuple[str, ...] = ()
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    watchdog_sec: float | None = None
    user: str | None = None
    group: str | None = None
    working_directory: str | None = None
    environment_files: tuple[str, ...] = field(default_factory=tuple)
    template: bool = False
    description: str | None = None
    read_write_paths: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.program or not os.path.isabs(self.program[0]):
            raise ValueError(f"the program must be an absolute path, got {self.program!r}")
        if self.working_directory is not None and not os.path.isabs(self.working_directory):
            raise ValueError(f"WorkingDirectory must be absolute, got {self.working_directory!r}")
        for path in self.environment_files:
            if not os.path.isabs(path.removeprefix("-")):
                raise ValueError(f"EnvironmentFile must be absolute, got {path!r}")
        for path in self.read_write_paths:
            if not os.path.isabs(path):
                raise ValueError(f"ReadWritePaths must be absolute, got {path!r}")
        if self.graceful_timeout < 0 or self.heartbeat_timeout <= 0:
            raise ValueError("timeouts must be positive")


def ebsqs_program(executable: str = sys.executable) -> tuple[str, ...]:
    """The absolute command that runs ebsqs from this environment.

    The ``ebsqs`` console script next to the interpreter when there is one (a virtualenv's
    ``bin/``), else ``<interpreter> -m ebsqs``. Paths are absolute but symlinks are kept: a
    virtualenv's ``bin/python`` must not be resolved to the system interpreter behind it.
    """
    interpreter = os.path.abspath(executable)
    script = Path(interpreter).with_name("ebsqs")
    if script.is_file() and os.access(script, os.X_OK):
        return (str(script),)
    return (interpreter, "-m", "ebsqs")


def stop_timeout(graceful_timeout: float) -> int:
    """``TimeoutStopSec``: the graceful timeout plus :data:`STOP_MARGIN`, whole seconds."""
    return int(graceful_timeout + STOP_MARGIN + 0.999)


def default_watchdog_sec(heartbeat_timeout: float) -> int:
    """``WatchdogSec``: long enough that one hung child never restarts the whole service.

    The master stops pinging while a child is hung, until it is replaced: that takes up to the
    heartbeat timeout, the SIGABRT grace and a boot. Twice the heartbeat timeout plus 30 s leaves
    room for all three, so only a master that cannot recover (its own loop stuck, or children
    it cannot replace) is restarted by systemd.
    """
    return int(2 * heartbeat_timeout + 30 + 0.999)


def render_unit(options: UnitOptions) -> str:
    """The text of a systemd service unit running ``ebsqs supervise``.

    See the module docstring for ``NotifyAccess=main`` and ``KillMode=mixed``,
    :data:`NO_RESTART_EXIT_CODES` for what is never restarted, and :data:`SANDBOX` for the
    hardening.
    """
    instance = " (%I)" if options.template else ""
    description = options.description or "ebsqs task queue workers"
    runtime = "ebsqs/%i" if options.template else "ebsqs"
    watchdog = options.watchdog_sec
    if watchdog is None:
        watchdog = default_watchdog_sec(options.heartbeat_timeout)
    unit = [
        "[Unit]",
        f"Description={_escape_specifiers(description)}{instance}",
        "Wants=network-online.target",
        "After=network-online.target",
        f"StartLimitIntervalSec={START_LIMIT_INTERVAL}",
        f"StartLimitBurst={START_LIMIT_BURST}",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={_exec_start(options, runtime)}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={stop_timeout(options.graceful_timeout)}",
        f"WatchdogSec={_seconds(watchdog)}",
        "Restart=on-failure",
        "RestartSec=5",
        "RestartPreventExitStatus=" + " ".join(str(int(code)) for code in NO_RESTART_EXIT_CODES),
        f"RuntimeDirectory={runtime}",
        *_optional("User", options.user),
        *_optional("Group", options.group),
        *_optional("WorkingDirectory", options.working_directory),
        *(f"EnvironmentFile={path}" for path in options.environment_files),
        "Environment=PYTHONUNBUFFERED=1",
        *_sandbox(options),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(unit) + "\n"


def _sandbox(options: UnitOptions) -> list[str]:
    """:data:`SANDBOX`, ``ProtectHome`` and the unit's ``ReadWritePaths``."""
    # "-": a directory missing at start is not a namespace failure (status 226) but the
    # broker's own error in the journal, which names the file.
    writable = [f"ReadWritePaths={_path_word(f'-{path}')}" for path in options.read_write_paths]
    return [*SANDBOX, f"ProtectHome={protect_home(options)}", *writable]


def protect_home(options: UnitOptions) -> str:
    """``yes`` (home directories hidden), or ``read-only`` when the unit needs a path in one."""
    paths = [options.program[0], options.working_directory or "/", *options.read_write_paths]
    in_home = any(
        path == root or path.startswith(root + "/") for path in paths for root in HOME_ROOTS
    )
    return "read-only" if in_home else "yes"


def sqlite_directory(broker_url: str, working_directory: str) -> str | None:
    """The directory of a ``sqlite:///`` broker's database (SQLite writes its journal beside
    it), or None for other brokers. A relative path is relative to ``working_directory``."""
    if not broker_url.startswith("sqlite:///"):
        return None
    path = broker_url[len("sqlite:///") :]
    return os.path.dirname(os.path.normpath(os.path.join(working_directory, path)))


def _exec_start(options: UnitOptions, runtime: str) -> str:
    """``ExecStart=``: absolute program, ``supervise``, the user's flags, then ours."""
    ours = [
        "--graceful-timeout",
        _seconds(options.graceful_timeout),
        "--heartbeat-timeout",
        _seconds(options.heartbeat_timeout),
    ]
    words = [_exec_word(word) for word in (*options.program, "supervise", *options.supervise_args)]
    words += [_exec_word(word) for word in ours]
    if options.template:
        words += ["--queues", "%I"]
    # The status file lives in the unit's RuntimeDirectory (%t is /run, or $XDG_RUNTIME_DIR for
    # a user unit), where `ebsqs status` looks for it.
    words += ["--status-file", f"%t/{runtime}/status.json"]
    return " ".join(words)


def _exec_word(word: str) -> str:
    """One command-line word, quoted the way systemd.service(5) reads ``ExecStart=``."""
    word = _escape_specifiers(word).replace("$", "$$")
    if word and not any(ch in word for ch in " \t\"'\\;"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _path_word(path: str) -> str:
    """A path in a space-separated list setting (``ReadWritePaths=``): quoted if it must be."""
    path = _escape_specifiers(path)
    return f'"{path}"' if any(ch.isspace() for ch in path) else path


def _escape_specifiers(text: str) -> str:
    return text.replace("%", "%%")


def _optional(key: str, value: str | None) -> Iterable[str]:
    return [f"{key}={value}"] if value else []


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def describe_command(words: Sequence[str]) -> str:
    """A shell-quoted command line, for messages and docs."""
    return shlex.join(words)
