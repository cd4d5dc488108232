"""``manage.py healthcheck``: exit 0 while the supervisor on this host is healthy, non-zero
otherwise (for container ``HEALTHCHECK`` and probes).

django-eb-sqs's command of the same name read a file its worker touched every few seconds; this
one runs ``ebsqs healthcheck``, which reads the status the supervisor's master keeps: the master
is alive and every child is sending heartbeats. Empty queues are healthy. The options are those
of ``ebsqs healthcheck`` (where to find the status, how old it may be).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ebsqs.contrib.django.cli import add_cli_options, cli_argv, has_command, run_cli


class Command(BaseCommand):
    help = (
        "Exit 0 if the ebsqs supervisor on this host is healthy, non-zero otherwise. The "
        "options are those of `ebsqs healthcheck`."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        add_cli_options(parser, "healthcheck")

    def handle(self, *args: Any, **options: Any) -> None:
        if not has_command("healthcheck"):
            raise CommandError("this version of ebsqs has no `ebsqs healthcheck` command")
        run_cli(["healthcheck", *cli_argv(options, "healthcheck")], prog_name="manage.py")
