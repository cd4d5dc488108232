"""``ebsqs systemd-unit``'s flags, in-process (the unit text itself: test_systemd.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

from ebsqs.cli import main
from ebsqs.ops.cli import systemd_unit
from ebsqs.ops.systemd import ebsqs_program


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``ebsqs``'s group callback configures structlog (warning level) for the process."""
    yield
    structlog.reset_defaults()


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(systemd_unit, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def exec_start(unit: str) -> str:
    return next(line for line in unit.splitlines() if line.startswith("ExecStart="))


def test_unknown_flags_go_to_supervise_in_order() -> None:
    code, unit, _ = run(
        "--app", "myapp.tasks", "--user", "ebsqs", "--queues", "a:2,b", "--graceful-timeout", "50"
    )
    assert code == 0
    program = " ".join(ebsqs_program())
    assert exec_start(unit) == (
        f"ExecStart={program} supervise --app myapp.tasks --queues a:2,b "
        "--graceful-timeout 50 --heartbeat-timeout 30 --status-file %t/ebsqs/status.json"
    )
    assert "User=ebsqs" in unit.splitlines()
    assert "TimeoutStopSec=65" in unit.splitlines()


def test_working_directory_defaults_to_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _, unit, _ = run("--queues", "a")
    assert f"WorkingDirectory={tmp_path}" in unit.splitlines()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--", "--status-file", "/x"], "--status-file is written by systemd-unit"),
        (["--", "--heartbeat-timeout=5"], "--heartbeat-timeout is written by systemd-unit"),
        (["--template", "--queues", "a"], "no --queues"),
        (["--working-directory", "relative"], None),
        (["--environment-file", "env"], "absolute"),
    ],
)
def test_bad_combinations_are_refused(args: list[str], message: str | None) -> None:
    code, unit, error = run(*args)
    if message is None:  # a relative working directory is made absolute, not refused
        assert code == 0
        return
    assert code == 2
    assert message in error
    assert unit == ""


def test_this_shell_s_settings_are_pointed_out() -> None:
    code, _, error = run("--queues", "a", env={"EBSQS_BROKER_URL": "sqs://"})
    assert code == 0
    assert "EBSQS_BROKER_URL" in error and "--environment-file" in error
    _, _, quiet = run(
        "--queues", "a", "--environment-file", "/etc/e", env={"EBSQS_BROKER_URL": "sqs://"}
    )
    assert quiet == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--app", "x", "--bogus", "1"], "No such option '--bogus'"),
        (["--workers", "many"], "Invalid value for '--workers'"),
        (["--app", "x", "stray"], "unexpected extra argument"),
    ],
)
def test_flags_are_checked_by_supervise_s_parser(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["systemd-unit", *args])
    assert result.exit_code == 2
    assert "not a valid supervise command line" in result.stderr
    assert message in result.stderr


def test_queues_may_come_from_the_environment_file_or_the_instance() -> None:
    for args in (["--app", "x"], ["--template", "--app", "x"]):
        assert CliRunner().invoke(main, ["systemd-unit", *args]).exit_code == 0
