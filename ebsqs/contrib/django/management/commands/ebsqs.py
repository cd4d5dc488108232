"""``manage.py ebsqs <command> ...``: the whole ``ebsqs`` command line, with Django set up."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from ebsqs.contrib.django.cli import run_cli


class Command(BaseCommand):
    help = (
        "Run any ebsqs command with this project's settings and tasks, e.g. "
        "`manage.py ebsqs supervise --queues emails --workers 4` or `manage.py ebsqs queues "
        "list`. `manage.py ebsqs` alone lists the commands; `manage.py ebsqs <command> --help` "
        "shows a command's options."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "cli_args",
            nargs=argparse.REMAINDER,
            metavar="COMMAND [ARGS]...",
            help="An ebsqs command and its arguments, passed on unchanged.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        run_cli(options["cli_args"] or ["--help"])
