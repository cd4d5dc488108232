"""The dashboard inside Django: ``path("ebsqs/", include("ebsqs.contrib.django.urls"))``.

Staff only: a user must be active staff (others go to the admin's login) and hold
``ebsqs.view_dashboard`` to see the pages, ``ebsqs.manage_dead_letters`` to redrive or delete,
and ``ebsqs.view_task_arguments`` to see task arguments in dead letters (redacted otherwise).
Forms are CSRF-protected by Django's own token, pages use the admin's look
(``admin/base_site.html``).

Workers and tasks come from the ``MasterSnapshot`` table, which masters write
(:mod:`ebsqs.contrib.django.publish`); the queues page's samples are kept in Django's default
cache for an hour, so every process behind that cache shares them (and the broker cost).

Queues shown: ``settings.EBSQS_DASHBOARD_QUEUES`` if set, else every queue the published masters
consume, and the default queue.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from django.conf import settings as django_settings
from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.safestring import mark_safe
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.http import require_http_methods

from ebsqs import producer
from ebsqs.config import load_settings
from ebsqs.contrib.django.models import MasterSnapshot
from ebsqs.dashboard import assets, service
from ebsqs.dashboard.history import History
from ebsqs.dashboard.render import Context
from ebsqs.dashboard.server import TITLES

#: The cache key of the queues page's samples.
HISTORY_KEY = "ebsqs:dashboard:history"
VIEW, MANAGE, ARGUMENTS = (
    "ebsqs.view_dashboard",
    "ebsqs.manage_dead_letters",
    "ebsqs.view_task_arguments",
)
#: Rows older than this are not shown (the publisher deletes them later).
SHOWN_FOR = datetime.timedelta(minutes=10)

View = Callable[..., HttpResponse]


def _may(request: HttpRequest, permission: str) -> bool:
    """Whether the request's user holds ``permission`` (any user model with ``has_perm``)."""
    has_perm = getattr(request.user, "has_perm", None)
    return bool(has_perm is not None and has_perm(permission))


def documents() -> tuple[list[dict[str, Any]], list[str]]:
    """The masters' latest documents, from the table."""
    since = timezone.now() - SHOWN_FOR
    rows = MasterSnapshot.objects.filter(updated_at__gte=since).order_by("host", "pid")
    return [dict(row.document) for row in rows], []


def configured_queues(docs: list[dict[str, Any]], default: str) -> list[str]:
    chosen = getattr(django_settings, "EBSQS_DASHBOARD_QUEUES", None)
    if chosen:
        return list(chosen)
    found = {queue for doc in docs for queue in doc.get("targets", {})}
    return sorted(found | {default})


def _dashboard() -> service.Dashboard:
    settings = load_settings()
    docs, _ = documents()
    history = History.from_json(cache.get(HISTORY_KEY))
    # The process's own broker, as .delay() uses: its clients and queue URLs last between
    # requests, so a page costs only its reads.
    broker = producer.broker_for(settings.broker_url)
    queues = configured_queues(docs, settings.default_queue)
    return service.Dashboard(settings, queues, documents, history, broker)


def _context(request: HttpRequest) -> Context:
    from django.middleware.csrf import get_token

    return Context(
        base=reverse("ebsqs:index"),
        csrf_field="csrfmiddlewaretoken",
        csrf_token=get_token(request),
        can_manage=_may(request, MANAGE),
    )


def _page(request: HttpRequest, page: str, body: str) -> HttpResponse:
    context = {
        **admin.site.each_context(request),
        "title": TITLES.get(page, "Confirm"),
        "body": mark_safe(body),  # ebsqs.dashboard.render escapes every value
    }
    return render(request, "ebsqs/dashboard.html", context)


def _viewer(view: View) -> View:
    """Staff with ``ebsqs.view_dashboard`` only; CSRF-checked."""

    def checked(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not _may(request, VIEW):
            raise PermissionDenied("ebsqs.view_dashboard is required")
        return view(request, *args, **kwargs)

    checked.__name__ = view.__name__
    checked.__doc__ = view.__doc__
    return staff_member_required(csrf_protect(checked))


@_viewer
@require_http_methods(["GET"])
def queues(request: HttpRequest) -> HttpResponse:
    """Every configured queue and its dead-letter queue, with the last hour's samples."""
    board = _dashboard()
    body = board.queues_body(_context(request))
    cache.set(HISTORY_KEY, board.history.to_json(), 3600)
    return _page(request, "queues", body)


@_viewer
@require_http_methods(["GET"])
def workers(request: HttpRequest) -> HttpResponse:
    """Every master that published its snapshot, on every host, with its children."""
    return _page(request, "workers", _dashboard().workers_body(_context(request)))


@_viewer
@require_http_methods(["GET"])
def tasks(request: HttpRequest) -> HttpResponse:
    """Per task: throughput, failure rate, p50/p95, from the masters' totals."""
    return _page(request, "tasks", _dashboard().tasks_body(_context(request)))


@_viewer
@require_http_methods(["GET", "POST"])
def dead_letters(request: HttpRequest) -> HttpResponse:
    """Browse one queue's dead letters (GET); redrive or delete them (POST, with
    ``ebsqs.manage_dead_letters``)."""
    board, ctx = _dashboard(), _context(request)
    queue = request.GET.get("queue") or board.queues[0]
    try:
        if request.method == "POST":
            return _act(request, board, ctx, queue)
        body = board.dead_letters_body(
            ctx,
            queue,
            show_arguments=_may(request, ARGUMENTS),
            notice=service.notice(request.GET.dict()),
        )
    except service.UnknownQueue:
        raise Http404(f"no queue {queue} on this dashboard") from None
    return _page(request, "dead-letters", body)


def _act(request: HttpRequest, board: service.Dashboard, ctx: Context, queue: str) -> HttpResponse:
    if not _may(request, MANAGE):
        raise PermissionDenied("ebsqs.manage_dead_letters is required")
    try:
        outcome = board.act(
            ctx,
            queue,
            request.POST.get("action", ""),
            request.POST.getlist("id"),
            confirmed=request.POST.get("confirm") == "yes",
            user=request.user.get_username(),
        )
    except ValueError as exc:
        return HttpResponseBadRequest(f"refused: {exc}")
    if outcome.confirm is not None:
        return _page(request, "confirm", outcome.confirm)
    return redirect(ctx.url("dead-letters", queue=queue, **{outcome.verb: str(outcome.count)}))


def static(request: HttpRequest, name: str) -> HttpResponse:
    """The dashboard's stylesheet and script, from the package (no CDN, no collectstatic)."""
    try:
        content = assets.static(name)
    except KeyError:
        raise Http404(name) from None
    response = HttpResponse(content, content_type=assets.STATIC[name])
    response["Cache-Control"] = "max-age=3600"
    return response
