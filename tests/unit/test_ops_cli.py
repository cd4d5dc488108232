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

pytestmark = pytest.mark.timeout(30)


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
        (["--queues", "a", "--working-directory", "relative"], None),
        (["--queues", "a", "--environment-file", "env"], "absolute"),
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


def test_this_shell_s_settings_are_pointed_out(tmp_path: Path) -> None:
    code, _, error = run("--queues", "a", env={"EBSQS_BROKER_URL": "sqs://"})
    assert code == 0
    assert "EBSQS_BROKER_URL" in error and "--environment-file" in error
    env_file = tmp_path / "ebsqs.env"
    env_file.write_text("EBSQS_BROKER_URL=sqs://\n")
    _, _, quiet = run(
        "--queues", "a", "--environment-file", str(env_file), env={"EBSQS_BROKER_URL": "sqs://"}
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


def test_queues_may_come_from_the_environment_file_or_the_instance(tmp_path: Path) -> None:
    env_file = tmp_path / "ebsqs.env"
    env_file.write_text("# the queues\nEBSQS_QUEUES='emails,reports'\n")
    for args in (["--app", "x", "--environment-file", str(env_file)], ["--template", "--app", "x"]):
        assert CliRunner().invoke(main, ["systemd-unit", *args]).exit_code == 0


def test_a_unit_without_queues_is_refused(tmp_path: Path) -> None:
    code, unit, error = run("--app", "x")
    assert (code, unit) == (2, "")
    assert "the unit names no queues, so it could not start: add --queues" in error
    # An environment file that cannot be read here cannot vouch for them, and is named.
    code, unit, error = run("--app", "x", "--environment-file", str(tmp_path / "missing.env"))
    assert (code, unit) == (2, "")
    assert "missing.env cannot be read here" in error


def writable(unit: str) -> list[str]:
    return [line for line in unit.splitlines() if line.startswith("ReadWritePaths=")]


def test_the_sqlite_broker_s_directory_is_writable(tmp_path: Path) -> None:
    app = ["--app", "x", "--queues", "a", "--working-directory", "/srv/app"]
    assert writable(run(*app, "--broker", "sqlite:////var/lib/ebsqs/q.db")[1]) == [
        "ReadWritePaths=-/var/lib/ebsqs"
    ]
    assert writable(run(*app, "--broker=sqlite:///data/q.db")[1]) == [
        "ReadWritePaths=-/srv/app/data"
    ]
    # No broker named anywhere: the default, a SQLite file in the working directory.
    assert writable(run(*app)[1]) == ["ReadWritePaths=-/srv/app"]
    assert writable(run(*app, "--broker", "sqs://eu-west-1")[1]) == []
    env_file = tmp_path / "ebsqs.env"
    env_file.write_text("EBSQS_BROKER_URL=sqlite:////var/lib/q/b.db\nEBSQS_PIDFILE=/run/x/e.pid\n")
    code, unit, _ = run(*app, "--environment-file", str(env_file))
    assert code == 0
    assert writable(unit) == ["ReadWritePaths=-/var/lib/q", "ReadWritePaths=-/run/x"]


def test_the_pidfile_s_directory_is_writable() -> None:
    code, unit, _ = run("--queues", "a", "--broker", "sqs://", "--pidfile", "/var/run/ebsqs/m.pid")
    assert code == 0
    assert writable(unit) == ["ReadWritePaths=-/var/run/ebsqs"]


def test_an_unreadable_environment_file_may_name_a_sqlite_broker(tmp_path: Path) -> None:
    missing = str(tmp_path / "root-only.env")
    code, unit, error = run("--queues", "a", "--environment-file", missing)
    assert code == 0
    assert writable(unit) == []
    assert f"note: cannot read {missing} here" in error and "--broker" in error


@pytest.mark.parametrize(
    ("limits", "says"),
    [
        (["--time-limit", "60", "--soft-time-limit", "61"], "the soft limit (61 s) is over"),
        (
            ["--soft-time-limit", "emails=90", "--time-limit", "emails=60,*=600"],
            "the soft limit for queue emails (90 s) is over the hard limit (60 s",
        ),
        (["--time-limit", "emails=60", "--soft-time-limit", "120"], "for queue emails"),
        (["--time-limit", "sixty"], "Invalid value for '--time-limit'"),
    ],
)
def test_a_soft_time_limit_over_the_hard_one_is_refused(limits: list[str], says: str) -> None:
    for command in (["worker"], ["supervise"], ["systemd-unit"]):
        result = CliRunner().invoke(main, [*command, "--queues", "a", *limits])
        assert result.exit_code == 2, (command, result.output)
        assert says in result.stderr, (command, result.stderr)


def test_a_soft_time_limit_under_the_hard_one_is_accepted() -> None:
    limits = ["--time-limit", "emails=60,*=600", "--soft-time-limit", "emails=50,*=60"]
    result = CliRunner().invoke(main, ["systemd-unit", "--queues", "a", *limits])
    assert result.exit_code == 0, result.stderr
