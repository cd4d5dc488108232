"""The exception tree, and the exit codes errors map to.

Everything ebsqs raises on purpose is an :class:`EbsqsError`. :class:`ExitCode` is the one list
of exit codes: what ``ebsqs`` commands return, a protocol between a supervisor's children and its
master (as in gunicorn), and what the generated systemd unit refuses to restart on.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes of every ebsqs process.

    A child exiting with :attr:`BOOT` could not start (its app or configuration is broken), so
    the master stops instead of restarting it forever, and systemd does not restart the master.
    """

    OK = 0
    ERROR = 1  # an unexpected failure
    USAGE = 2  # bad flags or arguments
    BOOT = 3  # the app or the configuration cannot work; restarting will not help
    OVERRUN = 4  # a task overran a hard limit its executor cannot enforce; replace the process


class EbsqsError(Exception):
    """Base class of every error ebsqs raises on purpose."""


class ConfigurationError(EbsqsError):
    """Settings, flags or URLs that cannot work (a bad broker URL, an unknown executor)."""


class AppImportError(ConfigurationError):
    """A task module could not be imported: a boot failure, never worth a restart loop."""


def exit_code_for(exc: EbsqsError) -> ExitCode:
    """The exit code of a command that failed with ``exc``: a broken app, refused credentials
    or a damaged broker file are boot failures (a restart cannot fix them)."""
    boot = (AppImportError, BrokerAccessDenied, BrokerDamaged)
    return ExitCode.BOOT if isinstance(exc, boot) else ExitCode.ERROR


class EnvelopeError(EbsqsError):
    """A message body that cannot be trusted or decoded. Dead-lettered, never retried."""


class SerializationError(EbsqsError, TypeError):
    """Task arguments that the wire format cannot carry, raised at ``.delay()``."""


class MessageGroupError(EbsqsError, ValueError):
    """A message group or deduplication id SQS would refuse, raised at ``.delay()``."""


class MessageTooLargeError(EbsqsError, ValueError):
    """An encoded body larger than the broker accepts, raised at ``.delay()``."""

    def __init__(
        self, size: int, limit: int, task_name: str, source: str = "the broker's limit"
    ) -> None:
        super().__init__(
            f"message for task {task_name!r} is {size} bytes, over the limit of {limit} bytes "
            f"({source}); set EBSQS large_payload_bucket to send it through S3, or pass a "
            "reference (an S3 key, a database id) instead of the data"
        )
        self.size = size
        self.limit = limit
        self.source = source


class UnknownTaskError(EnvelopeError):
    """A message names a task that is not registered in this process."""


class BrokerError(EbsqsError):
    """The broker failed an operation after retries."""


class QueueDoesNotExist(BrokerError):
    """The named queue does not exist on the broker."""

    def __init__(self, queue: str) -> None:
        super().__init__(
            f"queue {queue!r} does not exist; create it with `ebsqs queues create {queue}`"
        )
        self.queue = queue


class BrokerUnavailable(BrokerError):
    """The broker's endpoint cannot be reached or keeps refusing us."""


class PartialBatchError(BrokerError):
    """Some entries of a batch call failed for good (after retrying those entries).

    Attributes:
        failed: ``{index in the batch: reason}`` for every entry that failed.
        succeeded: ``{index: message id}`` (sends) or ``{index: ""}`` for the rest.
    """

    def __init__(self, operation: str, failed: dict[int, str], succeeded: dict[int, str]) -> None:
        reasons = "; ".join(f"#{i}: {why}" for i, why in sorted(failed.items())[:5])
        super().__init__(
            f"{operation}: {len(failed)} of {len(failed) + len(succeeded)} failed ({reasons})"
        )
        self.failed = failed
        self.succeeded = succeeded


class MaxRetriesReachedException(EbsqsError):
    """Raised by ``Task.retry()`` when the task has no retries left (as in django-eb-sqs)."""

    def __init__(self, retries: int) -> None:
        super().__init__(f"maximum retries reached ({retries})")
        self.retries = retries


class Retry(Exception):
    """Control flow raised by ``Task.retry()``: end this attempt and schedule the next.

    Deliberately not an :class:`EbsqsError`, so ``except EbsqsError`` in user code does not
    swallow it by accident.
    """

    def __init__(self, delay: float | None = None, reason: str | None = None) -> None:
        super().__init__(reason or "retry requested")
        self.delay = delay
        self.reason = reason


class SoftTimeLimitExceeded(EbsqsError):
    """Raised inside a task that ran past its soft time limit (where the executor can)."""


class BrokerAccessDenied(ConfigurationError, BrokerError):
    """The broker refused who we are or what we asked: unknown or bad credentials, a missing
    IAM permission, a KMS key we may not use.

    A configuration error, so a worker that meets it at start is a boot failure (exit code
    :attr:`ExitCode.BOOT`): restarting does not grant permissions. Met later, it is a broker
    error like any other, and the worker keeps trying.
    """


class BrokerDamaged(ConfigurationError, BrokerError):
    """The broker's own storage is damaged: a SQLite file that is not a database, or whose
    pages are malformed.

    A boot failure at start, like :class:`BrokerAccessDenied`: a restart reads the same file.
    """
