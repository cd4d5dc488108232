"""``process_queue --queues`` entries, django-eb-sqs style, as the logical queue names ebsqs takes.

django-eb-sqs's producers added ``EB_SQS_QUEUE_PREFIX`` to queue names but its ``process_queue``
did not, so its users wrote the full names there (``--queues eb-sqs-emails``). ebsqs applies the
prefix on both sides, so ``--queues emails`` is the new spelling; an entry that already starts
with the prefix is taken as a full name, so the old command lines keep working.

``prefix:<start>`` entries name every queue whose name starts with ``<start>`` (the queue prefix
applied the same way), found on the broker when the command starts. Dead-letter queues are left
out: consuming them would run every failure again.
"""

from __future__ import annotations

from collections.abc import Iterable

from ebsqs.brokers import Broker
from ebsqs.config import Settings
from ebsqs.errors import ConfigurationError
from ebsqs.log import get_logger

log = get_logger(__name__)

PREFIX_ENTRY = "prefix:"


def resolve_queues(entries: Iterable[str], settings: Settings, broker: Broker) -> list[str]:
    """Logical queue names (``name`` or ``name:count``) for ``--queues`` entries, in order.

    Raises:
        ConfigurationError: a ``prefix:`` entry that matches no queue.
    """
    names: list[str] = []
    for entry in entries:
        if entry.startswith(PREFIX_ENTRY):
            found = queues_with_prefix(entry[len(PREFIX_ENTRY) :].strip(), settings, broker)
            if not found:
                raise ConfigurationError(
                    f"no queue matches {entry!r} (looked for queues starting with "
                    f"{settings.physical_queue(_logical(entry[len(PREFIX_ENTRY) :], settings))!r})"
                )
            names += found
        else:
            name, colon, count = entry.partition(":")
            names.append(_logical(name.strip(), settings) + colon + count.strip())
    return list(dict.fromkeys(names))


def queues_with_prefix(start: str, settings: Settings, broker: Broker) -> list[str]:
    """Logical names of the broker's queues starting with ``start``, dead-letter queues left out."""
    physical_start = settings.physical_queue(_logical(start, settings))
    found = []
    for physical in broker.list_queues(physical_start):
        if physical.removesuffix(".fifo").endswith(settings.dead_letter_suffix):
            continue
        found.append(physical[len(settings.queue_prefix) :])
    return found


def _logical(name: str, settings: Settings) -> str:
    prefix = settings.queue_prefix
    if prefix and name.startswith(prefix):
        log.warning(
            "queue_name_prefixed",
            entry=name,
            queue=name[len(prefix) :],
            hint="ebsqs adds the queue prefix itself; name the queue without it",
        )
        return name[len(prefix) :]
    return name
