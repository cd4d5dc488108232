"""``ebsqs dashboard``: the dashboard without Django, a WSGI app served by waitress.

waitress (``pip install 'ebsqs[dashboard]'``) is a production WSGI server in pure Python with
no dependencies of its own and a long record of maintenance (the Pylons project): nothing to
compile, and HTTP parsing is left to code that has met the internet, not written here.

Access:

- Bound to a loopback address (the default, ``127.0.0.1``), the page is for whoever can reach
  that address on this host. Bound elsewhere, a token is required: ``EBSQS_DASHBOARD_TOKEN``
  from the environment (never a flag, so it stays out of ``ps``), or the command refuses to
  start. With a token set (on any address), a request carries it as ``Authorization: Bearer
  <token>``, or once as ``?token=<token>``, which sets a cookie (HttpOnly, SameSite=Strict)
  and redirects to the same page without it.
- Every form carries a CSRF token: an HMAC, under a secret made at start, of a random cookie
  the browser holds; a POST without the matching pair is refused (403). The cookies are
  SameSite=Strict as well.
- Task arguments in dead letters are shown only with ``--show-arguments``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlencode

import click

from ebsqs.config import Settings
from ebsqs.dashboard import assets, pages, service
from ebsqs.dashboard.render import Context
from ebsqs.errors import ConfigurationError, EbsqsError, ExitCode
from ebsqs.log import get_logger

log = get_logger(__name__)

#: The environment variable holding the access token.
TOKEN_ENV = "EBSQS_DASHBOARD_TOKEN"
CSRF_FIELD = "csrf_token"
CSRF_COOKIE = "ebsqs_csrf"
TOKEN_COOKIE = "ebsqs_token"
#: Largest form body read (a selection of 50 message ids is a few kilobytes).
MAX_FORM_BYTES = 256 * 1024
TITLES = {"queues": "Queues", "workers": "Workers", "dead-letters": "Dead letters",
          "tasks": "Tasks"}  # fmt: skip

StartResponse = Callable[..., Any]


class TokenRequired(click.ClickException):
    """Bound to a non-loopback address without ``EBSQS_DASHBOARD_TOKEN``: a one-line usage
    error (exit 2), without the usage text."""

    exit_code = ExitCode.USAGE


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_token(host: str, environ: dict[str, str] | None = None) -> str | None:
    """The token requests must carry, or None on a loopback address without one.

    Raises:
        TokenRequired: ``host`` is not a loopback address and no token is set.
    """
    token = (os.environ if environ is None else environ).get(TOKEN_ENV) or None
    if token is None and not is_loopback(host):
        raise TokenRequired(
            f"the dashboard on {host} needs a token: set {TOKEN_ENV} (or bind to 127.0.0.1)"
        )
    return token


class Response:
    """A status, headers and a body."""

    def __init__(
        self, status: str, body: bytes | str = b"", content_type: str = "text/html; charset=utf-8"
    ) -> None:
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.headers = [
            ("Content-Type", content_type),
            ("X-Content-Type-Options", "nosniff"),
            # Its buttons act: no framing (clickjacking), and nothing loaded from elsewhere.
            ("X-Frame-Options", "DENY"),
            ("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'"),
            ("Referrer-Policy", "no-referrer"),
            ("Cache-Control", "no-store"),
        ]

    @classmethod
    def redirect(cls, location: str) -> Response:
        response = cls("303 See Other", b"")
        response.headers.append(("Location", location))
        return response


class DashboardApp:
    """The WSGI application of ``ebsqs dashboard``.

    Args:
        dashboard: the pages and actions.
        token: the access token, or None (loopback only).
        show_arguments: show task arguments in dead letters.
        secret: signs CSRF tokens (random per process by default).
    """

    def __init__(
        self,
        dashboard: service.Dashboard,
        token: str | None = None,
        show_arguments: bool = False,
        secret: bytes | None = None,
    ) -> None:
        self.dashboard = dashboard
        self.token = token
        self.show_arguments = show_arguments
        self.secret = secret or secrets.token_bytes(32)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        cookies = SimpleCookie(environ.get("HTTP_COOKIE", ""))
        jar = {name: morsel.value for name, morsel in cookies.items()}
        query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        set_cookies: list[str] = []
        try:
            response = self._respond(environ, jar, query, set_cookies)
        except Exception as exc:  # noqa: BLE001 - a page fails alone, with a one-line reason
            log.error("dashboard_request_failed", error_type=type(exc).__name__, error=str(exc))
            response = Response("500 Internal Server Error", "the dashboard failed: see its log")
        headers = response.headers + [("Set-Cookie", c) for c in set_cookies]
        headers.append(("Content-Length", str(len(response.body))))
        start_response(response.status, headers)
        return [response.body]

    def _respond(
        self,
        environ: dict[str, Any],
        jar: dict[str, str],
        query: dict[str, str],
        set_cookies: list[str],
    ) -> Response:
        path = environ.get("PATH_INFO", "/").strip("/") or "queues"
        if self.token is not None:
            denied = self._authenticate(environ, jar, query, path, set_cookies)
            if denied is not None:
                return denied
        if path.startswith("static/"):
            return self._static(path.removeprefix("static/"))
        if path not in TITLES:
            return Response("404 Not Found", "no such page", "text/plain; charset=utf-8")
        browser = jar.get(CSRF_COOKIE) or ""
        if not browser:
            browser = secrets.token_urlsafe(24)
            set_cookies.append(_cookie(CSRF_COOKIE, browser))
        ctx = Context("/", CSRF_FIELD, self._csrf_token(browser), can_manage=True)
        if environ.get("REQUEST_METHOD") == "POST":
            return self._post(environ, ctx, jar.get(CSRF_COOKIE, ""), path, query)
        return self._page(ctx, path, query)

    def _authenticate(
        self,
        environ: dict[str, Any],
        jar: dict[str, str],
        query: dict[str, str],
        path: str,
        set_cookies: list[str],
    ) -> Response | None:
        assert self.token is not None
        header = environ.get("HTTP_AUTHORIZATION", "")
        offered = [jar.get(TOKEN_COOKIE, ""), header.removeprefix("Bearer ").strip()]
        if any(hmac.compare_digest(t.encode(), self.token.encode()) for t in offered if t):
            return None
        if hmac.compare_digest(query.get("token", "").encode(), self.token.encode()):
            set_cookies.append(_cookie(TOKEN_COOKIE, self.token))
            rest = {k: v for k, v in query.items() if k != "token"}
            return Response.redirect("/" + path + (f"?{urlencode(rest)}" if rest else ""))
        return Response(
            "401 Unauthorized",
            f"a token is required: open /?token=... with {TOKEN_ENV}'s value",
            "text/plain; charset=utf-8",
        )

    def _csrf_token(self, browser: str) -> str:
        return hmac.new(self.secret, browser.encode(), hashlib.sha256).hexdigest()

    def _static(self, name: str) -> Response:
        try:
            response = Response("200 OK", assets.static(name), assets.STATIC[name])
        except KeyError:
            return Response("404 Not Found", "no such file", "text/plain; charset=utf-8")
        response.headers = [h for h in response.headers if h[0] != "Cache-Control"]
        response.headers.append(("Cache-Control", "max-age=3600"))
        return response

    def _page(self, ctx: Context, path: str, query: dict[str, str]) -> Response:
        dashboard = self.dashboard
        try:
            if path == "queues":
                body = dashboard.queues_body(ctx)
            elif path == "workers":
                body = dashboard.workers_body(ctx)
            elif path == "tasks":
                body = dashboard.tasks_body(ctx)
            else:
                body = dashboard.dead_letters_body(
                    ctx,
                    query.get("queue"),
                    show_arguments=self.show_arguments,
                    notice=service.notice(query),
                )
        except service.UnknownQueue as exc:
            return Response("404 Not Found", f"no queue {exc} here", "text/plain; charset=utf-8")
        return Response("200 OK", assets.layout(TITLES[path], ctx.base, body))

    def _post(
        self, environ: dict[str, Any], ctx: Context, browser: str, path: str, query: dict[str, str]
    ) -> Response:
        form = _form(environ)
        token = (form.get(CSRF_FIELD) or [""])[-1]
        if (
            path != "dead-letters"
            or not browser
            or not hmac.compare_digest(token.encode(), self._csrf_token(browser).encode())
        ):
            return Response("403 Forbidden", "CSRF check failed", "text/plain; charset=utf-8")
        queue = query.get("queue") or self.dashboard.queues[0]
        try:
            outcome = self.dashboard.act(
                ctx,
                queue,
                (form.get("action") or [""])[-1],
                form.get("id", []),
                confirmed=(form.get("confirm") or [""])[-1] == "yes",
            )
        except (service.UnknownQueue, ValueError) as exc:
            return Response("400 Bad Request", f"refused: {exc}", "text/plain; charset=utf-8")
        if outcome.confirm is not None:
            return Response("200 OK", assets.layout("Confirm", ctx.base, outcome.confirm))
        return Response.redirect(
            ctx.url("dead-letters", queue=queue, **{outcome.verb: str(outcome.count)})
        )


def _form(environ: dict[str, Any]) -> dict[str, list[str]]:
    try:
        length = min(int(environ.get("CONTENT_LENGTH") or 0), MAX_FORM_BYTES)
    except ValueError:
        length = 0
    data = environ["wsgi.input"].read(length) if length else b""
    return parse_qs(data.decode("utf-8", "replace"))


def _cookie(name: str, value: str) -> str:
    return f"{name}={value}; Path=/; HttpOnly; SameSite=Strict"


def status_source(sources: Sequence[str]) -> service.Documents:
    """The workers' documents: the status files or directories named, else the defaults."""
    return lambda: pages.status_documents(sources)


def run(
    settings: Settings,
    queues: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8188,
    status: Sequence[str] = (),
    show_arguments: bool = False,
) -> None:
    """Serve the dashboard until interrupted.

    Raises:
        TokenRequired: bound beyond loopback without ``EBSQS_DASHBOARD_TOKEN``.
        ConfigurationError: no queue named, or waitress is not installed.
    """
    token = access_token(host)
    if not queues:
        raise ConfigurationError("name the queues to show (--queues)")
    try:
        import waitress  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigurationError(
            "the dashboard needs waitress: pip install 'ebsqs[dashboard]'"
        ) from None
    app = DashboardApp(
        service.Dashboard(settings, queues, status_source(status)),
        token=token,
        show_arguments=show_arguments,
    )
    log.info("dashboard_started", url=f"http://{host}:{port}/", token_required=token is not None)
    started = time.monotonic()
    try:
        waitress.serve(app, host=host, port=port, threads=4, ident="ebsqs", _quiet=True)
    except OSError as exc:
        raise EbsqsError(f"cannot serve the dashboard on {host}:{port}: {exc}") from None
    finally:
        log.info("dashboard_stopped", uptime=round(time.monotonic() - started, 1))
