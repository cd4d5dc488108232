"""Running the ``ebsqs`` command line inside ``manage.py``, where Django is already set up, and
declaring its options on Django commands."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click
from django.core.management import CommandError, CommandParser

from ebsqs.cli import log_options
from ebsqs.errors import EbsqsError, ExitCode, exit_code_for
from ebsqs.log import LogFormat


def run_cli(argv: Sequence[str], prog_name: str = "manage.py ebsqs") -> None:
    """Run ``ebsqs <argv>`` in this process; a failure becomes a :class:`CommandError`.

    The process is the one ``manage.py`` set Django up in, so the supervisor's master forks
    children that inherit a ready Django (settings, apps, autodiscovered tasks).

    Raises:
        CommandError: bad usage, an ebsqs error, or a command that exited with a non-zero code
            (``returncode`` is that code, so ``manage.py`` exits with it).
    """
    from ebsqs.cli import main

    add_django_commands()
    try:
        with logging_precedence():
            code = main.main(args=list(argv), prog_name=prog_name, standalone_mode=False)
    except SystemExit as exc:  # commands that end with sys.exit(code): healthcheck, supervise
        code = exc.code
    except click.exceptions.Abort:
        raise CommandError("Aborted.", returncode=ExitCode.ERROR) from None
    except click.ClickException as exc:
        raise CommandError(exc.format_message(), returncode=exc.exit_code) from exc
    except EbsqsError as exc:
        raise CommandError(str(exc), returncode=exit_code_for(exc)) from exc
    if code is None or code == 0:
        return
    command = " ".join([prog_name, *argv[:1]])
    if isinstance(code, int):
        raise CommandError(f"{command} exited with status {code}", returncode=code)
    raise CommandError(f"{command}: {code}", returncode=ExitCode.ERROR)


@contextmanager
def logging_precedence() -> Iterator[None]:
    """While an ebsqs command runs, ``LOGGING`` wins when it configures the root or ``ebsqs``.

    Then ebsqs leaves ``logging``'s handlers and levels alone (``EBSQS_LOG_HANDLERS=keep``, which
    the forked children inherit); ``EBSQS_LOG_HANDLERS`` already in the environment wins over
    both. Otherwise ebsqs puts its own handler on the root, as outside Django.
    """
    from django.conf import settings

    from ebsqs.log import HANDLERS_ENV

    if HANDLERS_ENV in os.environ or not _configures_ebsqs(getattr(settings, "LOGGING", None)):
        yield
        return
    os.environ[HANDLERS_ENV] = "keep"
    try:
        yield
    finally:
        os.environ.pop(HANDLERS_ENV, None)


def _configures_ebsqs(config: Any) -> bool:
    """Whether a ``LOGGING`` dict configures the root logger or the ``ebsqs`` logger."""
    if not isinstance(config, dict):
        return False
    loggers = config.get("loggers") or {}
    return bool(config.get("root")) or "" in loggers or "root" in loggers or "ebsqs" in loggers


def has_command(name: str) -> bool:
    """Whether the ``ebsqs`` command line has a (top-level) command of that name."""
    from ebsqs.cli import main

    add_django_commands()
    return name in main.commands


def add_django_commands() -> None:
    """Add the commands that only make sense with Django set up (``outbox``) to the ``ebsqs``
    command line, once; ``ebsqs`` outside ``manage.py`` never has them."""
    from ebsqs.cli import main

    if "outbox" not in main.commands:
        main.add_command(outbox)


@click.group()
def outbox() -> None:
    """The durable outbox (EBSQS["outbox"]): sends kept in database transactions."""


@outbox.command("relay")
@click.option(
    "--once",
    is_flag=True,
    help="Send what is due now, then exit (status 1 if a row failed or another relay holds "
    "the lease).",
)
@log_options
def outbox_relay(once: bool, log_format: LogFormat, log_level: str) -> None:
    """Send the outbox's rows to SQS until SIGTERM or SIGINT (a last pass, then exit).

    A supervisor (`manage.py ebsqs supervise`, `manage.py process_queue`) runs a relay already;
    this one is for hosts without one, or for draining by hand (--once). Several relays may run
    at once: on PostgreSQL they share the rows, elsewhere one holds a lease and the others wait.
    """
    import signal
    import threading

    from ebsqs import log
    from ebsqs.config import load_settings
    from ebsqs.contrib.django import outbox as box

    log.configure(log_format, log_level, role="outbox-relay")
    options = box.outbox_options()
    relay = box.Relay(load_settings(), options.alias, max_backoff=options.max_backoff)
    if once:
        result = relay.drain()
        click.echo(f"sent {result.sent}, failed {result.failed}")
        if result.failed or result.leased_elsewhere:
            raise click.exceptions.Exit(ExitCode.ERROR)
        return
    stop = threading.Event()
    waker = box.Waker(options.alias, box.poll_interval(options.alias, options))

    def on_signal(signum: int, frame: object) -> None:
        stop.set()  # only record it; the loop makes its last pass and ends
        waker.nudge()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        box.run_relay(relay, waker, stop)
    finally:
        waker.close()


#: Options every Django command has; an ebsqs option spelled the same is left out.
_DJANGO_OPTIONS = frozenset(
    {
        "-h",
        "--help",
        "--version",
        "-v",
        "--verbosity",
        "--settings",
        "--pythonpath",
        "--traceback",
        "--no-color",
        "--force-color",
        "--skip-checks",
    }
)
#: Prefix of the argparse destinations of ebsqs options, apart from Django's own.
DEST_PREFIX = "ebsqs_"


def add_cli_options(parser: CommandParser, command: str, skip: Iterable[str] = ()) -> None:
    """Declare the options of ``ebsqs <command>`` on a Django command's parser.

    So ``manage.py process_queue --help`` lists them, and every option a newer ebsqs adds is
    accepted without a change here. Values are not checked here: :func:`cli_argv` passes them
    back to the ebsqs command, which checks them.
    """
    for param in _options(command, skip):
        names = [opt for opt in param.opts if opt not in _DJANGO_OPTIONS]
        negations = [opt for opt in param.secondary_opts if opt not in _DJANGO_OPTIONS]
        dest = DEST_PREFIX + (param.name or "")
        help_text = argparse.SUPPRESS if param.hidden else param.help
        if param.is_flag and not param.count:
            parser.add_argument(*names, dest=dest, action="store_const", const=True, help=help_text)
            if negations:
                parser.add_argument(
                    *negations, dest=dest, action="store_const", const=False, help=argparse.SUPPRESS
                )
        elif param.count:
            parser.add_argument(*names, dest=dest, action="count", help=help_text)
        else:
            parser.add_argument(
                *names,
                dest=dest,
                action="append" if param.multiple else "store",
                nargs=param.nargs if param.nargs > 1 else None,
                metavar=param.metavar or (param.name or "value").upper(),
                help=help_text,
            )


def cli_argv(options: dict[str, Any], command: str, skip: Iterable[str] = ()) -> list[str]:
    """The ``ebsqs <command>`` arguments for the options :func:`add_cli_options` parsed."""
    argv: list[str] = []
    for param in _options(command, skip):
        value = options.get(DEST_PREFIX + (param.name or ""))
        if value is None:
            continue
        flag = next(opt for opt in param.opts if opt not in _DJANGO_OPTIONS)
        if param.is_flag and not param.count:
            argv.append(flag if value else param.secondary_opts[0])
        elif param.count:
            argv += [flag] * value
        else:
            for item in value if param.multiple else [value]:
                argv += [flag, *map(str, item if isinstance(item, list | tuple) else [item])]
    return argv


def _options(command: str, skip: Iterable[str]) -> list[click.Option]:
    from ebsqs.cli import main

    found = main.commands.get(command)
    if found is None:
        return []
    skipped = set(skip)
    return [
        param
        for param in found.params
        if isinstance(param, click.Option)
        and param.name not in skipped
        and any(opt not in _DJANGO_OPTIONS for opt in param.opts)
    ]
