"""System checks (``manage.py check``), run by Django at startup of most commands.

Errors (the app cannot work):

- ``ebsqs.E001`` the settings cannot be read (a bad ``EBSQS`` dict or value) or the broker URL
  names no broker.
- ``ebsqs.E002`` a queue name SQS would refuse (the prefix, the default queue).
- ``ebsqs.E003`` an SQS broker with no region from the URL, the environment or AWS's config.

Warnings (it works, but probably not as intended):

- ``ebsqs.W001`` pickled bodies are accepted: anyone who can send to a queue can run code.
- ``ebsqs.W002`` django-eb-sqs settings that mean nothing in ebsqs.
- ``ebsqs.W003`` django-eb-sqs settings without ``EB_SQS_QUEUE_PREFIX``: django-eb-sqs's
  default prefix was ``eb-sqs-``, ebsqs's is empty, so the queue names changed.
- ``ebsqs.W004`` django-eb-sqs settings but no broker configured: ebsqs would use its embedded
  SQLite broker, not SQS as django-eb-sqs did.
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
    configured = _configured_ebsqs(settings)
    if "EB_SQS_QUEUE_PREFIX" not in in_use and "queue_prefix" not in configured:
        messages.append(
            checks.Warning(
                "django-eb-sqs settings are present but no queue prefix is set: django-eb-sqs "
                "prefixed queue names with 'eb-sqs-' by default, ebsqs does not",
                hint="Set EB_SQS_QUEUE_PREFIX = 'eb-sqs-' to keep using the same queues.",
                id="ebsqs.W003",
            )
        )
    if loaded is not None and loaded.broker_url == DEFAULT_BROKER_URL:
        messages.append(
            checks.Warning(
                "django-eb-sqs settings are present but no broker is configured: ebsqs would use "
                f"its embedded SQLite broker ({DEFAULT_BROKER_URL}), not SQS",
                hint="Set EB_AWS_REGION (django-eb-sqs used us-east-1) or "
                "EBSQS = {'broker_url': 'sqs://'}.",
                id="ebsqs.W004",
            )
        )
    return messages


def _configured_ebsqs(settings: Any) -> dict[str, Any]:
    try:
        return conf.ebsqs_dict(settings)
    except ConfigurationError:
        return {}  # reported as ebsqs.E001


def _error(number: int, message: str, hint: str) -> checks.Error:
    return checks.Error(message, hint=hint, id=f"ebsqs.E{number:03d}")
