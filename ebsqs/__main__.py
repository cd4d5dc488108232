"""``python -m ebsqs``: the same as the ``ebsqs`` command."""

from ebsqs.cli import run_cli

run_cli()
