"""``manage.py process_queue --queues a,b``: django-eb-sqs's command, now running the supervisor.

The same flag as before (whitespace-tolerant, ``prefix:`` entries resolved against the broker's
queues, names with or without the queue prefix), plus every option of ``ebsqs supervise``
(``--workers``, ``--concurrency``, ``--executor``, ``--graceful-timeout`` ...), whose defaults
apply: a few children per queue, each running one task at a time.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ebsqs.app import split_list
from ebsqs.brokers import from_url
from ebsqs.config import load_settings
from ebsqs.contrib.django.cli import DEST_PREFIX, add_cli_options, cli_argv, run_cli
from ebsqs.contrib.django.queues import resolve_queues
from ebsqs.errors import EbsqsError

_OURS = ("queues",)


class Command(BaseCommand):
    help = (
        "Process tasks from one or more queues with the ebsqs supervisor. --queues takes "
        "comma-separated names, name:children, and prefix:<start> entries; the other options "
        "are those of `ebsqs supervise`."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--queues",
            "-q",
            dest="queue_names",
            help="Names of queues to process, separated by commas (prefix:<start> for every "
            "queue whose name starts so).",
        )
        add_cli_options(parser, "supervise", skip=_OURS)

    def handle(self, *args: Any, **options: Any) -> None:
        entries = split_list(options["queue_names"])
        if not entries:
            raise CommandError("Queue names (--queues) not specified")
        try:
            settings = load_settings(broker_url=options.get(DEST_PREFIX + "broker"))
            names = resolve_queues(entries, settings, from_url(settings.broker_url))
        except EbsqsError as exc:
            raise CommandError(str(exc)) from exc
        run_cli(
            ["supervise", "--queues", ",".join(names), *cli_argv(options, "supervise", _OURS)],
            prog_name="manage.py process_queue",
        )
