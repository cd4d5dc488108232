"""The Django dashboard live: a real ``manage.py process_queue`` master on fauxqs publishes its
row, and the admin-styled workers page shows it in a headless browser after an admin login.

The master's part runs wherever fauxqs is installed; the browser's part skips, saying why,
without Debian's chromium and chromium-driver (see ``tests/dashboard/browser.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import servers
from tests.dashboard.browser import browser_problem, headless, page_shows, page_text, screenshot
from tests.django.conftest import djproject_env
from tests.django.helpers import managed, stop
from tests.waiting import wait_until

pytestmark = [pytest.mark.fauxqs, pytest.mark.timeout(90)]


def published(pid: int) -> dict[str, Any] | None:
    """The document the master ``pid`` wrote to its row, if any (read afresh each time)."""
    from django.db import connections

    from ebsqs.contrib.django.models import MasterSnapshot

    try:
        row = MasterSnapshot.objects.filter(pid=pid).first()
        return dict(row.document) if row is not None else None
    finally:
        connections["default"].close()  # see what the master commits, not a snapshot


def tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def test_a_live_master_publishes_and_the_admin_page_shows_it(
    sqs: dict[str, str], tmp_path: Path
) -> None:
    from django.contrib.auth.models import User
    from shop.tasks import record

    record.delay_many([(f"live-{i}",) for i in range(3)])
    env = djproject_env(**sqs)
    log = tmp_path / "process_queue.log"
    command = ["process_queue", "--queues", "a", "--workers", "1", "--wait", "1"]
    with managed(*command, "--log-format", "json", env=env, log=log) as master:
        document = wait_until(
            lambda: (doc := published(master.pid)) and doc["counts"]["succeeded"] >= 3 and doc,
            45, 0.2, lambda: f"row: {published(master.pid)}; log:\n{tail(log)}",
        )  # fmt: skip
        assert document["master"]["state"] == "running" and document["host"]
        assert document["tasks"]["shop.tasks.record"]
        _admin_sees(master.pid, env, tmp_path)
        assert stop(master) == 0, tail(log)
    assert published(master.pid) is None  # a stopped master removes its row
    User.objects.filter(username="dash-admin").delete()


def _admin_sees(pid: int, env: dict[str, str], tmp_path: Path) -> None:
    """Log in through the admin in a real browser; the workers page shows the master."""
    problem = browser_problem()
    if problem is not None:
        pytest.skip(f"the master published its row; the browser part skips: {problem}")
    from django.contrib.auth.models import User

    User.objects.filter(username="dash-admin").delete()
    User.objects.create_superuser("dash-admin", password="dash-pw")
    port = servers.free_port()
    serve = ["runserver", f"127.0.0.1:{port}", "--noreload", "--insecure", "--skip-checks"]
    with managed(*serve, env=env, log=tmp_path / "runserver.log"), headless() as driver:
        servers.wait_for_port("127.0.0.1", port)
        base = f"http://127.0.0.1:{port}"
        driver.get(f"{base}/admin/login/?next=/ebsqs/workers")
        driver.find_element("id", "id_username").send_keys("dash-admin")
        driver.find_element("id", "id_password").send_keys("dash-pw")
        driver.find_element("css selector", "input[type=submit]").click()
        wait_until(lambda: f"master {pid}" in page_text(driver), 20, 0.1,
                   lambda: page_text(driver))  # fmt: skip
        assert "Django administration" in page_text(driver)  # the admin's look
        screenshot(driver, tmp_path, "django-workers")
        assert page_shows(driver, f"{base}/ebsqs/tasks", "shop.tasks.record")
