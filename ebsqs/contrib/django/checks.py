"""System checks (``manage.py check``), run by Django at startup of most commands.

Errors (the app cannot work):

- ``ebsqs.E001`` the settings cannot be read (a bad ``EBSQS`` dict or value) or the broker URL
  names no broker.
- ``ebsqs.E002`` a queue name SQS would refuse (the prefix, the default queue).
- ``ebsqs.E003`` an SQS broker with no region from the URL, the environment or AWS's config.

- ``ebsqs.E004`` the durable outbox's settings are wrong (``outbox_database`` is not a key of
  ``DATABASES``, a poll interval or backoff that is not a positive number).

Warnings (it works, but probably not as intended):

- ``ebsqs.W001`` pickled bodies are accepted: anyone who can send to a queue can run code.
- ``ebsqs.W002`` django-eb-sqs settings that mean nothing in ebsqs.
- ``ebsqs.W003`` django-eb-sqs settings, and a queue-naming setting left to a default that
  changed: django-eb-sqs 1.44 sent tasks that name no queue to ``eb-sqs-default``, ebsqs sends
  them to ``default`` (its prefix was empty, as ebsqs's is). See ``conf.LEGACY_DEFAULTS``.
- ``ebsqs.W004`` django-eb-sqs settings but no broker configured: ebsqs would use its embedded
  SQLite broker, not SQS (in ``us-east-1`` unless ``EB_AWS_REGION`` said otherwise) as
  django-eb-sqs did.
- ``ebsqs.W005`` the durable outbox is on but its table is missing from its database (a
  warning, not an error, so that ``migrate``, which runs the checks, can still create it).
"""

from __future__ import annotations

import re
from typing import Any

from django.core import checks

from ebsqs.config import DEFAULT_BROKER_URL, Settings, load_settings
from ebsqs.contrib.django import conf
from ebsqs.errors import ConfigurationError

#: Letters, digits, hyphens and underscores (then ``.fifo`` for FIFO queues).
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def check_ebsqs(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Every ebsqs check (registered by the app's ``ready()``)."""
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        hint = "Fix settings.EBSQS, the EB_SQS_* settings or the EBSQS_* environment variables."
        return [_error(1, str(exc), hint), *_legacy_warnings(None)]
    messages = _broker_errors(settings) + _queue_errors(settings)
    if settings.accept_pickle:
        messages.append(
            checks.Warning(
                "ebsqs accepts pickled message bodies: anyone who can send to these queues can "
                "run code in your workers.",
                hint="Turn accept_pickle off once the pickled django-eb-sqs messages are drained.",
                id="ebsqs.W001",
            )
        )
    return messages + _legacy_warnings(settings)


def _broker_errors(settings: Settings) -> list[checks.CheckMessage]:
    from ebsqs.brokers import from_url

    try:
        from_url(settings.broker_url)
    except ConfigurationError as exc:
        return [
            _error(1, str(exc), "Set EBSQS['broker_url'] to sqs://, sqlite:///... or memory://.")
        ]
    if settings.broker_url.lower().startswith("sqs://") and not _sqs_region(settings.broker_url):
        return [
            _error(
                3,
                f"the SQS broker ({settings.broker_url}) has no region",
                "Name it in the URL (sqs://eu-west-1), in EB_AWS_REGION, or in AWS_REGION / "
                "AWS_DEFAULT_REGION.",
            )
        ]
    return []


def _sqs_region(url: str) -> str | None:
    import boto3

    from ebsqs.brokers import from_url

    region = getattr(from_url(url), "region", None)
    return region or boto3.session.Session().region_name


def _queue_errors(settings: Settings) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    for label, queue in (
        ("default queue", settings.physical_queue(settings.default_queue)),
        ("default queue's dead-letter queue", settings.dead_letter_queue(settings.default_queue)),
    ):
        if len(queue) > 80 or not _QUEUE_NAME.match(queue.removesuffix(".fifo")):
            errors.append(
                _error(
                    2,
                    f"the {label} {queue!r} is not a valid SQS queue name",
                    "Queue names (with the prefix and the dead-letter suffix) are letters, "
                    "digits, - and _, 80 characters at most (.fifo included).",
                )
            )
    return errors


def _legacy_warnings(loaded: Settings | None) -> list[checks.CheckMessage]:
    from django.conf import settings

    in_use = conf.legacy_names_in_use(settings)
    if not in_use:
        return []
    messages: list[checks.CheckMessage] = [
        checks.Warning(
            f"{name} is a django-eb-sqs setting that ebsqs does not use",
            hint=conf.OBSOLETE[name],
            id="ebsqs.W002",
        )
        for name in in_use
        if name in conf.OBSOLETE
    ]
    messages += _changed_queue_names(in_use, _configured_ebsqs(settings), loaded)
    if loaded is not None and loaded.broker_url == DEFAULT_BROKER_URL:
        region = conf.LEGACY_DEFAULTS[conf.LEGACY_REGION]
        messages.append(
            checks.Warning(
                "django-eb-sqs settings are present but no broker is configured: ebsqs would use "
                f"its embedded SQLite broker ({DEFAULT_BROKER_URL}), not SQS",
                hint=f"Set EB_AWS_REGION (django-eb-sqs used {region} unless it was set) or "
                "EBSQS = {'broker_url': 'sqs://'}.",
                id="ebsqs.W004",
            )
        )
    return messages


def _changed_queue_names(
    in_use: list[str], configured: dict[str, Any], loaded: Settings | None
) -> list[checks.CheckMessage]:
    """``ebsqs.W003``: a queue-naming setting that django-eb-sqs and ebsqs default differently,
    set nowhere (not by its old name, in ``EBSQS``, or in the environment)."""
    found: list[checks.CheckMessage] = []
    defaults = Settings()
    for name in conf.QUEUE_NAMING:
        field, _ = conf.LEGACY[name]
        theirs, ours = conf.LEGACY_DEFAULTS[name], getattr(defaults, field)
        now = getattr(loaded, field) if loaded is not None else ours
        if theirs == ours or name in in_use or field in configured or now != ours:
            continue
        found.append(
            checks.Warning(
                f"django-eb-sqs settings are present but {name} is not set: django-eb-sqs 1.44 "
                f"used {theirs!r} by default, ebsqs uses {ours!r}, so the queue names changed",
                hint=f"Set {name} = {theirs!r} to keep using the same queues.",
                id="ebsqs.W003",
            )
        )
    return found


def _configured_ebsqs(settings: Any) -> dict[str, Any]:
    try:
        return conf.ebsqs_dict(settings)
    except ConfigurationError:
        return {}  # reported as ebsqs.E001


def _error(number: int, message: str, hint: str) -> checks.Error:
    return checks.Error(message, hint=hint, id=f"ebsqs.E{number:03d}")


def check_outbox(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``ebsqs.E004`` and ``ebsqs.W005``: the durable outbox, when it is on (registered by the
    app's ``ready()``). Looks at the database only then, and says nothing if it is unreachable
    (``manage.py check`` must work without one)."""
    from django.db import DatabaseError, connections

    from ebsqs.contrib.django.models import OutboxMessage
    from ebsqs.contrib.django.outbox import outbox_options

    try:
        options = outbox_options()
    except ConfigurationError as exc:
        return [_error(4, str(exc), "Fix the outbox keys of settings.EBSQS.")]
    if not options.enabled:
        return []
    try:
        tables = connections[options.alias].introspection.table_names()
    except DatabaseError:
        return []
    if OutboxMessage._meta.db_table in tables:
        return []
    return [
        checks.Warning(
            f"EBSQS['outbox'] is on but the table {OutboxMessage._meta.db_table!r} is missing "
            f"from database {options.alias!r}: every send inside a transaction will fail",
            hint=f"Run `manage.py migrate ebsqs --database {options.alias}`.",
            id="ebsqs.W005",
        )
    ]
