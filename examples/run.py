"""`make run`: enqueue a sample load on the embedded SQLite broker and watch it processed.

Starts `ebsqs supervise` on the example app, prints the queues' progress once a second, and
stops the supervisor gracefully (SIGTERM) once every message is settled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ebsqs import log
from ebsqs.brokers import from_url
from ebsqs.config import load_settings
from examples.tasks import build_report, send_email

BROKER = "sqlite:///.ebsqs-example.sqlite3"
QUEUES = ("emails", "reports")
TIMEOUT = 120


def main() -> int:
    log.configure("console", "warning")
    os.environ["EBSQS_BROKER_URL"] = BROKER
    Path(".ebsqs-example.sqlite3").unlink(missing_ok=True)
    send_email.delay_many(
        send_email.call(tenant_id=7, email_id=f"m-{i}", headers=[{"From": "a@example.com"}])
        for i in range(300)
    )
    build_report.delay_many((i,) for i in range(100))
    print("enqueued 300 emails and 100 reports on", BROKER, flush=True)
    command = [
        sys.executable,
        "-m",
        "ebsqs",
        "supervise",
        "--app",
        "examples.tasks",
        "--queues",
        ",".join(QUEUES),
        "--workers",
        "2",
        "--log-format",
        "console",
        "--log-level",
        "warning",
    ]
    print("$", " ".join(["ebsqs", *command[3:]]), flush=True)
    supervisor = subprocess.Popen(command)
    try:
        return 0 if watch(supervisor) else 1
    finally:
        if supervisor.poll() is None:
            supervisor.send_signal(signal.SIGTERM)
            supervisor.wait(timeout=60)
        print(f"supervisor exited with code {supervisor.returncode}", flush=True)


def watch(supervisor: subprocess.Popen[bytes]) -> bool:
    """Print progress until every queue is empty; False if that takes too long."""
    broker = from_url(load_settings().broker_url)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and supervisor.poll() is None:
        stats = [broker.stats(queue) for queue in QUEUES]
        dead = broker.stats("reports-dlq").visible
        print(
            "  ".join(
                f"{s.queue}: {s.visible} waiting, {s.in_flight} running, {s.delayed} delayed"
                for s in stats
            )
            + f"  dead letters: {dead}",
            flush=True,
        )
        if all(s.visible + s.in_flight + s.delayed == 0 for s in stats):
            print("all messages processed", flush=True)
            return True
        time.sleep(1)
    return False


if __name__ == "__main__":
    sys.exit(main())
