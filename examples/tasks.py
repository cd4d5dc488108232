"""Example tasks, as an application would write them."""

from __future__ import annotations

import random
import time

from ebsqs import Backoff, current, task


class FlakyUpstream(Exception):
    """A transient failure worth retrying."""


@task(queue_name="emails", max_retries=3)
def send_email(tenant_id: int, email_id: str, headers: list[dict[str, str]] | None = None) -> None:
    """Pretend to send an email (a few milliseconds of work)."""
    time.sleep(0.005)


@task(
    queue_name="reports", max_retries=2, retry_on=(FlakyUpstream,), backoff=Backoff(base=0.5, cap=5)
)
def build_report(report_id: int) -> None:
    """Fails now and then; retried with backoff by the worker."""
    if random.random() < 0.2 and current().attempt == 1:
        raise FlakyUpstream(f"upstream timed out building report {report_id}")
    time.sleep(0.01)
