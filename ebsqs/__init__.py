"""ebsqs: a supervised, prefork task queue for Python and Django on Amazon SQS.

Importing this package does no work: no broker, no client, no settings are touched until a task
is sent or a worker starts.
"""

from ebsqs.backoff import Backoff
from ebsqs.context import TaskContext, current
from ebsqs.errors import (
    EbsqsError,
    EnvelopeError,
    MaxRetriesReachedException,
    MessageTooLargeError,
    Retry,
    SerializationError,
    SoftTimeLimitExceeded,
)
from ebsqs.producer import SendOptions
from ebsqs.task import Task, task

__all__ = [
    "Backoff",
    "EbsqsError",
    "EnvelopeError",
    "MaxRetriesReachedException",
    "MessageTooLargeError",
    "Retry",
    "SendOptions",
    "SerializationError",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskContext",
    "current",
    "task",
]

__version__ = "0.1.0"
