"""The dashboard's page logic and standalone app, in-process on the memory broker."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from ebsqs.brokers import OutgoingMessage, from_url
from ebsqs.brokers.base import Broker
from ebsqs.config import Settings
from ebsqs.counters import Counters, TaskStats
from ebsqs.dashboard import deadletters, pages, render, server, service
from ebsqs.dashboard.history import History, Sample, backlog_age, sparkline
from ebsqs.envelope import Envelope, encode
from ebsqs.ops.status import VERSION, write_status
from ebsqs.producer import ensure_queue
from ebsqs.worker.settle import ERROR, ERROR_TYPE, REASON, TASK, TRACEBACK

pytestmark = pytest.mark.timeout(30)

SETTINGS = Settings(broker_url="memory://dashboard")
CTX = render.Context("/", "csrf_token", "t0ken", can_manage=True)


@pytest.fixture
def broker() -> Broker:
    the_broker = from_url(SETTINGS.broker_url)
    for queue in ("alpha", "beta"):
        ensure_queue(the_broker, SETTINGS, SETTINGS.physical_queue(queue))
    return the_broker


def dead_letter(broker: Broker, label: str, queue: str = "alpha") -> None:
    body = encode(Envelope("app.charge", args=(label,), kwargs={"card": "4242"}))
    attributes = {REASON: "failed", ERROR_TYPE: "Boom", ERROR: f"no {label}", TASK: "app.charge"}
    broker.send(
        SETTINGS.dead_letter_queue(queue),
        OutgoingMessage(body, attributes={**attributes, TRACEBACK: "Traceback: line 1"}),
    )


def test_browsing_receives_each_letter_once_and_releases_it(broker: Broker) -> None:
    for i in range(12):
        dead_letter(broker, f"x{i}")
    dlq = SETTINGS.dead_letter_queue("alpha")
    letters = deadletters.browse(broker, dlq, show_arguments=False)
    assert len(letters) == 12 and len({d.message_id for d in letters}) == 12
    assert broker.stats(dlq).visible == 12  # released at once
    assert all(d.arguments == deadletters.REDACTED for d in letters)
    again = deadletters.browse(broker, dlq, show_arguments=True)
    assert {d.receive_count for d in again} == {2}  # one receive per view
    first = next(d for d in again if d.error == "no x3")
    assert first.task == "app.charge" and first.error_type == "Boom" and first.reason == "failed"
    assert "'x3'" in first.arguments and "card='4242'" in first.arguments
    assert first.traceback == "Traceback: line 1"


def test_selected_letters_are_redriven_or_deleted_and_the_rest_released(broker: Broker) -> None:
    for i in range(4):
        dead_letter(broker, f"x{i}")
    dlq, queue = SETTINGS.dead_letter_queue("alpha"), SETTINGS.physical_queue("alpha")
    ids = [d.message_id for d in deadletters.browse(broker, dlq, show_arguments=False)]
    assert deadletters.redrive_selected(broker, dlq, queue, ids[:2]) == 2
    assert broker.stats(queue).visible == 2 and broker.stats(dlq).visible == 2
    assert deadletters.delete_selected(broker, dlq, ids[2:3]) == 1
    assert broker.stats(dlq).visible == 1
    assert deadletters.redrive(broker, dlq, queue, None) == 1
    assert broker.stats(queue).visible == 3 and broker.stats(dlq).visible == 0


def test_a_delete_asks_first_then_deletes(broker: Broker) -> None:
    dead_letter(broker, "x")
    board = service.Dashboard(SETTINGS, ["alpha", "beta"], lambda: ([], []), broker=broker)
    ids = [d.message_id for d in deadletters.browse(broker, "alpha-dlq", show_arguments=False)]
    asked = board.act(CTX, "alpha", "delete-all", [], confirmed=False)
    assert asked.confirm is not None and "Yes, delete every dead letter" in asked.confirm
    assert broker.stats("alpha-dlq").visible == 1
    done = board.act(CTX, "alpha", "delete", ids, confirmed=True)
    assert (done.verb, done.count) == ("deleted", 1)
    assert service.notice({"deleted": "1"}) == "1 dead letter(s) deleted."
    assert service.notice({"deleted": "<b>"}) == ""
    with pytest.raises(service.UnknownQueue):
        board.act(CTX, "elsewhere", "redrive-all", [], confirmed=False)


def test_the_poller_samples_at_most_once_per_interval(broker: Broker) -> None:
    history = History()
    calls: list[float] = []

    def sampler(now: float) -> dict[str, Sample]:
        calls.append(now)
        return pages.read_depths(broker, SETTINGS, ["alpha", "beta"], now)

    assert history.sample_if_due(1000.0, sampler)
    assert not history.sample_if_due(1010.0, sampler)
    assert history.sample_if_due(1031.0, sampler)
    assert calls == [1000.0, 1031.0]
    assert History.from_json(json.loads(json.dumps(history.to_json()))).samples("alpha") == (
        history.samples("alpha")
    )
    assert history.samples("alpha")[-1].dead_letters == 0


def test_oldest_waiting_comes_from_the_samples() -> None:
    seen = [Sample(0.0, visible=0), Sample(30.0, visible=2), Sample(60.0, visible=5)]
    assert backlog_age(seen, 70.0) == (70.0, True)
    assert backlog_age(seen[1:], 70.0) == (40.0, False)
    assert backlog_age([Sample(0.0, visible=0)], 10.0) is None
    assert "<polyline" in sparkline([0, 2, 5])


def _document(pid: int, tasks: dict[str, TaskStats], uptime: float = 60.0) -> dict[str, Any]:
    counts = Counters(tasks=tasks)
    return {
        "version": VERSION,
        "written_at": time.time(),
        "master": {"pid": pid, "state": "running", "uptime": uptime, "heartbeat_timeout": 30},
        "targets": {"alpha": 1},
        "counts": counts.flat(),
        "restarts": 0,
        "children": [
            {
                "queue": "alpha",
                "slot": 1,
                "pid": pid + 1,
                "phase": "running",
                "state": "busy",
                "uptime": 10.0,
                "heartbeat_age": 0.2,
                "counts": {"succeeded": 3},
                "rss": 50 << 20,
                "restarts": 0,
                "task": {"name": "app.charge", "running_for": 4.0},
                "last_error": "failed: app.charge",
            }
        ],
        "tasks": dict(counts.task_wire()),
    }


def test_tasks_add_up_over_masters_with_percentiles() -> None:
    fast = TaskStats(succeeded=9, failed=1)
    for _ in range(9):
        fast.observe(0.002)
    fast.observe(2.0)
    docs = [_document(100, {"app.charge": fast}), _document(200, {"app.charge": fast})]
    [row] = pages.task_rows(docs)
    assert (row.succeeded, row.failed, row.attempts) == (18, 2, 20)
    assert row.failure_rate == pytest.approx(0.1)
    assert row.per_minute == pytest.approx(20.0)  # 10 a minute on each master
    assert row.p50 is not None and row.p50 < 0.005
    assert row.p95 is not None and 1.0 < row.p95 <= 2.5
    assert pages.percentile([0] * 17, 0.5) is None


def test_workers_come_from_status_files(tmp_path: Path) -> None:
    write_status(tmp_path / "a.json", _document(100, {}))
    (tmp_path / "broken.json").write_text("{")
    documents, problems = pages.status_documents([str(tmp_path)])
    [master] = pages.master_rows(documents)
    assert master.pid == 100 and not master.stale
    assert master.children[0].task == "app.charge" and master.children[0].state == "busy"
    assert len(problems) == 1 and "broken.json" in problems[0]
    html = render.workers_page(CTX, [master], problems)
    assert "app.charge" in html and "50.0 MiB" in html


def call(app: server.DashboardApp, path: str, **kw: Any) -> tuple[str, dict[str, str], str]:
    """One request through the WSGI app: status, headers (Set-Cookie joined), body."""
    method = kw.pop("method", "GET")
    form = urlencode(kw.pop("form", {}), doseq=True).encode()
    path, _, query = path.partition("?")
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "HTTP_COOKIE": kw.pop("cookie", ""),
        "HTTP_AUTHORIZATION": kw.pop("authorization", ""),
        "CONTENT_LENGTH": str(len(form)),
        "wsgi.input": io.BytesIO(form),
    }
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = status, headers

    body = b"".join(app(environ, start_response)).decode()
    headers: dict[str, str] = {}
    for name, value in seen["headers"]:
        headers[name] = f"{headers[name]}; {value}" if name in headers else value
    return seen["status"], headers, body


def test_standalone_forms_need_the_pages_csrf_token(broker: Broker) -> None:
    dead_letter(broker, "x")
    board = service.Dashboard(SETTINGS, ["alpha"], lambda: ([], []), broker=broker)
    app = server.DashboardApp(board, secret=b"s" * 32)
    status, headers, body = call(app, "/dead-letters?queue=alpha")
    assert status == "200 OK" and "no x" in body
    cookie = headers["Set-Cookie"].split(";")[0]
    token = body.split('name="csrf_token" value="')[1].split('"')[0]
    refused = call(app, "/dead-letters?queue=alpha", method="POST", cookie=cookie,
                   form={"action": "redrive-all", "csrf_token": "forged"})  # fmt: skip
    assert refused[0] == "403 Forbidden" and broker.stats("alpha-dlq").visible == 1
    done = call(app, "/dead-letters?queue=alpha", method="POST", cookie=cookie,
                form={"action": "redrive-all", "csrf_token": token})  # fmt: skip
    assert done[0] == "303 See Other" and done[1]["Location"].endswith("redriven=1")
    assert broker.stats("alpha").visible == 1
    assert headers["X-Frame-Options"] == "DENY"
    assert call(app, "/static/dashboard.js")[0] == "200 OK"
    assert call(app, "/static/../setup.py")[0] == "404 Not Found"


def test_a_token_guards_every_page(broker: Broker) -> None:
    board = service.Dashboard(SETTINGS, ["alpha"], lambda: ([], []), broker=broker)
    app = server.DashboardApp(board, token="sesame")
    assert call(app, "/workers")[0] == "401 Unauthorized"
    assert call(app, "/workers", authorization="Bearer sesame")[0] == "200 OK"
    status, headers, _ = call(app, "/workers?token=sesame")
    assert status == "303 See Other" and headers["Location"] == "/workers"
    assert call(app, "/workers", cookie=headers["Set-Cookie"].split(";")[0])[0] == "200 OK"
    with pytest.raises(server.TokenRequired):
        server.access_token("0.0.0.0", {})
    assert server.access_token("127.0.0.1", {}) is None
    assert server.access_token("0.0.0.0", {server.TOKEN_ENV: "t"}) == "t"


def test_the_queues_page_reads_the_sqlite_broker(tmp_path: Path) -> None:
    settings = Settings(broker_url=f"sqlite:///{tmp_path / 'broker.db'}")
    the_broker = from_url(settings.broker_url)
    try:
        ensure_queue(the_broker, settings, "alpha")
        the_broker.send("alpha", OutgoingMessage("{}"))
        the_broker.send("alpha", OutgoingMessage("{}", delay=600))
        the_broker.send("alpha-dlq", OutgoingMessage("{}"))
        board = service.Dashboard(
            settings, ["alpha", "missing"], lambda: ([], []), broker=the_broker
        )
        html = board.queues_body(CTX, now=1000.0)
        [alpha] = board.history.samples("alpha")
        assert (alpha.visible, alpha.in_flight, alpha.delayed, alpha.dead_letters) == (1, 0, 1, 1)
        assert board.history.samples("missing")[0].error  # shown as an error, not a crash
        assert 'href="/dead-letters?queue=alpha"' in html and "QueueDoesNotExist" in html
    finally:
        the_broker.close()


def test_beyond_loopback_the_command_refuses_to_start_without_a_token() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBSQS_")}
    done = subprocess.run(
        [sys.executable, "-m", "ebsqs", "dashboard", "--queues", "a", "--host", "0.0.0.0",
         "--broker", "memory://refused"],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "Error: the dashboard on 0.0.0.0 needs a token: set EBSQS_DASHBOARD_TOKEN "
        "(or bind to 127.0.0.1)"
    ]
