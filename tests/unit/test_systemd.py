"""sd_notify over a real AF_UNIX datagram socket, the watchdog interval, and unit-file text."""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ebsqs.errors import ExitCode
from ebsqs.ops import systemd
from ebsqs.ops.systemd import Notifier, UnitOptions, render_unit

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in ``tmp_path``, standing in for systemd; and its path."""
    path = str(tmp_path / "notify")
    if len(path) >= 100:  # sun_path holds 108 bytes
        pytest.skip(f"tmp_path is too long for a Unix socket path: {path}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path


def received(sock: socket.socket) -> list[str]:
    """The lines of the next datagram."""
    return sock.recv(4096).decode().split("\n")


@pytest.mark.timeout(10)
def test_messages_reach_the_socket(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier(path)
    assert notifier.enabled
    assert notifier.ready("3 children\nup")
    assert received(sock) == ["READY=1", "STATUS=3 children up"]
    assert notifier.status("emails: 2 busy")
    assert received(sock) == ["STATUS=emails: 2 busy"]
    assert notifier.watchdog()
    assert received(sock) == ["WATCHDOG=1"]
    assert notifier.stopping()
    assert received(sock) == ["STOPPING=1"]
    assert notifier.extend_timeout(20_000_000)
    assert received(sock) == ["EXTEND_TIMEOUT_USEC=20000000"]


@pytest.mark.timeout(10)
def test_reloading_carries_the_monotonic_clock(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier(path).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, monotonic = received(sock)
    assert reloading == "RELOADING=1"
    key, value = monotonic.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


@pytest.mark.timeout(10)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux's")
def test_abstract_namespace_address() -> None:
    name = f"ebsqs-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert Notifier(f"@{name}").ready()
        assert received(sock) == ["READY=1"]


def test_nothing_is_sent_without_notify_socket() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.ready()
    assert not notifier.ping_watchdog(time.monotonic())


def test_a_failure_is_logged_once_and_never_raised(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    with capture_logs() as logs:
        assert not notifier.ready()
        assert not notifier.status("x")
    failures = [entry for entry in logs if entry["event"] == "sd_notify_failed"]
    assert len(failures) == 1
    assert failures[0]["socket"].endswith("nobody-listens")


def test_from_environ_can_unset_the_variables(notify_socket: tuple[socket.socket, str]) -> None:
    _, path = notify_socket
    env = {
        "NOTIFY_SOCKET": path,
        "WATCHDOG_USEC": "4000000",
        "WATCHDOG_PID": str(os.getpid()),
        "OTHER": "kept",
    }
    notifier = Notifier.from_environ(env, unset=True)
    assert notifier.enabled
    assert notifier.watchdog_interval == 2.0
    assert env == {"OTHER": "kept"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42"}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "43"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    env: dict[str, str], expected: float | None
) -> None:
    assert systemd.watchdog_interval(env, pid=42) == expected


@pytest.mark.timeout(10)
def test_watchdog_pings_at_the_interval(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier(path, watchdog_interval=1.0)
    assert notifier.ping_watchdog(100.0)
    assert not notifier.ping_watchdog(100.5)
    assert notifier.ping_watchdog(101.0)
    assert received(sock) == ["WATCHDOG=1"]
    assert received(sock) == ["WATCHDOG=1"]


def test_no_watchdog_without_a_socket() -> None:
    assert Notifier(None, watchdog_interval=1.0).watchdog_interval is None


# -- unit text -----------------------------------------------------------------------------

PROGRAM = ("/opt/app/.venv/bin/ebsqs",)


def unit_lines(**options: object) -> list[str]:
    return render_unit(UnitOptions(program=PROGRAM, **options)).splitlines()  # type: ignore[arg-type]


def test_unit_has_the_notify_service_settings() -> None:
    lines = unit_lines(
        supervise_args=("--app", "myapp.tasks", "--queues", "emails,reports"),
        graceful_timeout=60,
        heartbeat_timeout=20,
        user="ebsqs",
        group="ebsqs",
        working_directory="/srv/myapp",
        environment_files=("/etc/ebsqs/env", "-/etc/ebsqs/local.env"),
    )
    assert "Type=notify" in lines
    assert "NotifyAccess=main" in lines
    assert (
        "ExecStart=/opt/app/.venv/bin/ebsqs supervise --app myapp.tasks --queues emails,reports "
        "--graceful-timeout 60 --heartbeat-timeout 20 --status-file %t/ebsqs/status.json"
    ) in lines
    assert "ExecReload=/bin/kill -HUP $MAINPID" in lines
    assert "KillMode=mixed" in lines
    assert "TimeoutStopSec=75" in lines
    assert "WatchdogSec=70" in lines
    assert "Restart=on-failure" in lines
    assert "RestartPreventExitStatus=2 3" in lines
    assert "RuntimeDirectory=ebsqs" in lines
    assert "User=ebsqs" in lines
    assert "Group=ebsqs" in lines
    assert "WorkingDirectory=/srv/myapp" in lines
    assert "EnvironmentFile=/etc/ebsqs/env" in lines
    assert "EnvironmentFile=-/etc/ebsqs/local.env" in lines
    assert "WantedBy=multi-user.target" in lines


def test_stop_timeout_exceeds_the_graceful_timeout() -> None:
    for graceful in (0, 1, 29.5, 30, 600):
        assert systemd.stop_timeout(graceful) > graceful


def test_unset_options_are_left_out() -> None:
    text = "\n".join(unit_lines())
    for key in ("User=", "Group=", "WorkingDirectory=", "EnvironmentFile="):
        assert key not in text


def test_template_unit_takes_the_queues_from_the_instance() -> None:
    lines = unit_lines(supervise_args=("--app", "myapp.tasks"), template=True)
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    assert exec_start.endswith("--queues %I --status-file %t/ebsqs/%i/status.json")
    assert "RuntimeDirectory=ebsqs/%i" in lines
    assert "Description=ebsqs task queue workers (%I)" in lines


def test_exec_start_words_are_quoted_for_systemd() -> None:
    lines = unit_lines(supervise_args=("--app", "my app", "--x", "100%", "--y", 'say "$HOME"'))
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    assert '--app "my app" --x 100%% --y "say \\"$$HOME\\""' in exec_start


def test_watchdog_can_be_set_or_disabled() -> None:
    assert "WatchdogSec=15" in unit_lines(watchdog_sec=15)
    assert "WatchdogSec=0" in unit_lines(watchdog_sec=0)


@pytest.mark.parametrize(
    "options",
    [
        {"program": ("ebsqs",)},
        {"program": PROGRAM, "working_directory": "srv"},
        {"program": PROGRAM, "environment_files": ("-env",)},
        {"program": PROGRAM, "read_write_paths": ("data",)},
    ],
)
def test_relative_paths_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="absolute"):
        UnitOptions(**options)  # type: ignore[arg-type]


def test_program_is_this_environment_s_ebsqs(tmp_path: Path) -> None:
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.touch()
    assert systemd.ebsqs_program(str(python)) == (str(python), "-m", "ebsqs")
    script = python.with_name("ebsqs")
    script.touch(mode=0o755)
    assert systemd.ebsqs_program(str(python)) == (str(script),)


def test_no_restart_after_usage_or_boot_errors_and_a_start_limit_for_the_rest() -> None:
    lines = unit_lines()
    [prevent] = [line for line in lines if line.startswith("RestartPreventExitStatus=")]
    codes = {ExitCode(int(code)) for code in prevent.split("=", 1)[1].split()}
    assert codes == {ExitCode.USAGE, ExitCode.BOOT}
    # 1 is also an unexpected crash, which a restart may cure: bounded by the start limit.
    assert ExitCode.ERROR not in codes
    unit_section = lines[: lines.index("[Service]")]
    assert f"StartLimitBurst={systemd.START_LIMIT_BURST}" in unit_section
    assert f"StartLimitIntervalSec={systemd.START_LIMIT_INTERVAL}" in unit_section


def test_unit_is_sandboxed() -> None:
    lines = unit_lines(working_directory="/srv/myapp")
    for setting in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectHome=yes",
        "UMask=0077",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallArchitectures=native",
        "MemoryDenyWriteExecute=yes",
    ):
        assert setting in lines, setting
    assert not [line for line in lines if line.startswith("ReadWritePaths=")]
    # Every sandbox line sits in [Service], none twice.
    service = lines[lines.index("[Service]") : lines.index("[Install]")]
    assert all(line in service for line in systemd.SANDBOX)
    assert len(set(systemd.SANDBOX)) == len(systemd.SANDBOX)


def test_read_write_paths_are_optional_and_quoted() -> None:
    lines = unit_lines(read_write_paths=("/var/lib/ebsqs", "/srv/my data"))
    assert "ReadWritePaths=-/var/lib/ebsqs" in lines
    assert 'ReadWritePaths="-/srv/my data"' in lines


@pytest.mark.parametrize(
    ("options", "protect_home"),
    [
        ({"working_directory": "/srv/app"}, "yes"),
        ({"working_directory": "/home/deploy/app"}, "read-only"),
        ({"program": ("/root/.venv/bin/ebsqs",)}, "read-only"),
        ({"read_write_paths": ("/home/deploy/data",)}, "read-only"),
        ({"working_directory": "/homework"}, "yes"),
    ],
)
def test_home_directories_are_hidden_unless_the_unit_needs_one(
    options: dict[str, object], protect_home: str
) -> None:
    text = render_unit(UnitOptions(**{"program": PROGRAM, **options}))  # type: ignore[arg-type]
    assert f"ProtectHome={protect_home}" in text.splitlines()


def test_sqlite_directory() -> None:
    assert systemd.sqlite_directory("sqlite:////var/lib/q.db", "/srv") == "/var/lib"
    assert systemd.sqlite_directory("sqlite:///data/q.db", "/srv/app") == "/srv/app/data"
    assert systemd.sqlite_directory("sqlite:///ebsqs.sqlite3", "/srv/app") == "/srv/app"
    assert systemd.sqlite_directory("sqs://eu-west-1", "/srv") is None
    assert systemd.sqlite_directory("memory://", "/srv") is None
