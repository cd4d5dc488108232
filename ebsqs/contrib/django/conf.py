"""The settings bridge: Django settings as an ebsqs settings source, read every time.

``settings.EBSQS`` is a dict of :class:`ebsqs.config.Settings` field names (lower case), plus the
Django-only keys in :data:`DJANGO_ONLY`::

    EBSQS = {"broker_url": "sqs://eu-west-1", "queue_prefix": "shop-", "send_on_commit": True}

django-eb-sqs's names are read too, with the meaning they had there (see :data:`LEGACY`); a key
of ``EBSQS`` wins over the old name of the same setting. Names that mean nothing any more are
listed in :data:`OBSOLETE` and reported by the system check ``ebsqs.W002``.

Nothing is cached: :func:`settings_source` runs on every ``load_settings()``, so
``override_settings(EBSQS=...)`` takes effect in tests at once. Precedence over the other
sources (environment, CLI flags) is :mod:`ebsqs.config`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

from ebsqs.config import Settings
from ebsqs.errors import ConfigurationError

#: Keys of ``settings.EBSQS`` that only the Django integration reads, with their defaults.
#: ``send_on_commit``: ``.delay()`` inside ``transaction.atomic()`` sends when it commits.
#: ``retry_database_errors``: a task that failed because its database connection dropped is
#: retried (within its ``max_retries``) instead of dead-lettered.
#: ``outbox``: sends inside a transaction on ``outbox_database`` are written to the durable
#: outbox in that transaction and relayed to SQS after it commits
#: (:mod:`ebsqs.contrib.django.outbox`); ``outbox_poll_interval`` is the relay's seconds between
#: looks at the table (None: 5 on PostgreSQL, which also wakes it on commit, 1 elsewhere);
#: ``outbox_max_backoff`` caps the seconds a row waits after a failed send.
DJANGO_ONLY: dict[str, Any] = {
    "send_on_commit": False,
    "retry_database_errors": True,
    "outbox": False,
    "outbox_database": "default",
    "outbox_poll_interval": None,
    "outbox_max_backoff": 60.0,
}

#: django-eb-sqs's region setting: it always talked to SQS, in this region (us-east-1 by default).
LEGACY_REGION = "EB_AWS_REGION"

#: What a project that never set them got from django-eb-sqs 1.44 (its ``eb_sqs/settings.py``),
#: for the checks (``ebsqs.W003``, ``ebsqs.W004``) and the migration guide, whose table the tests
#: compare with this. Not applied: ebsqs's own defaults hold unless a setting names another.
LEGACY_DEFAULTS: dict[str, Any] = {
    LEGACY_REGION: "us-east-1",
    "EB_SQS_QUEUE_PREFIX": "",
    "EB_SQS_DEFAULT_QUEUE": "eb-sqs-default",
    "EB_SQS_DEFAULT_DELAY": 0,
    "EB_SQS_DEFAULT_MAX_RETRIES": 0,
    "EB_SQS_AUTO_ADD_QUEUE": False,
    "EB_SQS_EXECUTE_INLINE": False,
    "EB_SQS_WAIT_TIME_S": 2,
    "EB_SQS_QUEUE_VISIBILITY_TIMEOUT": 300,  # the string "300" there
}

#: The django-eb-sqs names that decide where messages go: one left to its default there and to
#: a different default here sends to (or reads from) another queue than before the move.
QUEUE_NAMING = ("EB_SQS_QUEUE_PREFIX", "EB_SQS_DEFAULT_QUEUE")


def _attempts_to_retries(value: Any) -> int:
    """django-eb-sqs's ``max_retries`` counted attempts (3 meant three runs); ebsqs's counts
    retries (3 means four runs). ``EB_SQS_DEFAULT_MAX_RETRIES = 3`` keeps three runs."""
    try:
        return max(int(value) - 1, 0)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"EB_SQS_DEFAULT_MAX_RETRIES must be a whole number, got {value!r}"
        ) from None


def _same(value: Any) -> Any:
    return value


#: django-eb-sqs name -> (ebsqs setting, conversion). Same meaning, new home.
LEGACY: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "EB_SQS_QUEUE_PREFIX": ("queue_prefix", _same),
    "EB_SQS_DEFAULT_QUEUE": ("default_queue", _same),
    "EB_SQS_DEFAULT_DELAY": ("default_delay", _same),
    "EB_SQS_DEFAULT_MAX_RETRIES": ("default_max_retries", _attempts_to_retries),
    "EB_SQS_AUTO_ADD_QUEUE": ("auto_create_queues", _same),
    "EB_SQS_EXECUTE_INLINE": ("eager", _same),
    "EB_SQS_WAIT_TIME_S": ("wait_seconds", _same),
    "EB_SQS_QUEUE_VISIBILITY_TIMEOUT": ("visibility_timeout", _same),
}

_HEALTH = "`manage.py healthcheck` asks the running supervisor instead of reading a file"

#: django-eb-sqs names that mean nothing in ebsqs, and why.
OBSOLETE: dict[str, str] = {
    "EB_SQS_USE_PICKLE": (
        "ebsqs always sends JSON; pickled bodies already queued are refused unless "
        "EBSQS['accept_pickle'] is True (unpickling runs code chosen by the sender)"
    ),
    "EB_SQS_FORCE_SERIALIZATION": "eager mode (EB_SQS_EXECUTE_INLINE) always serialises",
    "EB_SQS_MAX_NUMBER_OF_MESSAGES": "each worker receives what its executor can start",
    "NO_QUEUES_WAIT_TIME_S": "workers always have queues; prefix: entries resolve at start",
    "EB_SQS_DEFAULT_COUNT_RETRIES": "every retry counts against max_retries",
    "EB_SQS_GROUP_CALLBACK_TASK": "task groups and their callbacks are gone",
    "EB_SQS_REDIS_CLIENT": "task groups (and their Redis state) are gone",
    "EB_SQS_REDIS_EXPIRY": "task groups (and their Redis state) are gone",
    "EB_SQS_REDIS_KEY_PREFIX": "task groups (and their Redis state) are gone",
    "EB_SQS_WORKER_FACTORY": "workers are built by `ebsqs supervise`",
    "EB_SQS_DEAD_LETTER_MODE": (
        "failures are dead-lettered to <queue>-dlq by ebsqs itself; see `manage.py ebsqs dlq`"
    ),
    "EB_SQS_AWS_MAX_RETRIES": "use botocore's AWS_MAX_ATTEMPTS and AWS_RETRY_MODE variables",
    "EB_SQS_REFRESH_PREFIX_QUEUES_S": "prefix: entries of process_queue resolve when it starts",
    "EB_SQS_QUEUE_MESSAGE_RETENTION": "set MessageRetentionPeriod on the queue itself",
    "EB_SQS_MIN_HEALTHCHECK_WRITE_PERIOD_S": _HEALTH,
    "EB_SQS_HEALTHCHECK_UNHEALTHY_PERIOD_S": _HEALTH,
    "EB_SQS_HEALTHCHECK_FILE_NAME": _HEALTH,
}

_FIELDS = frozenset(field.name for field in fields(Settings))


def settings_source() -> dict[str, Any]:
    """The ebsqs settings Django's settings give, read now (registered in ``config.SOURCES``).

    Raises:
        ConfigurationError: ``EBSQS`` is not a dict or has a key ebsqs does not know.
    """
    from django.conf import settings

    if not settings.configured:
        return {}
    values = legacy_values(settings)
    configured = ebsqs_dict(settings)
    region = getattr(settings, LEGACY_REGION, None)
    if region and configured.get("broker_url") in (None, "sqs://"):
        # django-eb-sqs passed EB_AWS_REGION to boto3 explicitly; pin it the same way.
        configured["broker_url"] = f"sqs://{region}"
    values.update({key: value for key, value in configured.items() if key in _FIELDS})
    return values


def legacy_values(settings: Any) -> dict[str, Any]:
    """The ebsqs settings that django-eb-sqs's names (those set) translate to."""
    values = {}
    for name, (target, convert) in LEGACY.items():
        if hasattr(settings, name):
            values[target] = convert(getattr(settings, name))
    return values


def ebsqs_dict(settings: Any | None = None) -> dict[str, Any]:
    """``settings.EBSQS``, checked (``{}`` when unset).

    Raises:
        ConfigurationError: it is not a dict or has a key ebsqs does not know.
    """
    if settings is None:
        from django.conf import settings
    raw = getattr(settings, "EBSQS", None)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"settings.EBSQS must be a dict, not {type(raw).__name__}")
    unknown = sorted(set(raw) - _FIELDS - DJANGO_ONLY.keys())
    if unknown:
        known = ", ".join(sorted(_FIELDS | DJANGO_ONLY.keys()))
        raise ConfigurationError(
            f"settings.EBSQS has unknown key(s) {', '.join(map(repr, unknown))}; "
            f"the keys are lower-case setting names: {known}"
        )
    return dict(raw)


def django_option(name: str) -> Any:
    """A Django-only key of ``settings.EBSQS`` (see :data:`DJANGO_ONLY`), read now."""
    return ebsqs_dict().get(name, DJANGO_ONLY[name])


def legacy_names_in_use(settings: Any | None = None) -> list[str]:
    """The django-eb-sqs setting names present in Django's settings."""
    if settings is None:
        from django.conf import settings
    names = [*LEGACY, LEGACY_REGION, *OBSOLETE]
    return [name for name in names if hasattr(settings, name)]
