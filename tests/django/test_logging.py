"""``manage.py ebsqs ...`` and ``process_queue`` respect ``LOGGING`` when it configures the root
or the ``ebsqs`` logger: ebsqs's lines go to the project's handlers, in its format, and ebsqs
adds no handler of its own. Without such a ``LOGGING``, ebsqs writes its JSON lines to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.django.conftest import djproject_env
from tests.django.helpers import managed, stop
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

WORKER = ("ebsqs", "worker", "--queues", "a", "--wait", "1", "--log-format", "json")
PROCESS_QUEUE = ("process_queue", "--queues", "a", "--workers", "1", "--wait", "1")


def env_for(tmp_path: Path, logging: str | None) -> dict[str, str]:
    extra = {"EBSQS_BROKER_URL": f"sqlite:///{tmp_path / 'broker.db'}"}
    if logging is not None:
        extra |= {
            "DJANGO_SETTINGS_MODULE": "djproject.settings_logging",
            "DJPROJECT_LOGGING": logging,
            "DJPROJECT_LOG_FILE": str(tmp_path / "project.log"),
        }
    return djproject_env(**extra)


def json_events(path: Path, name: str) -> list[dict[str, object]]:
    found = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == name:
            found.append(event)
    return found


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.parametrize("logging", ["root", "ebsqs"])
@pytest.mark.parametrize("command", [WORKER, PROCESS_QUEUE], ids=["ebsqs-worker", "process_queue"])
def test_logging_that_configures_root_or_ebsqs_gets_ebsqs_lines(
    tmp_path: Path, logging: str, command: tuple[str, ...]
) -> None:
    project_log, output = tmp_path / "project.log", tmp_path / "output.log"
    with managed(*command, env=env_for(tmp_path, logging), log=output) as process:
        wait_until(
            lambda: "|worker_started" in text(project_log) or process.poll() is not None,
            30,
            message=lambda: f"project log:\n{text(project_log)}\noutput:\n{text(output)}",
        )
        assert stop(process) == 0, text(output)

    assert "INFO|ebsqs.worker.loop|worker_started" in text(project_log)
    assert not json_events(output, "worker_started"), "ebsqs added a handler of its own"


def test_without_such_logging_ebsqs_writes_its_own_json_lines(tmp_path: Path) -> None:
    output = tmp_path / "output.log"
    with managed(*WORKER, env=env_for(tmp_path, None), log=output) as process:
        wait_until(
            lambda: json_events(output, "worker_started") or process.poll() is not None,
            30,
            message=lambda: text(output),
        )
        assert stop(process) == 0, text(output)

    [started] = json_events(output, "worker_started")
    assert started["level"] == "info" and started["role"] == "worker"
