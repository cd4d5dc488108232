"""The pages' HTML bodies, shared by ``ebsqs dashboard`` and the Django views.

Every value is escaped here; the front ends wrap a body in their layout (the package's
``templates/layout.html``, or the Django admin's ``base_site.html``). Forms post to the page
they are on, with the front end's CSRF field (:class:`Context`); no JavaScript is needed to use
any page (``dashboard.js`` only refreshes the queues and workers pages and ticks boxes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from urllib.parse import urlencode

from ebsqs.dashboard.deadletters import DeadLetter
from ebsqs.dashboard.history import INTERVAL, sparkline
from ebsqs.dashboard.pages import MasterRow, QueueRow, TaskRow
from ebsqs.ops import status

#: Seconds between refreshes of the workers page (masters publish every few seconds).
WORKERS_REFRESH = 5
PAGES = (("queues", "Queues"), ("workers", "Workers"), ("dead-letters", "Dead letters"),
         ("tasks", "Tasks"))  # fmt: skip


@dataclass(frozen=True, slots=True)
class Context:
    """What a body needs from its front end.

    Attributes:
        base: the dashboard's URL prefix, ending in ``/`` (``/`` or ``/ebsqs/``).
        csrf_field: the form field the front end checks (``csrfmiddlewaretoken`` in Django).
        csrf_token: this page's token.
        can_manage: the viewer may redrive and delete dead letters.
    """

    base: str
    csrf_field: str
    csrf_token: str
    can_manage: bool

    def url(self, page: str, **query: str) -> str:
        return f"{self.base}{page}" + (f"?{urlencode(query)}" if query else "")

    def csrf(self) -> str:
        return (
            f'<input type="hidden" name="{escape(self.csrf_field)}" '
            f'value="{escape(self.csrf_token)}">'
        )


def nav(ctx: Context, current: str) -> str:
    links = "".join(
        f'<a href="{escape(ctx.url(page))}"{" class=current" if page == current else ""}>'
        f"{label}</a>"
        for page, label in PAGES
    )
    return f'<nav class="ebsqs-nav">{links}</nav>'


def duration(seconds: float | None) -> str:
    """``12 ms``, ``1.2s``, ``3m05s``, ``2h10m``, ``3d04h``; ``-`` for None."""
    if seconds is None:
        return "-"
    seconds = max(float(seconds), 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return status.duration(seconds)


def megabytes(count: int) -> str:
    return f"{count / 1048576:.1f} MiB"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], css: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    if not rows:
        body = f'<tr><td colspan="{len(headers)}" class="empty">nothing to show</td></tr>'
    return f'<table class="ebsqs {css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# -- queues ------------------------------------------------------------------------------------


def queues_page(ctx: Context, rows: Sequence[QueueRow]) -> str:
    table = _table(
        ["Queue", "Waiting", "In flight", "Delayed", "Dead letters", "Oldest waiting", "Last hour"],
        [_queue_cells(ctx, row) for row in rows],
        "queues",
    )
    note = (
        f"Sampled by this page every {int(INTERVAL)} s while it is open: two broker requests "
        "per queue a sample (the queue and its dead-letter queue). Oldest waiting: how long the "
        "queue has had waiting messages, as the samples saw it."
    )
    return (
        f'<div id="ebsqs-content" data-refresh="{int(INTERVAL)}">{nav(ctx, "queues")}'
        f'<h2>Queues</h2>{table}<p class="note">{escape(note)}</p></div>'
    )


def _queue_cells(ctx: Context, row: QueueRow) -> list[str]:
    name = f"{escape(row.queue)}<br><small>{escape(row.physical)}</small>"
    latest = row.latest
    if latest is None:
        return [name, "-", "-", "-", "-", "-", sparkline(row.trend)]
    if latest.error:
        return [name, f'<span class="error">{escape(latest.error)}</span>', "", "", "", "", ""]
    dead = "none" if latest.dead_letters is None else str(latest.dead_letters)
    if latest.dead_letters:
        link = escape(ctx.url("dead-letters", queue=row.queue))
        dead = f'<a href="{link}">{latest.dead_letters}</a>'
    waiting = "-"
    if row.waiting_for is not None:
        seconds, bounded = row.waiting_for
        waiting = ("≤ " if bounded else "≥ ") + duration(seconds)
    return [
        name,
        str(latest.visible),
        str(latest.in_flight),
        str(latest.delayed),
        dead,
        waiting,
        sparkline(row.trend),
    ]


# -- workers -----------------------------------------------------------------------------------


def workers_page(ctx: Context, masters: Sequence[MasterRow], problems: Sequence[str]) -> str:
    parts = [f'<div id="ebsqs-content" data-refresh="{WORKERS_REFRESH}">', nav(ctx, "workers")]
    parts.append("<h2>Workers</h2>")
    for problem in problems:
        parts.append(f'<p class="error">{escape(problem)}</p>')
    if not masters:
        parts.append('<p class="empty">No supervisor has published its status.</p>')
    for master in masters:
        parts.append(_master_section(master))
    parts.append("</div>")
    return "".join(parts)


def _master_section(master: MasterRow) -> str:
    stale = ' <span class="error">stale</span>' if master.stale else ""
    heading = (
        f'<h3 class="master">{escape(master.host)} · master {master.pid} · '
        f"{escape(master.state)}{stale}</h3>"
        f'<p class="note">up {duration(master.uptime)}, updated {duration(master.age)} ago; '
        f"done {master.succeeded}, failed {master.failed}, retried {master.retried}, "
        f"restarts {master.restarts}</p>"
    )
    rows = [
        [
            escape(c.queue),
            str(c.slot),
            str(c.pid),
            escape(c.state),
            escape(c.task or "-"),
            duration(c.running_for) if c.task else "-",
            str(c.succeeded),
            str(c.failed),
            str(c.retried),
            megabytes(c.rss),
            str(c.restarts),
            escape(c.last_error or "-"),
        ]
        for c in master.children
    ]
    headers = ["Queue", "#", "PID", "State", "Task", "For", "Done", "Failed", "Retried", "Memory",
               "Restarts", "Last error"]  # fmt: skip
    return heading + _table(headers, rows, "workers")


# -- dead letters ------------------------------------------------------------------------------


def dead_letters_page(
    ctx: Context,
    queues: Sequence[str],
    queue: str,
    letters: Sequence[DeadLetter],
    notice: str = "",
) -> str:
    tabs = " ".join(
        f'<a href="{escape(ctx.url("dead-letters", queue=q))}"'
        f"{' class=current' if q == queue else ''}>{escape(q)}</a>"
        for q in queues
    )
    parts = [
        '<div id="ebsqs-content">',
        nav(ctx, "dead-letters"),
        f"<h2>Dead letters of {escape(queue)}</h2>",
        f'<p class="tabs">{tabs}</p>',
    ]
    if notice:
        parts.append(f'<p class="notice">{escape(notice)}</p>')
    parts.append(
        f'<p class="note">{len(letters)} shown (at most 50). Each view receives every message '
        "shown once, and releases it at once.</p>"
    )
    rows = [_letter_cells(ctx, letter) for letter in letters]
    headers = ["", "Task", "Reason", "Error", "Attempts", "Arguments", "Dead-lettered"]
    table = _table(headers, rows, "dead-letters")
    if ctx.can_manage:
        action = escape(ctx.url("dead-letters", queue=queue))
        buttons = (
            '<p class="actions">'
            '<button type="button" class="select-all">Select all</button> '
            '<button name="action" value="redrive" id="redrive-selected">Redrive selected</button> '
            '<button name="action" value="redrive-all">Redrive all</button> '
            '<button name="action" value="delete" class="danger">Delete selected…</button> '
            '<button name="action" value="delete-all" class="danger">Delete all…</button></p>'
        )
        parts.append(f'<form method="post" action="{action}">{ctx.csrf()}{table}{buttons}</form>')
    else:
        parts.append(table)
    parts.append("</div>")
    return "".join(parts)


def _letter_cells(ctx: Context, letter: DeadLetter) -> list[str]:
    box = ""
    if ctx.can_manage:
        box = (
            f'<input type="checkbox" name="id" value="{escape(letter.message_id)}" '
            f'aria-label="select {escape(letter.message_id)}">'
        )
    error = escape(f"{letter.error_type}: {letter.error}" if letter.error_type else letter.error)
    if letter.traceback:
        error += (
            f"<details><summary>traceback</summary><pre>{escape(letter.traceback)}</pre></details>"
        )
    when = "-"
    if letter.sent_at:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(letter.sent_at))
    return [
        box,
        f"{escape(letter.task)}<br><small>{escape(letter.message_id)}</small>",
        escape(letter.reason),
        error,
        escape(letter.attempts or "-"),
        f"<code>{escape(letter.arguments)}</code>",
        when,
    ]


def confirm_delete_page(ctx: Context, queue: str, ids: Sequence[str], everything: bool) -> str:
    """The confirmation a delete asks for (it works without JavaScript)."""
    what = "every dead letter" if everything else f"{len(ids)} dead letter(s)"
    hidden = "".join(f'<input type="hidden" name="id" value="{escape(i)}">' for i in ids)
    action = escape(ctx.url("dead-letters", queue=queue))
    value = "delete-all" if everything else "delete"
    back = escape(ctx.url("dead-letters", queue=queue))
    return (
        f'<div id="ebsqs-content">{nav(ctx, "dead-letters")}'
        f"<h2>Delete {what} of {escape(queue)}?</h2>"
        "<p>Deleted messages are gone for good: they cannot be redriven.</p>"
        f'<form method="post" action="{action}">{ctx.csrf()}{hidden}'
        '<input type="hidden" name="confirm" value="yes">'
        f'<button name="action" value="{value}" class="danger" id="confirm-delete">'
        f"Yes, delete {what}</button> "
        f'<a href="{back}">Cancel</a></form></div>'
    )


# -- tasks -------------------------------------------------------------------------------------


def tasks_page(ctx: Context, rows: Sequence[TaskRow]) -> str:
    cells = [
        [
            escape(r.name),
            f"{r.per_minute:.2f}",
            str(r.succeeded),
            str(r.failed),
            "-" if r.failure_rate is None else f"{100 * r.failure_rate:.1f} %",
            str(r.retried),
            str(r.dead_lettered),
            duration(r.p50) if r.p50 is not None else "-",
            duration(r.p95) if r.p95 is not None else "-",
        ]
        for r in rows
    ]
    headers = ["Task", "Per minute", "Succeeded", "Failed", "Failure rate", "Retried",
               "Dead-lettered", "p50", "p95"]  # fmt: skip
    note = (
        "Totals over each master's lifetime, added up over every master shown; per minute is "
        "each master's average since it started; p50 and p95 come from the duration histogram "
        "(interpolated within its buckets)."
    )
    return (
        f'<div id="ebsqs-content" data-refresh="{WORKERS_REFRESH}">{nav(ctx, "tasks")}'
        f'<h2>Tasks</h2>{_table(headers, cells, "tasks")}<p class="note">{escape(note)}</p></div>'
    )
