"""The management commands, in-process: arguments, errors, and queue-name resolution.

(They run the supervisor for real in ``test_supervised.py``.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from ebsqs.brokers import QueueSettings
from ebsqs.brokers.memory import MemoryBroker
from ebsqs.config import Settings
from ebsqs.contrib.django.cli import has_command
from ebsqs.contrib.django.queues import resolve_queues
from ebsqs.errors import ConfigurationError

pytestmark = pytest.mark.timeout(15)


@pytest.fixture(autouse=True)
def _no_ebsqs_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import os

    for name in list(os.environ):
        if name.startswith("EBSQS_"):
            monkeypatch.delenv(name)
    with override_settings(EBSQS={"broker_url": "memory://cmd"}):
        yield


def test_process_queue_without_queues_is_a_command_error() -> None:
    with pytest.raises(CommandError, match=r"Queue names \(--queues\) not specified"):
        call_command("process_queue")
    with pytest.raises(CommandError, match=r"Queue names \(--queues\) not specified"):
        call_command("process_queue", "--queues", " , ")


def test_process_queue_accepts_the_supervisor_options() -> None:
    from django.core.management import load_command_class

    command = load_command_class("ebsqs.contrib.django", "process_queue")
    parser = command.create_parser("manage.py", "process_queue")
    options = vars(
        parser.parse_args(
            ["--queues", "a", "--workers", "3", "--executor", "thread", "--graceful-timeout", "5"]
        )
    )
    from ebsqs.contrib.django.cli import cli_argv

    assert cli_argv(options, "supervise", ("queues",)) == [
        "--executor",
        "thread",
        "--workers",
        "3",
        "--graceful-timeout",
        "5",
    ]


def test_process_queue_reports_supervisor_usage_errors() -> None:
    with pytest.raises(CommandError, match="--workers"):
        call_command("process_queue", "--queues", "a", "--workers", "0")


def test_process_queue_refuses_a_soft_time_limit_over_the_hard_one() -> None:
    with pytest.raises(CommandError, match=r"the soft limit \(90 s\) is over the hard limit"):
        call_command(
            "process_queue", "--queues", "a", "--time-limit", "60", "--soft-time-limit", "90"
        )


def test_process_queue_refuses_an_unwritable_pidfile(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CommandError, match=r"cannot write .*: Not a directory"):
        call_command("process_queue", "--queues", "a", "--pidfile", str(blocker / "m.pid"))
    assert blocker.read_text() == ""


def test_process_queue_prefix_entry_matching_nothing_is_a_command_error() -> None:
    with pytest.raises(CommandError, match="no queue matches 'prefix:nothing-'"):
        call_command("process_queue", "--queues", "a, prefix:nothing-")


def settings(prefix: str = "") -> Settings:
    return Settings(broker_url="memory://resolve", queue_prefix=prefix)


def test_queue_entries_are_whitespace_tolerant() -> None:
    broker = MemoryBroker.named("resolve")
    assert resolve_queues(["a", " b ", "c:4"], settings(), broker) == ["a", "b", "c:4"]


def test_prefix_entries_resolve_with_the_queue_prefix_and_skip_dead_letters() -> None:
    broker = MemoryBroker.named("resolve")
    for name in ("shop-pr1-x", "shop-pr1-y", "shop-pr2-z", "other-pr1-w"):
        broker.ensure_queue(name, QueueSettings(dead_letter_queue=f"{name}-dlq"))

    found = resolve_queues(["a", "prefix:pr1-"], settings("shop-"), broker)

    assert found == ["a", "pr1-x", "pr1-y"]


def test_names_already_carrying_the_prefix_are_taken_as_full_names() -> None:
    """django-eb-sqs's process_queue took full names: `--queues eb-sqs-emails` keeps working."""
    broker = MemoryBroker.named("resolve")
    broker.ensure_queue("eb-sqs-emails-archive")
    found = resolve_queues(
        ["eb-sqs-emails", "default", "prefix:eb-sqs-emails-"], settings("eb-sqs-"), broker
    )
    assert found == ["emails", "default", "emails-archive"]


def test_prefix_entry_without_match_raises() -> None:
    with pytest.raises(ConfigurationError, match="no queue matches"):
        resolve_queues(["prefix:zzz"], settings(), MemoryBroker.named("resolve"))


def test_ebsqs_command_passes_arguments_to_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    MemoryBroker.named("cmd").ensure_queue("listed-here")
    call_command("ebsqs", "queues", "list", "--prefix", "listed")
    assert capsys.readouterr().out.split() == ["listed-here"]


def test_ebsqs_command_sees_django_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with override_settings(EBSQS={"broker_url": "memory://cmd", "queue_prefix": "dj-"}):
        call_command("ebsqs", "queues", "create", "jobs")
    assert "dj-jobs" in capsys.readouterr().out
    assert "dj-jobs" in MemoryBroker.named("cmd").list_queues("dj-")


def test_ebsqs_command_without_arguments_shows_the_commands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    call_command("ebsqs")
    out = capsys.readouterr().out
    assert "supervise" in out and "queues" in out


def test_ebsqs_command_usage_error_is_a_command_error() -> None:
    with pytest.raises(CommandError, match="No such command 'nonsense'"):
        call_command("ebsqs", "nonsense")


def test_healthcheck_without_a_supervisor_fails(tmp_path: Path) -> None:
    if not has_command("healthcheck"):
        with pytest.raises(CommandError, match="has no `ebsqs healthcheck` command"):
            call_command("healthcheck")
        return
    missing = str(tmp_path / "ebsqs.status.json")
    with pytest.raises(CommandError, match="healthcheck exited with status 1"):
        call_command("healthcheck", "--status-file", missing)
