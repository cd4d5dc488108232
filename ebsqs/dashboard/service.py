"""One dashboard, framework-free: the pages' bodies and the dead-letter actions.

Both front ends (``ebsqs dashboard`` and the Django views) hold a :class:`Dashboard` and only
add what is theirs: routing, authentication, CSRF and the layout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ebsqs.brokers import Broker, from_url
from ebsqs.config import Settings
from ebsqs.dashboard import deadletters, pages, render
from ebsqs.dashboard.history import History, Sample
from ebsqs.log import get_logger

log = get_logger(__name__)

#: Where workers' documents come from: the documents, and a line per source that failed.
Documents = Callable[[], tuple[list[dict[str, Any]], list[str]]]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a dead-letter action came to: messages ``redriven`` or ``deleted`` (``verb``) and
    how many, or a confirmation page to show first.

    The front ends redirect to the dead-letters page with ``?<verb>=<count>`` (see
    :func:`notice`), so a reload does not post again.
    """

    verb: str = ""
    count: int = 0
    confirm: str | None = None


VERBS = ("redriven", "deleted")


def notice(query: Mapping[str, str]) -> str:
    """The notice a redirect's query asks for: only numbers travel, never text."""
    for verb in VERBS:
        value = query.get(verb, "")
        if value.isdigit():
            return f"{int(value)} dead letter(s) {verb}."
    return ""


class UnknownQueue(LookupError):
    """A request named a queue the dashboard was not configured with."""


class Dashboard:
    """The pages of one set of queues on one broker.

    Args:
        settings: the broker URL and queue naming.
        queues: the logical queues shown (the configured ones).
        documents: the masters' status documents (status files, or the Django table).
        history: the poller's samples (kept by the front end between requests).
        broker: the broker to read; by default built from ``settings`` on first use.
    """

    def __init__(
        self,
        settings: Settings,
        queues: Sequence[str],
        documents: Documents,
        history: History | None = None,
        broker: Broker | None = None,
    ) -> None:
        self.settings = settings
        self.queues = tuple(queues)
        self.documents = documents
        self.history = history if history is not None else History()
        self._broker = broker

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            self._broker = from_url(self.settings.broker_url)
        return self._broker

    def check_queue(self, queue: str) -> str:
        """``queue`` if it is a configured one.

        Raises:
            UnknownQueue: it is not (requests name queues; only configured ones are touched).
        """
        if queue not in self.queues:
            raise UnknownQueue(queue)
        return queue

    # -- pages -------------------------------------------------------------------------------

    def sample(self, now: float) -> Mapping[str, Sample]:
        return pages.read_depths(self.broker, self.settings, self.queues, now)

    def queues_body(self, ctx: render.Context, now: float | None = None) -> str:
        now = time.time() if now is None else now
        self.history.sample_if_due(now, self.sample)
        return render.queues_page(ctx, pages.queue_rows(self.settings, self.queues, self.history))

    def workers_body(self, ctx: render.Context) -> str:
        documents, problems = self.documents()
        return render.workers_page(ctx, pages.master_rows(documents), problems)

    def tasks_body(self, ctx: render.Context) -> str:
        documents, _ = self.documents()
        return render.tasks_page(ctx, pages.task_rows(documents))

    def dead_letters_body(
        self, ctx: render.Context, queue: str | None, *, show_arguments: bool, notice: str = ""
    ) -> str:
        """The dead letters of ``queue`` (the first configured one by default), each received
        once and released at once."""
        queue = self.check_queue(queue) if queue else self.queues[0]
        letters = deadletters.browse(
            self.broker, self.settings.dead_letter_queue(queue), show_arguments=show_arguments
        )
        return render.dead_letters_page(ctx, self.queues, queue, letters, notice)

    # -- actions -----------------------------------------------------------------------------

    def act(
        self,
        ctx: render.Context,
        queue: str,
        action: str,
        ids: Sequence[str],
        *,
        confirmed: bool,
        user: str = "",
    ) -> Outcome:
        """Run a dead-letter action: ``redrive`` (the ids), ``redrive-all``, ``delete`` (the
        ids) or ``delete-all``. A delete without ``confirmed`` only asks for confirmation.

        Raises:
            UnknownQueue: ``queue`` is not configured.
            ValueError: an unknown action.
        """
        self.check_queue(queue)
        source = self.settings.dead_letter_queue(queue)
        target = self.settings.physical_queue(queue)
        if action in ("delete", "delete-all") and not confirmed:
            if action == "delete" and not ids:
                return Outcome("deleted", 0)
            return Outcome(confirm=render.confirm_delete_page(ctx, queue, ids, action != "delete"))
        if action == "redrive":
            count = deadletters.redrive_selected(self.broker, source, target, ids) if ids else 0
            verb = "redriven"
        elif action == "redrive-all":
            count, verb = deadletters.redrive(self.broker, source, target, None), "redriven"
        elif action == "delete":
            count, verb = deadletters.delete_selected(self.broker, source, ids), "deleted"
        elif action == "delete-all":
            count, verb = deadletters.delete_all(self.broker, source), "deleted"
        else:
            raise ValueError(f"unknown action {action!r}")
        log.info("dead_letters_" + verb, queue=queue, count=count, user=user)
        return Outcome(verb, count)
