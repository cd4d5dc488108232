"""``ebsqs dashboard`` in a real headless browser, against a live ``ebsqs supervise`` on fauxqs.

Debian's ``chromium`` and ``chromium-driver``, driven by Selenium (``make test`` installs them
where it can: as root with apt-get); without them these tests skip, saying so. One supervisor,
one dashboard and one browser serve the whole module: each page is loaded and checked, a dead
letter is redriven by clicking (and the ledger shows its task then ran), another is deleted
through the confirmation page.

Screenshots go to the test's temporary directory; with ``EBSQS_DASHBOARD_SCREENSHOTS=docs``
they are also written as ``docs/dashboard-<page>.png`` (how the README's were made).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ebsqs import producer
from ebsqs.brokers import Broker, from_url
from ebsqs.config import Settings, load_settings
from ebsqs.producer import Call, NamedTask, SendOptions, ensure_queue, send
from tests import servers
from tests.dashboard import dash_tasks
from tests.dashboard.browser import browser_problem, headless, page_shows, page_text, screenshot
from tests.waiting import wait_until

pytestmark = [pytest.mark.fauxqs, pytest.mark.timeout(90)]

APP = "tests.dashboard.dash_tasks"
#: Seconds any one condition may take (a master booting, a heartbeat reaching the status file).
DEADLINE = 30.0


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    problem = browser_problem()
    if problem is not None:
        pytest.skip(problem)
    with headless() as driver:
        yield driver


@dataclass
class Rig:
    """The live supervisor and dashboard, and what the test reads."""

    url: str
    queue: str
    settings: Settings
    broker: Broker
    ledger: Path
    gate: Path
    status_file: Path
    master_pid: int
    shots: Path

    def ran(self) -> list[str]:
        return self.ledger.read_text().splitlines() if self.ledger.exists() else []

    def dead_letters(self) -> int:
        return self.broker.stats(self.settings.dead_letter_queue(self.queue)).visible


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ebsqs", *args],
            cwd=servers.ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: the master's children stop with it
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


@pytest.fixture(scope="module")
def rig(fauxqs_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("dashboard")
    queue = servers.unique_queue_name("dash")
    with pytest.MonkeyPatch.context() as patch:
        servers.apply_sqs_env(patch, fauxqs_server)
        producer.broker_for.cache_clear()
        settings = load_settings()
        broker = from_url(settings.broker_url)
        ensure_queue(broker, settings, settings.physical_queue(queue))
        ledger, gate, status = tmp / "ledger.txt", tmp / "gate", tmp / "status.json"
        env = servers.subprocess_env(
            fauxqs_server,
            **{dash_tasks.LEDGER_ENV: str(ledger), dash_tasks.GATE_ENV: str(gate)},
        )
        env = {
            k: v for k, v in env.items() if not k.startswith("EBSQS_") or k == "EBSQS_BROKER_URL"
        }
        master = _start(
            ["supervise", "--app", APP, "--queues", f"{queue}:1", "--wait", "1",
             "--status-file", str(status), "--log-format", "json"],
            env, tmp / "supervise.log",
        )  # fmt: skip
        port = servers.free_port()
        dashboard = _start(
            ["dashboard", "--queues", queue, "--port", str(port), "--status", str(status)],
            env, tmp / "dashboard.log",
        )  # fmt: skip
        try:
            servers.wait_for_port("127.0.0.1", port)
            options = SendOptions(queue_name=queue)
            calls = [Call((f"k{i}",), {"seconds": 0.01 * i}) for i in range(5)]
            send(NamedTask(f"{APP}.quick"), calls, options, settings=settings)
            send(NamedTask(f"{APP}.gated"), [Call(("k-redrive",), {"card": "4242"})], options,
                 settings=settings)  # fmt: skip
            send(NamedTask(f"{APP}.gated"), [Call(("k-delete",), {})], options, settings=settings)
            # Due after the module ends: the queues page shows it delayed.
            later = SendOptions(queue_name=queue, delay=600)
            send(NamedTask(f"{APP}.quick"), [Call(("k-later",), {})], later, settings=settings)
            yield Rig(
                f"http://127.0.0.1:{port}/", queue, settings, broker, ledger, gate, status,
                master.pid, tmp,
            )  # fmt: skip
        finally:
            _stop(dashboard)
            _stop(master)
            broker.close()
            producer.broker_for.cache_clear()


def shot(driver: Any, rig: Rig, name: str) -> None:
    screenshot(driver, rig.shots, name)


def test_the_queues_page_shows_depth_and_dead_letters(browser: Any, rig: Rig) -> None:
    wait_until(lambda: rig.dead_letters() == 2, DEADLINE, 0.2,
               lambda: f"dead letters: {rig.dead_letters()}")  # fmt: skip
    browser.get(rig.url + "queues")
    row = browser.find_element("css selector", "table.queues tbody tr")
    cells = [cell.text for cell in row.find_elements("tag name", "td")]
    assert cells[0].startswith(rig.queue)
    assert cells[3] == "1"  # delayed
    assert cells[4] == "2"  # dead letters, a link to them
    assert row.find_element("css selector", "svg.spark polyline")
    shot(browser, rig, "queues")
    row.find_element("link text", "2").click()
    wait_until(lambda: "Dead letters of" in page_text(browser), DEADLINE, 0.05)


def test_the_workers_page_shows_the_live_master(browser: Any, rig: Rig) -> None:
    wait_until(
        lambda: page_shows(browser, rig.url + "workers", f"master {rig.master_pid} · running",
                           "idle", "done 5, failed 2"),
        DEADLINE, 0.5, lambda: page_text(browser),
    )  # fmt: skip
    children = browser.find_elements("css selector", "table.workers tbody tr")
    assert len(children) == 1 and rig.queue in children[0].text
    shot(browser, rig, "workers")
    # dashboard.js swaps fresh content in every 5 s, without reloading the page.
    browser.execute_script(
        "window.notReloaded = true;"
        "document.getElementById('ebsqs-content').setAttribute('data-seen', 'old');"
    )
    wait_until(
        lambda: browser.execute_script(
            "var c = document.getElementById('ebsqs-content');"
            "return window.notReloaded === true && c !== null && !c.hasAttribute('data-seen');"
        ),
        DEADLINE, 0.1,
    )  # fmt: skip


def test_the_tasks_page_shows_the_masters_totals(browser: Any, rig: Rig) -> None:
    wait_until(
        lambda: page_shows(browser, rig.url + "tasks", f"{APP}.quick", f"{APP}.gated"),
        DEADLINE, 0.5, lambda: page_text(browser),
    )  # fmt: skip
    cells = [
        [cell.text for cell in row.find_elements("tag name", "td")]
        for row in browser.find_elements("css selector", "table.tasks tbody tr")
    ]
    rows = {row[0]: row for row in cells}
    assert rows[f"{APP}.quick"][2] == "5" and rows[f"{APP}.gated"][3] == "2"
    assert rows[f"{APP}.gated"][4] == "100.0 %"
    shot(browser, rig, "tasks")


def _select(browser: Any, key: str) -> None:
    for row in browser.find_elements("css selector", "table.dead-letters tbody tr"):
        if f"the gate is closed for {key}" in row.text:
            row.find_element("css selector", "input[type=checkbox]").click()
            return
    raise AssertionError(f"no dead letter of {key} on the page")


def test_a_dead_letter_redriven_by_clicking_runs(browser: Any, rig: Rig) -> None:
    wait_until(lambda: rig.dead_letters() == 2, DEADLINE, 0.2)
    browser.get(rig.url + f"dead-letters?queue={rig.queue}")
    text = browser.find_element("tag name", "body").text
    assert "GateClosed" in text and "the gate is closed for k-redrive" in text
    assert "4242" not in text and "hidden: you may not see task arguments" in text
    shot(browser, rig, "dead-letters")
    rig.gate.touch()
    _select(browser, "k-redrive")
    browser.find_element("id", "redrive-selected").click()
    wait_until(lambda: "1 dead letter(s) redriven." in browser.page_source, DEADLINE, 0.1)
    wait_until(lambda: "ran k-redrive" in rig.ran(), DEADLINE, 0.1, lambda: str(rig.ran()))
    assert rig.ran().count("ran k-redrive") == 1
    wait_until(lambda: rig.dead_letters() == 1, DEADLINE, 0.2)  # the other stays


def test_a_delete_asks_for_confirmation_first(browser: Any, rig: Rig) -> None:
    wait_until(lambda: rig.dead_letters() == 1, DEADLINE, 0.2)
    browser.get(rig.url + f"dead-letters?queue={rig.queue}")
    browser.find_element("css selector", "button.select-all").click()  # the one left
    assert browser.find_element("css selector", "input[name=id]").is_selected()
    browser.find_element("css selector", "button[value=delete]").click()
    wait_until(lambda: "Delete 1 dead letter(s)" in page_text(browser), DEADLINE, 0.05)
    assert rig.dead_letters() == 1
    browser.find_element("id", "confirm-delete").click()
    wait_until(lambda: "1 dead letter(s) deleted." in browser.page_source, DEADLINE, 0.1)
    wait_until(lambda: rig.dead_letters() == 0, DEADLINE, 0.2)
    assert "ran k-delete" not in rig.ran()
