"""The ``ebsqs`` command line. Thin: parse flags, configure, call into the library.

Every flag can also be set through the environment: the shared ones by the names shown in
``--help`` (``EBSQS_BROKER_URL``, ``EBSQS_APP``, ``EBSQS_QUEUES`` ...), the rest as
``EBSQS_<COMMAND>_<FLAG>``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ebsqs import executors, log
from ebsqs.app import load_app, split_list
from ebsqs.brokers import from_url
from ebsqs.config import (
    DEFAULT_GRACEFUL_TIMEOUT,
    DEFAULT_HEARTBEAT_TIMEOUT,
    Settings,
    load_settings,
    queue_limits,
    soft_over_hard,
)
from ebsqs.dashboard.deadletters import redrive
from ebsqs.errors import ConfigurationError, EbsqsError, ExitCode, exit_code_for
from ebsqs.log import get_logger
from ebsqs.ops import cli as ops_cli
from ebsqs.ops.status import probe_writable, status_path
from ebsqs.producer import Call, NamedTask, Sendable, SendOptions, ensure_queue
from ebsqs.producer import send as send_calls
from ebsqs.registry import registry
from ebsqs.worker import FastStop, Worker, WorkerOptions
from ebsqs.worker.idle import token_directory

F = TypeVar("F", bound=Callable[..., Any])

logger = get_logger(__name__)


def broker_option(fn: F) -> F:
    return click.option(
        "--broker",
        envvar="EBSQS_BROKER_URL",
        help="Broker URL: sqs://, sqlite:///file.db or memory:// [env EBSQS_BROKER_URL; "
        "default sqlite:///ebsqs.sqlite3].",
    )(fn)


def app_option(fn: F) -> F:
    return click.option(
        "--app",
        "apps",
        envvar="EBSQS_APP",
        multiple=True,
        help="Module(s) defining the tasks, comma-separated or repeated [env EBSQS_APP].",
    )(fn)


def log_options(fn: F) -> F:
    fn = click.option(
        "--log-level",
        envvar="EBSQS_LOG_LEVEL",
        type=click.Choice(log.LEVELS, case_sensitive=False),
        default="info",
        show_default=True,
    )(fn)
    return click.option(
        "--log-format",
        envvar="EBSQS_LOG_FORMAT",
        type=click.Choice(["auto", "console", "json"]),
        default="auto",
        show_default=True,
        help="console on a terminal and JSON otherwise, unless set.",
    )(fn)


def queues_option(required: bool = True) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        return click.option(
            "--queues",
            envvar="EBSQS_QUEUES",
            required=required,
            help="Comma-separated queue names [env EBSQS_QUEUES].",
        )(fn)

    return decorate


def _check_time_limits(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """Callback of ``--time-limit`` and ``--soft-time-limit``: each is well formed, and no soft
    limit is over the hard limit of the same queue (the soft one would never fire first).

    Both options carry it: click calls it as it processes each, so whichever comes second finds
    the other in ``ctx.params`` and compares the two. ``systemd-unit`` parses its flags with
    ``supervise``'s parser, so a unit is checked the same way.
    """
    try:
        if value:
            queue_limits(value, f"--{str(param.name).replace('_', '-')}")
        hard_name, soft_name = "time_limit", "soft_time_limit"
        other = soft_name if param.name == hard_name else hard_name
        if other in ctx.params:
            limits = {param.name: value, other: ctx.params[other]}
            problem = soft_over_hard(
                limits[hard_name] or "",
                limits[soft_name] or "",
                ("--time-limit", "--soft-time-limit"),
            )
            if problem is not None:
                raise click.BadParameter(problem, param_hint="--soft-time-limit")
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def worker_options(fn: F) -> F:
    """Flags shared by `worker` and `supervise`."""
    for option in reversed(
        [
            click.option(
                "--executor",
                envvar="EBSQS_EXECUTOR",
                default="inline",
                show_default=True,
                help="inline, thread, process, asyncio or a plugin [env EBSQS_EXECUTOR].",
            ),
            click.option(
                "--concurrency",
                envvar="EBSQS_CONCURRENCY",
                type=click.IntRange(min=1),
                default=1,
                show_default=True,
                help="Tasks run at once by each worker process's executor.",
            ),
            click.option(
                "--wait",
                envvar="EBSQS_WAIT_SECONDS",
                type=click.IntRange(0, 20),
                default=None,
                help="Long-poll seconds per receive (default 20).",
            ),
            click.option(
                "--time-limit",
                envvar="EBSQS_TIME_LIMIT",
                default=None,
                callback=_check_time_limits,
                help="Hard limit of tasks that set none: seconds, or per queue "
                "(emails=60,reports=600,*=3600) [env EBSQS_TIME_LIMIT].",
            ),
            click.option(
                "--soft-time-limit",
                envvar="EBSQS_SOFT_TIME_LIMIT",
                default=None,
                callback=_check_time_limits,
                help="Soft limit of tasks that set none, in the same form; never over the hard "
                "limit of the same queue.",
            ),
            click.option(
                "--visibility-timeout",
                envvar="EBSQS_VISIBILITY_TIMEOUT",
                type=click.IntRange(1, 43200),
                default=None,
                help="Seconds a received message stays hidden; extended while its task runs.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


@click.group(
    context_settings={"auto_envvar_prefix": "EBSQS", "help_option_names": ["-h", "--help"]}
)
@click.version_option(package_name="ebsqs")
def main() -> None:
    """ebsqs: a supervised task queue on Amazon SQS (and an embedded SQLite broker)."""
    log.configure("auto", "warning")  # stdout is for results; `worker` reconfigures its own


def run_cli() -> None:
    """Console entry point: library errors become one-line messages, not tracebacks."""
    try:
        main.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(ExitCode.ERROR)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except EbsqsError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exit_code_for(exc))


def settings_from(broker: str | None, **overrides: Any) -> Settings:
    """Settings from every source, with CLI flags on top."""
    return load_settings(broker_url=broker, **overrides)


@main.command()
@app_option
@queues_option()
@broker_option
@worker_options
@click.option("--max-tasks", type=click.IntRange(min=1), default=None, help="Exit after N tasks.")
@log_options
def worker(
    apps: tuple[str, ...],
    queues: str,
    broker: str | None,
    executor: str,
    concurrency: int,
    wait: int | None,
    time_limit: str | None,
    soft_time_limit: str | None,
    visibility_timeout: int | None,
    max_tasks: int | None,
    log_format: log.LogFormat,
    log_level: str,
) -> None:
    """Run one worker process (no supervisor) on QUEUES until SIGTERM or SIGINT.

    The first signal drains (stop receiving, finish the running task, release the rest);
    a second one stops at once.
    """
    log.configure(log_format, log_level, role="worker")
    settings = settings_from(
        broker,
        wait_seconds=wait,
        visibility_timeout=visibility_timeout,
        time_limit=time_limit,
        soft_time_limit=soft_time_limit,
    )
    load_app(split_list(apps))
    names = split_list(queues)
    if not names:
        raise click.BadParameter("name at least one queue", param_hint="--queues")
    the_worker = Worker(
        from_url(settings.broker_url),
        settings,
        executors.create(executor, concurrency, registry),
        WorkerOptions(
            queues=tuple(names),
            wait_seconds=settings.wait_seconds,
            visibility_timeout=settings.visibility_timeout,
            max_tasks=max_tasks,
            ack_wait=settings.ack_wait,
        ),
    )
    install_stop_signals(the_worker)
    the_worker.start()
    try:
        the_worker.run()
    except FastStop:
        sys.exit(ExitCode.ERROR)
    if the_worker.overran:
        sys.exit(ExitCode.OVERRUN)


def _check_writable(path: str | Path | None, flag: str, *, create_directory: bool = True) -> None:
    """A usage error now if the master could not write ``path`` (see ``probe_writable``)."""
    if path is None:
        return
    try:
        probe_writable(path, create_directory=create_directory)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise click.BadParameter(f"cannot write {path}: {reason}", param_hint=flag) from None


def install_stop_signals(the_worker: Worker) -> None:
    """TERM/INT: drain; a second one: stop at once (see :meth:`Worker.on_stop_signal`)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: the_worker.on_stop_signal(signum))


@main.command()
@app_option
@queues_option()
@broker_option
@worker_options
@click.option(
    "--workers",
    envvar="EBSQS_WORKERS",
    type=click.IntRange(min=1),
    default=None,
    help="Children per queue, for queues given without a count [env EBSQS_WORKERS; default 2].",
)
@click.option(
    "--graceful-timeout",
    envvar="EBSQS_GRACEFUL_TIMEOUT",
    type=click.FloatRange(min=0),
    default=DEFAULT_GRACEFUL_TIMEOUT,
    show_default=True,
    help="Seconds draining children may finish running tasks before SIGKILL.",
)
@click.option(
    "--heartbeat-timeout",
    envvar="EBSQS_HEARTBEAT_TIMEOUT",
    type=click.FloatRange(min=1),
    default=DEFAULT_HEARTBEAT_TIMEOUT,
    show_default=True,
    help="Seconds without a heartbeat (or past a task's hard limit) before a child is killed.",
)
@click.option(
    "--max-tasks-per-child",
    envvar="EBSQS_MAX_TASKS_PER_CHILD",
    type=click.IntRange(min=1),
    default=None,
    help="Replace a child after about N tasks (each child's N varies by 10 percent).",
)
@click.option(
    "--max-memory-per-child",
    envvar="EBSQS_MAX_MEMORY_PER_CHILD",
    type=click.IntRange(min=1),
    default=None,
    help="Replace a child whose resident memory exceeds this many MiB.",
)
@click.option(
    "--pidfile",
    envvar="EBSQS_PIDFILE",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the master's pid to this file.",
)
@click.option(
    "--status-file",
    envvar="EBSQS_STATUS_FILE",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where the master keeps its status for `ebsqs status` and `ebsqs healthcheck` "
    "[default: next to --pidfile, else $XDG_RUNTIME_DIR/ebsqs/ or /tmp/ebsqs-UID/].",
)
@click.option(
    "--metrics-port",
    envvar="EBSQS_METRICS_PORT",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus metrics from the master on this port [default: off].",
)
@click.option(
    "--metrics-host",
    envvar="EBSQS_METRICS_HOST",
    default="127.0.0.1",
    show_default=True,
    help="Address the metrics server listens on.",
)
@log_options
def supervise(
    apps: tuple[str, ...],
    queues: str,
    broker: str | None,
    executor: str,
    concurrency: int,
    wait: int | None,
    time_limit: str | None,
    soft_time_limit: str | None,
    visibility_timeout: int | None,
    workers: int | None,
    graceful_timeout: float,
    heartbeat_timeout: float,
    max_tasks_per_child: int | None,
    max_memory_per_child: int | None,
    pidfile: str | None,
    status_file: str | None,
    metrics_port: int | None,
    metrics_host: str,
    log_format: log.LogFormat,
    log_level: str,
) -> None:
    """Run a master that forks worker children per queue and keeps them running.

    QUEUES is "a,b" (each gets --workers children, 2 by default) or "a:8,b:2". Signals to the
    master: TERM/INT drain gracefully (a second one stops fast), QUIT stops fast, HUP rolls
    every child onto fresh code, TTIN/TTOU add/remove one child per queue.
    """
    # Imported here: the other commands need not pay for the supervisor (and psutil).
    from ebsqs.ops.operations import Operations
    from ebsqs.supervisor import master
    from ebsqs.supervisor.config import DEFAULT_WORKERS, SupervisorConfig, parse_queues
    from ebsqs.supervisor.services import services

    log.configure(log_format, log_level, role="master")
    settings = settings_from(
        broker,
        wait_seconds=wait,
        visibility_timeout=visibility_timeout,
        time_limit=time_limit,
        soft_time_limit=soft_time_limit,
    )
    try:
        specs = parse_queues(queues, workers or DEFAULT_WORKERS)
    except EbsqsError as exc:
        raise click.BadParameter(str(exc), param_hint="--queues") from None
    # Found now, not after start: a pidfile write fails the start with a traceback, and a
    # status file that cannot be written only logs, so healthchecks would fail forever.
    _check_writable(pidfile, "--pidfile", create_directory=False)
    status = status_path(status_file, pidfile, os.getpid())  # this process is the master
    _check_writable(status, "--status-file")
    if not apps and not len(registry):  # under Django, tasks are autodiscovered before this
        logger.warning(
            "app_not_given",
            consequence="no task is registered: every message is dead-lettered as unknown",
            fix="pass --app myapp.tasks (or set EBSQS_APP)",
        )
    config = SupervisorConfig(
        apps=tuple(split_list(apps)),
        queues=specs,
        settings=settings,
        executor=executor,
        concurrency=concurrency,
        graceful_timeout=graceful_timeout,
        heartbeat_timeout=heartbeat_timeout,
        max_tasks_per_child=max_tasks_per_child,
        max_memory_per_child=max_memory_per_child,
        pidfile=pidfile,
        log_format=log_format,
        log_level=log_level,
        # Beside the status file, which names this supervisor: its children take turns.
        poll_token_dir=str(token_directory(status)),
    )
    operations = Operations.create(
        config, status_file=status_file, metrics_port=metrics_port, metrics_host=metrics_host
    )
    sys.exit(master.run(config, [operations, *services(config)]))


@main.command()
@click.argument("task_name")
@click.option("--args", "args_json", default="[]", help="Positional arguments as a JSON list.")
@click.option("--kwargs", "kwargs_json", default="{}", help="Keyword arguments as a JSON object.")
@click.option("--delay", type=click.FloatRange(min=0), default=None, help="Seconds to wait.")
@click.option("--queue", default=None, help="Queue (default: the task's, or the default queue).")
@app_option
@broker_option
def send(
    task_name: str,
    args_json: str,
    kwargs_json: str,
    delay: float | None,
    queue: str | None,
    apps: tuple[str, ...],
    broker: str | None,
) -> None:
    """Send one TASK_NAME invocation; print its task id.

    With --app, a registered task is sent as ``.delay()`` would send it (its queue, retries
    and delay), on the broker these flags name; otherwise the name is sent as given.
    """
    args = _json_param(args_json, list, "--args")
    kwargs = _json_param(kwargs_json, dict, "--kwargs")
    settings = settings_from(broker)
    load_app(split_list(apps))
    target: Sendable
    if task_name in registry:
        target = registry.get(task_name)
        options = registry.get(task_name).send_with(queue_name=queue, delay=delay).options
    elif apps:
        raise click.BadParameter(f"no task {task_name!r} in {', '.join(apps)}", param_hint="TASK")
    else:
        target, options = NamedTask(task_name), SendOptions(queue_name=queue, delay=delay)
    # These settings, not the producer's own reading of them: --broker must reach it.
    [task_id] = send_calls(target, [Call(tuple(args), kwargs)], options, settings=settings)
    click.echo(task_id)


def _json_param(text: str, kind: type, flag: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=flag) from None
    if not isinstance(value, kind):
        raise click.BadParameter(f"must be a JSON {kind.__name__}", param_hint=flag)
    return value


@main.group()
def queues() -> None:
    """Create, list, inspect and purge queues."""


@queues.command("create")
@click.argument("names", nargs=-1, required=True)
@broker_option
def queues_create(names: tuple[str, ...], broker: str | None) -> None:
    """Create queues, each with its dead-letter queue and a redrive policy."""
    settings = settings_from(broker)
    the_broker = from_url(settings.broker_url)
    for name in names:
        ensure_queue(the_broker, settings, settings.physical_queue(name))
        click.echo(
            f"{settings.physical_queue(name)} (dead letters: {settings.dead_letter_queue(name)})"
        )


@queues.command("list")
@click.option("--prefix", default="", help="Only queues whose name starts with this.")
@broker_option
def queues_list(prefix: str, broker: str | None) -> None:
    """List queues."""
    settings = settings_from(broker)
    for name in from_url(settings.broker_url).list_queues(settings.physical_queue(prefix)):
        click.echo(name)


@queues.command("stats")
@click.argument("names", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per queue.")
@broker_option
def queues_stats(names: tuple[str, ...], as_json: bool, broker: str | None) -> None:
    """Show approximate visible / in-flight / delayed counts."""
    settings = settings_from(broker)
    the_broker = from_url(settings.broker_url)
    rows = [the_broker.stats(settings.physical_queue(name)) for name in names]
    if as_json:
        for row in rows:
            click.echo(
                json.dumps(
                    {
                        "queue": row.queue,
                        "visible": row.visible,
                        "in_flight": row.in_flight,
                        "delayed": row.delayed,
                    }
                )
            )
        return
    width = max(len("queue"), *(len(row.queue) for row in rows))
    click.echo(f"{'queue':<{width}}  {'visible':>8}  {'in flight':>9}  {'delayed':>8}")
    for row in rows:
        click.echo(f"{row.queue:<{width}}  {row.visible:>8}  {row.in_flight:>9}  {row.delayed:>8}")


@queues.command("purge")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@broker_option
def queues_purge(name: str, yes: bool, broker: str | None) -> None:
    """Delete every message in a queue."""
    settings = settings_from(broker)
    physical = settings.physical_queue(name)
    if not yes:
        click.confirm(f"Delete every message in {physical}?", abort=True)
    from_url(settings.broker_url).purge(physical)
    click.echo(f"purged {physical}")


@main.group()
def dlq() -> None:
    """Inspect and redrive dead-letter queues."""


@dlq.command("redrive")
@click.argument("queue")
@click.option("--max", "limit", type=click.IntRange(min=1), default=None, help="Move at most N.")
@broker_option
def dlq_redrive(queue: str, limit: int | None, broker: str | None) -> None:
    """Move dead letters of QUEUE back to QUEUE, unchanged (each runs once more)."""
    settings = settings_from(broker)
    source, target = settings.dead_letter_queue(queue), settings.physical_queue(queue)
    moved = redrive(from_url(settings.broker_url), source, target, limit)
    click.echo(f"moved {moved} message(s) from {source} to {target}")


@dlq.command("peek")
@click.argument("queue")
@click.option("--limit", type=click.IntRange(1, 10), default=10, show_default=True)
@broker_option
def dlq_peek(queue: str, limit: int, broker: str | None) -> None:
    """Show why dead letters of QUEUE are there (they stay in the queue)."""
    settings = settings_from(broker)
    the_broker = from_url(settings.broker_url)
    batch = the_broker.receive(settings.dead_letter_queue(queue), limit, wait_seconds=0)
    for message in batch:
        attributes = message.attributes
        click.echo(
            f"{message.message_id}  task={attributes.get('ebsqs-task', '?')}  "
            f"reason={attributes.get('ebsqs-reason', '?')}  "
            f"error={attributes.get('ebsqs-error-type', '')}: {attributes.get('ebsqs-error', '')}"
        )
    the_broker.change_visibility(batch, 0)


@main.command()
@app_option
@queues_option()
@broker_option
@click.option("--port", type=click.IntRange(0, 65535), default=8188, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Beyond loopback, "
              "EBSQS_DASHBOARD_TOKEN must be set.")  # fmt: skip
@click.option("--status", multiple=True, help="Status files or directories of masters to show "
              "[default: the local ones `ebsqs status` finds].")  # fmt: skip
@click.option("--show-arguments", is_flag=True, help="Show task arguments in dead letters.")
def dashboard(apps: tuple[str, ...], queues: str, broker: str | None, **options: Any) -> None:
    """Serve the web dashboard (queues, workers, dead letters, tasks); see ebsqs.dashboard."""
    from ebsqs.dashboard.server import run

    log.configure("auto", "info", role="dashboard")  # its address, and each action taken
    load_app(split_list(apps))
    run(settings_from(broker), split_list(queues), **options)


# -- operations: systemd-unit, status, healthcheck (implemented in ebsqs/ops/cli.py) --------
main.add_command(ops_cli.systemd_unit)
main.add_command(ops_cli.status)
main.add_command(ops_cli.healthcheck)


# -- periodic tasks (implemented in ebsqs/periodic/) -------------------------------------------
@main.group()
def periodic() -> None:
    """Periodic tasks (@periodic): their schedules and next runs."""


@periodic.command("list")
@app_option
@click.option("--count", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Next run times shown per task.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON object per task.")
def periodic_list(apps: tuple[str, ...], count: int, as_json: bool) -> None:
    """Each periodic task: its schedule, time zone, queue, missed-tick policy and next runs."""
    import datetime as dt

    from ebsqs.periodic import periodic_registry, upcoming
    from ebsqs.periodic.ticks import iso

    load_app(split_list(apps))
    settings = settings_from(None)
    now = dt.datetime.now(dt.UTC)
    for entry in periodic_registry.entries():
        queue = entry.task.queue_name or settings.default_queue
        runs = [iso(moment) for moment in upcoming(entry.schedule, now, count)]
        row = {
            "task": entry.name,
            "schedule": entry.schedule.describe(),
            "tz": entry.schedule.tz,
            "queue": queue,
            "missed": entry.missed,
            "next": runs,
        }
        if as_json:
            click.echo(json.dumps(row))
        else:
            click.echo(
                f"{entry.name}  {row['schedule']}  tz={row['tz']}  queue={queue}  "
                f"missed={entry.missed}  next: {', '.join(runs)}"
            )
    if not len(periodic_registry):
        click.echo("no periodic task is registered (is its module in --app?)", err=True)
