"""Operations commands: ``ebsqs systemd-unit``, ``ebsqs status`` and ``ebsqs healthcheck``.

Registered on the ``ebsqs`` group by :mod:`ebsqs.cli`. They never talk to the broker: the unit is
built from flags, status and health are read from the status file the master keeps (see
:mod:`ebsqs.ops.status`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from ebsqs.config import DEFAULT_BROKER_URL, DEFAULT_GRACEFUL_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT
from ebsqs.ops import status as status_doc
from ebsqs.ops.systemd import UnitOptions, ebsqs_program, render_unit, sqlite_directory

F = TypeVar("F", bound=Callable[..., Any])

#: Flags of ``supervise`` that ``systemd-unit`` writes itself, so they cannot come twice.
_OWN_FLAGS = ("--graceful-timeout", "--heartbeat-timeout", "--status-file")


def _locate_options(fn: F) -> F:
    fn = click.option(
        "--pidfile",
        envvar="EBSQS_PIDFILE",
        type=click.Path(dir_okay=False),
        help="The supervisor's --pidfile: its status file is next to it [env EBSQS_PIDFILE].",
    )(fn)
    return click.option(
        "--status-file",
        "status_file_path",
        envvar="EBSQS_STATUS_FILE",
        type=click.Path(dir_okay=False),
        help="The supervisor's --status-file [env EBSQS_STATUS_FILE]; default: look in "
        "$XDG_RUNTIME_DIR/ebsqs (or /tmp/ebsqs-UID) and /run/ebsqs.",
    )(fn)


@click.command(
    "systemd-unit",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": True},
)
@click.argument("supervise_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--user", default=None, help="User= the service runs as.")
@click.option("--group", default=None, help="Group= the service runs as.")
@click.option(
    "--working-directory",
    type=click.Path(file_okay=False),
    default=None,
    help="WorkingDirectory=, where --app modules are imported from [default: this directory].",
)
@click.option(
    "--environment-file",
    "environment_files",
    multiple=True,
    help="EnvironmentFile= (repeatable; absolute; a leading '-' makes it optional). Put the "
    "EBSQS_* and AWS settings there.",
)
@click.option(
    "--template",
    is_flag=True,
    help="Write ebsqs@.service: the instance name is the --queues value (see docs/deployment.md).",
)
@click.option(
    "--graceful-timeout",
    type=click.FloatRange(min=0),
    default=DEFAULT_GRACEFUL_TIMEOUT,
    show_default=True,
    help="Passed to supervise; TimeoutStopSec is this plus 15 s.",
)
@click.option(
    "--heartbeat-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_HEARTBEAT_TIMEOUT,
    show_default=True,
    help="Passed to supervise; WatchdogSec is twice this plus 30 s.",
)
@click.option(
    "--watchdog-sec",
    type=click.FloatRange(min=0),
    default=None,
    help="WatchdogSec= instead of the default; 0 turns the watchdog off.",
)
@click.option("--description", default=None, help="Description= of the unit.")
def systemd_unit(
    supervise_args: tuple[str, ...],
    user: str | None,
    group: str | None,
    working_directory: str | None,
    environment_files: tuple[str, ...],
    template: bool,
    graceful_timeout: float,
    heartbeat_timeout: float,
    watchdog_sec: float | None,
    description: str | None,
) -> None:
    """Print a systemd unit that runs `ebsqs supervise SUPERVISE_ARGS...`.

    Every option not listed below is passed to supervise as given, e.g.

        ebsqs systemd-unit --app myapp.tasks --queues emails,reports --workers 4
        --user ebsqs --environment-file /etc/ebsqs/env > /etc/systemd/system/ebsqs.service

    ExecStart runs ebsqs from this Python environment by its absolute path.
    """
    args = list(supervise_args)
    if args and args[0] == "--":
        args = args[1:]
    _check_supervise_args(args, template)
    _parse_as_supervise(args)
    directory = os.path.abspath(working_directory or os.getcwd())
    environment = EnvironmentFiles.read(environment_files)
    try:
        options = UnitOptions(
            program=ebsqs_program(),
            supervise_args=tuple(args),
            graceful_timeout=graceful_timeout,
            heartbeat_timeout=heartbeat_timeout,
            watchdog_sec=watchdog_sec,
            user=user,
            group=group,
            working_directory=directory,
            environment_files=environment_files,
            template=template,
            description=description,
            read_write_paths=_writable_paths(args, environment, directory),
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    _check_queues(args, template, environment)
    if not environment_files:
        _warn_about_environment()
    click.echo(render_unit(options), nl=False)


def _check_supervise_args(args: Sequence[str], template: bool) -> None:
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in _OWN_FLAGS:
            raise click.UsageError(
                f"{flag} is written by systemd-unit itself: pass it as an option"
            )
        if template and flag == "--queues":
            raise click.UsageError(
                "--template takes the queues from the instance name: no --queues"
            )


@dataclass(frozen=True, slots=True)
class EnvironmentFiles:
    """What the unit's ``EnvironmentFile=`` files say, as far as they can be read here.

    Read only to check the unit (are the queues named? is the broker SQLite, so its directory
    must be writable?); the service reads them itself when it starts.

    Attributes:
        values: ``KEY=value`` assignments, later files winning.
        unreadable: files that are missing here or cannot be read (so may say anything).
    """

    values: dict[str, str] = field(default_factory=dict)
    unreadable: tuple[str, ...] = ()

    @classmethod
    def read(cls, entries: Iterable[str]) -> EnvironmentFiles:
        """Read ``EnvironmentFile=`` entries (a leading ``-`` marks an optional file)."""
        values: dict[str, str] = {}
        unreadable = []
        for entry in entries:
            path = entry.removeprefix("-")
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                unreadable.append(path)
                continue
            values.update(_assignments(text))
        return cls(values, tuple(unreadable))


def _assignments(text: str) -> dict[str, str]:
    """The ``KEY=value`` lines of an environment file (comments start with # or ;)."""
    found = {}
    for line in (raw.strip() for raw in text.splitlines()):
        if line and not line.startswith(("#", ";")) and "=" in line:
            key, _, value = line.partition("=")
            value = value.strip()
            if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            found[key.strip()] = value
    return found


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value given to ``flag`` in ``args`` (``--flag value`` or ``--flag=value``), last wins."""
    value = None
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(f"{flag}="):
            value = arg.split("=", 1)[1]
    return value


def _check_queues(args: Sequence[str], template: bool, environment: EnvironmentFiles) -> None:
    """Refuse a unit that names no queues: ``supervise`` would exit at every start."""
    if (
        template
        or _flag_value(args, "--queues") is not None
        or "EBSQS_QUEUES" in environment.values
    ):
        return
    unread = (
        f" ({', '.join(environment.unreadable)} cannot be read here)"
        if environment.unreadable
        else ""
    )
    raise click.UsageError(
        "the unit names no queues, so it could not start: add --queues emails,reports, set "
        f"EBSQS_QUEUES in an --environment-file{unread}, or write a --template unit"
    )


def _writable_paths(
    args: Sequence[str], environment: EnvironmentFiles, directory: str
) -> tuple[str, ...]:
    """The directories the service writes besides its RuntimeDirectory: the SQLite broker's
    (the default broker is a SQLite file in the working directory) and the pidfile's."""
    paths = []
    broker = _flag_value(args, "--broker") or environment.values.get("EBSQS_BROKER_URL")
    if broker is None and environment.unreadable:
        click.echo(
            f"note: cannot read {', '.join(environment.unreadable)} here: if it sets a sqlite:/// "
            "EBSQS_BROKER_URL, pass --broker too, so the database's directory is writable "
            "(ReadWritePaths=); the unit makes everything else read-only",
            err=True,
        )
    else:
        sqlite = sqlite_directory(broker or DEFAULT_BROKER_URL, directory)
        paths += [sqlite] if sqlite else []
    pidfile = _flag_value(args, "--pidfile") or environment.values.get("EBSQS_PIDFILE")
    if pidfile:
        paths.append(os.path.dirname(os.path.normpath(os.path.join(directory, pidfile))))
    return tuple(dict.fromkeys(paths))


def _parse_as_supervise(args: Sequence[str]) -> None:
    """Check the flags with ``supervise``'s own parser now, not when systemd first starts it.

    ``--queues`` may come from the environment file or the template's instance name, so a
    stand-in is added when it is missing; nothing else is required.
    """
    ctx = click.get_current_context()
    root = ctx.find_root().command
    supervise = root.get_command(ctx, "supervise") if isinstance(root, click.Group) else None
    if supervise is None:
        return
    stand_in = [] if any(a.split("=", 1)[0] == "--queues" for a in args) else ["--queues", "q"]
    try:
        supervise.make_context("supervise", [*args, *stand_in], parent=ctx)
    except click.UsageError as exc:
        message = exc.format_message()
        raise click.UsageError(f"not a valid supervise command line: {message}") from None


def _warn_about_environment() -> None:
    """The unit will not see this shell's EBSQS_* settings: say so (on stderr)."""
    names = sorted(name for name in os.environ if name.startswith("EBSQS_"))
    if names:
        click.echo(
            f"note: {', '.join(names)} set here will not reach the service: "
            "put them in an --environment-file",
            err=True,
        )


@click.command("status")
@_locate_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per supervisor.")
def status(status_file_path: str | None, pidfile: str | None, as_json: bool) -> None:
    """Show what every child of the running supervisor(s) is doing."""
    docs = _load(status_file_path, pidfile)
    for index, doc in enumerate(docs):
        view = status_doc.live_view(doc)
        if as_json:
            click.echo(json.dumps(view))
            continue
        if index:
            click.echo("")
        click.echo(status_doc.render_table(view))


@click.command("healthcheck")
@_locate_options
@click.option(
    "--max-age",
    type=click.FloatRange(min=0, min_open=True),
    default=status_doc.DEFAULT_MAX_AGE,
    show_default=True,
    help="Seconds after which the status file counts as stale.",
)
def healthcheck(status_file_path: str | None, pidfile: str | None, max_age: float) -> None:
    """Exit 0 if the supervisor and all its children are healthy, else 1 with the reason.

    For container HEALTHCHECK and probes. Idle children waiting on empty queues are healthy.
    """
    try:
        docs = _load(status_file_path, pidfile)
    except click.ClickException as exc:
        click.echo(f"unhealthy: {exc.message}")
        sys.exit(1)
    for doc in docs:
        health = status_doc.check_health(doc, max_age=max_age)
        if not health.ok:
            click.echo(f"unhealthy: {health.reason}")
            sys.exit(1)
    pids = ", ".join(str(doc["master"]["pid"]) for doc in docs)
    click.echo(f"healthy: master {pids}")


def _load(status_file_path: str | None, pidfile: str | None) -> list[dict[str, Any]]:
    """The status documents to report on: the named one, or every live one found.

    Without a file named, files of masters that are gone are skipped (a SIGKILLed master
    cannot remove its own), unless no master is alive: then the newest is shown, dead.
    """
    paths = status_doc.find_status_files(status_file_path, pidfile)
    if not paths:
        places = f"{status_doc.default_dir()} or {status_doc.SYSTEM_RUNTIME_DIR}"
        raise click.ClickException(f"no ebsqs supervisor status found in {places}")
    docs = []
    for path in paths:
        try:
            docs.append(status_doc.read_status(path))
        except status_doc.StatusError as exc:
            if len(paths) == 1:
                raise click.ClickException(str(exc)) from None
    if not docs:
        raise click.ClickException(f"no readable status file among {', '.join(map(str, paths))}")
    if status_file_path or pidfile:
        return docs
    alive = [doc for doc in docs if status_doc.master_alive(doc)]
    return alive or docs[:1]
