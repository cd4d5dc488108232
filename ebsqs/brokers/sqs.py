"""The Amazon SQS broker, on boto3.

The boto3 client is created lazily, once per process: a client built before ``fork()`` is never
used by the child, which builds its own on first use. Region, credentials and endpoint come from
boto3's standard chain; the endpoint of a local server (moto, fauxqs, ElasticMQ, LocalStack) is
set with ``AWS_ENDPOINT_URL_SQS`` or ``AWS_ENDPOINT_URL``, which boto3 reads itself.

Queues: each queue's URL is asked once and cached, and so is its ``MaximumMessageSize`` (read
by :meth:`SQSBroker.body_limit` and checked before every send, attributes included); both are
forgotten together when SQS says the queue does not exist. ``ensure_queue`` sets that size on
the queue and its dead-letter queue, and creates FIFO queues with content-based deduplication
as a backstop for other producers (ebsqs always sends a deduplication id). FIFO queues take no
per-message delay: a send that asks for one is refused before anything is sent.

Errors: a missing queue raises :class:`~ebsqs.errors.QueueDoesNotExist`; an endpoint that cannot
be reached, or that keeps throttling after botocore's retries, raises
:class:`~ebsqs.errors.BrokerUnavailable`; credentials SQS does not accept, or a permission (IAM
or KMS) we lack, raise :class:`~ebsqs.errors.BrokerAccessDenied`; any other refusal raises
:class:`~ebsqs.errors.BrokerError`; missing credentials or region raise
:class:`~ebsqs.errors.ConfigurationError`. The botocore exception is always the ``__cause__``.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    ProfileNotFound,
)

from ebsqs.brokers.base import (
    DEFAULT_MAX_BODY_BYTES,
    MAX_BATCH,
    MAX_VISIBILITY_SECONDS,
    WORKER_ATTRIBUTES,
    BodyLimit,
    OutgoingMessage,
    QueueSettings,
    QueueStats,
    ReceivedMessage,
)
from ebsqs.brokers.checks import check_batch, check_fifo_names, check_messages, check_receive
from ebsqs.errors import (
    BrokerAccessDenied,
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    EbsqsError,
    PartialBatchError,
    QueueDoesNotExist,
)
from ebsqs.log import get_logger

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient
    from mypy_boto3_sqs.literals import MessageSystemAttributeNameType, QueueAttributeNameType
    from mypy_boto3_sqs.type_defs import (
        ChangeMessageVisibilityBatchRequestEntryTypeDef,
        DeleteMessageBatchRequestEntryTypeDef,
        MessageAttributeValueTypeDef,
        MessageTypeDef,
        ReceiveMessageRequestTypeDef,
        SendMessageBatchRequestEntryTypeDef,
    )

__all__ = ["DEFAULT_CONFIG", "SQSBroker"]

log = get_logger(__name__)

T = TypeVar("T")
E = TypeVar("E")

#: botocore settings ebsqs uses unless the caller merges its own over them. ``max_attempts``
#: counts retries (six attempts in all), spaced by botocore's jittered exponential backoff.
#: The read timeout must outlast a 20 s long poll; the pool is shared by the threads of a
#: thread executor. No parameter validation: ebsqs builds every request itself, from values it
#: checked (:mod:`.checks`), and botocore's walk of the request's shapes cost 9 us a receive
#: and 36 us a batch of ten deletes, about 2 % of a no-op task's CPU.
DEFAULT_CONFIG = Config(
    retries={"mode": "standard", "max_attempts": 5},
    connect_timeout=5,
    read_timeout=30,
    max_pool_connections=50,
    parameter_validation=False,
)
#: Deletes and visibility changes: answered in milliseconds when SQS is reachable, so a short
#: timeout and three attempts in all. Through a network blackhole the keeper's thread is free
#: again within about ten seconds, rather than the three minutes of six 30-second reads, and
#: the next extension goes out as soon as the network is back. (The long poll needs the 30 s.)
SETTLE_CONFIG = Config(
    retries={"mode": "standard", "total_max_attempts": 3},
    connect_timeout=2,
    read_timeout=3,
    max_pool_connections=50,
    parameter_validation=False,
)
_MAIN, _SETTLE = "main", "settle"

# With the JSON protocol botocore reports the short code, with the query protocol the long one.
_NOT_FOUND = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
_ALREADY_EXISTS = frozenset(
    {"QueueAlreadyExists", "QueueNameExists", "AWS.SimpleQueueService.QueueNameExists"}
)
_PURGE_IN_PROGRESS = frozenset(
    {"AWS.SimpleQueueService.PurgeQueueInProgress", "PurgeQueueInProgress"}
)
_THROTTLED = frozenset(
    {
        "RequestThrottled",
        "ThrottlingException",
        "Throttling",
        "KmsThrottled",
        "KMS.ThrottlingException",  # SQS's name for its KMS key being throttled
        "RequestLimitExceeded",
    }
)

#: Who we are is unknown to AWS (a bad access key id, or secret), or what we asked is not allowed.
#: The JSON protocol names them ``...Exception``, the query protocol without the suffix.
_UNAUTHENTICATED = frozenset(
    {
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "InvalidSecurity",
    }
)
_FORBIDDEN = frozenset({"AccessDenied", "AccessDeniedException"})
#: The queue is encrypted with a KMS key this identity may not use.
_KMS_DENIED = frozenset({"KMS.AccessDeniedException", "KmsAccessDenied"})
_DENIED = _UNAUTHENTICATED | _FORBIDDEN | _KMS_DENIED

#: Attempts for batch entries that fail transiently (``SenderFault`` false), and the base pause.
_ENTRY_ATTEMPTS = 3
_ENTRY_BACKOFF_SECONDS = 0.05

_NO_CREDENTIALS = (
    "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, "
    "or run with an instance / task role (boto3's standard credential chain)"
)
_NO_REGION = (
    "no AWS region for SQS: set AWS_DEFAULT_REGION (or AWS_REGION), or name the region in the "
    "broker URL, e.g. sqs://eu-west-1"
)

#: A batch call's answer: ``{entry id: message id or ""}`` and the raw ``Failed`` entries.
_Answers = tuple[dict[str, str], list[Mapping[str, Any]]]

#: What every receive asks for (the worker's hot path: nothing it does not use), and what a
#: receive with metadata asks for besides.
_SYSTEM_ATTRIBUTES: tuple[MessageSystemAttributeNameType, ...] = (
    "ApproximateReceiveCount",
    "MessageGroupId",
    "MessageDeduplicationId",
)
_METADATA_SYSTEM_ATTRIBUTES: tuple[MessageSystemAttributeNameType, ...] = (
    "ApproximateReceiveCount",
    "SentTimestamp",
    "MessageGroupId",
    "MessageDeduplicationId",
)


@dataclass(frozen=True, slots=True)
class _Known:
    """What the broker keeps of a queue: its URL and, once read, its size limit."""

    url: str
    limit: BodyLimit | None = None


class SQSBroker:
    """A broker on Amazon SQS (or any server that speaks SQS's JSON protocol).

    Args:
        region: the AWS region; None takes it from boto3's chain (``AWS_DEFAULT_REGION``...).
        max_body_bytes: the largest message accepted on any queue, whatever the queue's
            ``MaximumMessageSize`` (checked before anything is sent).
        config: botocore settings merged over :data:`DEFAULT_CONFIG` (timeouts, retries,
            proxies).

    Thread-safe: one client per process is shared by every thread.
    """

    def __init__(
        self,
        region: str | None = None,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        config: Config | None = None,
    ) -> None:
        self.region = region
        self.max_body_bytes = max_body_bytes
        self._configs = {
            _MAIN: DEFAULT_CONFIG.merge(config) if config else DEFAULT_CONFIG,
            _SETTLE: SETTLE_CONFIG.merge(config) if config else SETTLE_CONFIG,
        }
        self._lock = threading.Lock()
        self._lock_pid = os.getpid()
        self._clients: dict[str, tuple[int, SQSClient]] = {}  # kind: (pid, client)
        self._known: dict[str, _Known] = {}

    @classmethod
    def from_url(cls, url: str) -> SQSBroker:
        """``sqs://``, ``sqs://eu-west-1`` or ``sqs://?region=eu-west-1`` (see
        :func:`ebsqs.brokers.from_url`)."""
        parts = urlsplit(url)
        options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        return cls(region=parts.netloc or options.get("region") or None)

    @property
    def client(self) -> SQSClient:
        """This process's boto3 SQS client for receives, sends and queue calls, created on first
        use (and again after a fork).

        Public so callers can register botocore event hooks (tracing, metrics) on it; deletes
        and visibility changes go through :attr:`settle_client` (see :meth:`clients`).
        """
        return self._client_of(_MAIN)

    @property
    def settle_client(self) -> SQSClient:
        """The client of deletes and visibility changes: :data:`SETTLE_CONFIG`'s short timeouts,
        so a network blackhole costs a worker seconds on them, not minutes."""
        return self._client_of(_SETTLE)

    def clients(self) -> tuple[SQSClient, SQSClient]:
        """Both clients of this process, for event hooks that must see every request."""
        return self.client, self.settle_client

    @property
    def endpoint_url(self) -> str:
        """Where requests go (``AWS_ENDPOINT_URL_SQS``, or the region's SQS endpoint)."""
        return str(self.client.meta.endpoint_url)

    def _client_of(self, kind: str) -> SQSClient:
        pid = os.getpid()
        made = self._clients.get(kind)
        if made is not None and made[0] == pid:
            return made[1]
        with self._process_lock():
            # Both at once, in whichever thread comes first: made later, the settle client would
            # be built in the keeper's thread, beside a running task, just when it is needed.
            for each in (_MAIN, _SETTLE):
                made = self._clients.get(each)
                if made is None or made[0] != pid:
                    self._clients[each] = (pid, self._create_client(self._configs[each]))
            return self._clients[kind][1]

    def _process_lock(self) -> threading.Lock:
        """The lock guarding the clients, replaced in a forked child.

        A lock copied by fork may be held by a parent thread that does not exist in the child,
        so it would never be released there.
        """
        pid = os.getpid()
        if self._lock_pid != pid:
            self._lock = threading.Lock()
            self._lock_pid = pid
        return self._lock

    def _create_client(self, config: Config) -> SQSClient:
        # A session of our own: boto3's default session is not thread-safe, its clients are.
        try:
            session = boto3_session_class()(region_name=self.region)
        except ProfileNotFound as exc:
            raise ConfigurationError(f"{exc}: fix or unset AWS_PROFILE") from exc
        if not session.region_name:
            raise ConfigurationError(_NO_REGION)
        try:
            client = session.client("sqs", config=config)
        except NoRegionError as exc:
            raise ConfigurationError(_NO_REGION) from exc
        log.debug(
            "sqs_client_created",
            pid=os.getpid(),
            region=session.region_name,
            endpoint=client.meta.endpoint_url,
        )
        return client

    def close(self) -> None:
        """Drop this process's clients and the queue URL cache (a later call makes new ones)."""
        with self._process_lock():
            made, self._clients = self._clients, {}
            for pid, client in made.values():
                if pid == os.getpid():
                    client.close()
            self._known.clear()

    # -- calls and errors ----------------------------------------------------------------

    def _call(
        self, queue: str | None, request: Callable[[SQSClient], T], *, settle: bool = False
    ) -> T:
        """Run one SQS request (botocore retries it), translating its errors into ours.

        ``settle``: a delete or visibility change, sent through :attr:`settle_client`.
        """
        client = self.settle_client if settle else self.client
        try:
            return request(client)
        except ClientError as exc:
            raise self._client_error(exc, queue, client.meta.endpoint_url) from exc
        except (ConnectionError, HTTPClientError) as exc:
            raise BrokerUnavailable(
                f"cannot reach SQS at {client.meta.endpoint_url} "
                f"(check AWS_ENDPOINT_URL_SQS / network): {exc}"
            ) from exc
        except NoCredentialsError as exc:
            raise ConfigurationError(_NO_CREDENTIALS) from exc

    def _client_error(self, exc: ClientError, queue: str | None, endpoint: str) -> EbsqsError:
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _NOT_FOUND and queue is not None:
            self._known.pop(queue, None)
            return QueueDoesNotExist(queue)
        if code in _PURGE_IN_PROGRESS:
            return BrokerError(
                f"queue {queue!r} was purged less than 60 s ago: SQS allows one purge per queue "
                "every 60 seconds, try again later"
            )
        if code in _DENIED:
            return _access_denied(code, exc.operation_name, queue, endpoint, error)
        if code in _THROTTLED or status >= 500:
            return BrokerUnavailable(
                f"SQS at {endpoint} kept refusing {exc.operation_name} after retries "
                f"({code or status}): {error.get('Message', '')}"
            )
        message = error.get("Message", "")
        return BrokerError(
            f"SQS {exc.operation_name} failed for queue {queue!r}: {code}: {message}"
        )

    def _url(self, queue: str) -> str:
        """The queue's URL, asked of SQS once per name and cached."""
        known = self._known.get(queue)
        if known is not None:
            return known.url
        url = self._call(queue, lambda c: c.get_queue_url(QueueName=queue)["QueueUrl"])
        self._known[queue] = _Known(url)
        return url

    def body_limit(self, queue: str) -> BodyLimit:
        """The queue's ``MaximumMessageSize`` (read once, cached with its URL), capped by the
        broker's ``max_body_bytes``; the broker's for a missing queue."""
        try:
            return self._limit(queue, self._url(queue))
        except QueueDoesNotExist:
            source = f"the SQS broker's limit (queue {queue!r} does not exist)"
            return BodyLimit(self.max_body_bytes, source)

    def _limit(self, queue: str, url: str) -> BodyLimit:
        known = self._known.get(queue)
        if known is not None and known.limit is not None:
            return known.limit
        try:
            attributes = self._attributes(queue, url, ["MaximumMessageSize"])
        except BrokerAccessDenied as exc:
            # A producer allowed only sqs:SendMessage can still send: SQS checks the size too.
            log.warning("sqs_queue_size_unreadable", queue=queue, error=str(exc))
            limit = BodyLimit(
                self.max_body_bytes,
                f"the SQS broker's limit (MaximumMessageSize of queue {queue!r} is unreadable)",
            )
        else:
            size = int(attributes.get("MaximumMessageSize", DEFAULT_MAX_BODY_BYTES))
            limit = self._capped(queue, size)
        self._known[queue] = _Known(url, limit)
        return limit

    def _capped(self, queue: str, size: int) -> BodyLimit:
        if self.max_body_bytes < size:
            return BodyLimit(self.max_body_bytes, "the SQS broker's limit")
        return BodyLimit(size, f"MaximumMessageSize of SQS queue {queue!r}")

    def _batch(
        self,
        operation: str,
        queue: str,
        entries: Mapping[str, E],
        request: Callable[[list[E], SQSClient], _Answers],
        *,
        settle: bool = False,
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Run a batch call, retrying only the entries that failed transiently.

        Returns ``{entry id: message id or ""}`` for the entries that succeeded and
        ``{entry id: reason}`` for those that failed for good. ``settle``: see :meth:`_call`.
        """
        pending = dict(entries)
        done: dict[str, str] = {}
        failed: dict[str, str] = {}
        for attempt in range(1, _ENTRY_ATTEMPTS + 1):
            succeeded, errors = self._call(
                queue, partial(request, list(pending.values())), settle=settle
            )
            done.update(succeeded)
            transient = _sort_failures(pending, succeeded, errors, failed)
            if attempt == _ENTRY_ATTEMPTS:
                failed.update(transient)
                break
            pending = {entry_id: pending[entry_id] for entry_id in transient}
            if not pending:
                break
            log.warning(
                "sqs_batch_entries_retried",
                operation=operation,
                queue=queue,
                attempt=attempt,
                entries=len(pending),
                errors=sorted(set(transient.values())),
            )
            time.sleep(_ENTRY_BACKOFF_SECONDS * 2 ** (attempt - 1) * (1 + random.random()))
        return done, failed

    # -- messages ------------------------------------------------------------------------

    def send(self, queue: str, message: OutgoingMessage) -> str:
        """Send one message; return its message id."""
        return self.send_batch(queue, [message])[0]

    def send_batch(self, queue: str, messages: Sequence[OutgoingMessage]) -> list[str]:
        """Send up to ten messages in one call; return their ids in order.

        Raises:
            QueueDoesNotExist: there is no such queue.
            MessageTooLargeError: a message is over the queue's :meth:`body_limit`.
            BrokerError: a bad batch size, delay or attribute, or a FIFO rule broken (nothing
                is sent).
            PartialBatchError: some entries still failed after retrying the transient failures.
        """
        check_batch(messages)
        url = self._url(queue)
        check_messages(queue, messages, self._limit(queue, url), fifo=queue.endswith(".fifo"))
        entries = {str(i): _send_entry(str(i), m) for i, m in enumerate(messages)}

        def request(
            batch: list[SendMessageBatchRequestEntryTypeDef], client: SQSClient
        ) -> _Answers:
            return _answers(client.send_message_batch(QueueUrl=url, Entries=batch))

        done, failed = self._batch("send_message_batch", queue, entries, request)
        if failed:
            raise PartialBatchError(
                "send_batch",
                failed={int(i): why for i, why in failed.items()},
                succeeded={int(i): message_id for i, message_id in done.items()},
            )
        return [done[str(i)] for i in range(len(messages))]

    def receive(
        self,
        queue: str,
        max_messages: int,
        wait_seconds: float,
        visibility_timeout: int | None = None,
        *,
        metadata: bool = True,
    ) -> list[ReceivedMessage]:
        """Receive up to ``max_messages`` (1..10), long-polling up to ``wait_seconds``.

        SQS waits in whole seconds: a fractional wait is rounded down. Without ``metadata``
        only the receive count, group, deduplication id and :data:`WORKER_ATTRIBUTES` are
        asked for.
        """
        check_receive(max_messages, wait_seconds, visibility_timeout)
        request: ReceiveMessageRequestTypeDef = {
            "QueueUrl": self._url(queue),
            "MaxNumberOfMessages": max_messages,
            "WaitTimeSeconds": int(wait_seconds),
        }
        if metadata:
            request["MessageAttributeNames"] = ["All"]
            request["MessageSystemAttributeNames"] = list(_METADATA_SYSTEM_ATTRIBUTES)
        else:
            request["MessageAttributeNames"] = list(WORKER_ATTRIBUTES)
            request["MessageSystemAttributeNames"] = list(_SYSTEM_ATTRIBUTES)
        if visibility_timeout is not None:
            request["VisibilityTimeout"] = visibility_timeout
        response = self._call(queue, lambda c: c.receive_message(**request))
        return [_received(queue, raw) for raw in response.get("Messages", [])]

    def ack(self, messages: Sequence[ReceivedMessage]) -> dict[str, str]:
        """Delete messages by receipt, ten per call.

        Returns:
            ``{message_id: reason}`` for the messages SQS refused to delete.
        """
        return self._per_queue(messages, self._delete_chunk)

    def change_visibility(
        self, messages: Sequence[ReceivedMessage], timeout: int
    ) -> dict[str, str]:
        """Set the visibility of received messages, ten per call (0 releases them at once).

        Returns:
            ``{message_id: reason}`` for the entries that failed.
        """
        if not 0 <= timeout <= MAX_VISIBILITY_SECONDS:
            raise BrokerError(f"visibility must be 0..{MAX_VISIBILITY_SECONDS} s, got {timeout}")
        return self._per_queue(messages, partial(self._change_chunk, timeout=timeout))

    def _per_queue(
        self,
        messages: Sequence[ReceivedMessage],
        run: Callable[[str, Sequence[ReceivedMessage]], dict[str, str]],
    ) -> dict[str, str]:
        by_queue: dict[str, list[ReceivedMessage]] = {}
        for message in messages:
            by_queue.setdefault(message.queue, []).append(message)
        failed: dict[str, str] = {}
        for queue, queued in by_queue.items():
            for start in range(0, len(queued), MAX_BATCH):
                failed.update(run(queue, queued[start : start + MAX_BATCH]))
        return failed

    def _delete_chunk(self, queue: str, chunk: Sequence[ReceivedMessage]) -> dict[str, str]:
        url = self._url(queue)
        entries: dict[str, DeleteMessageBatchRequestEntryTypeDef] = {
            str(i): {"Id": str(i), "ReceiptHandle": m.receipt} for i, m in enumerate(chunk)
        }

        def request(
            batch: list[DeleteMessageBatchRequestEntryTypeDef], client: SQSClient
        ) -> _Answers:
            return _answers(client.delete_message_batch(QueueUrl=url, Entries=batch))

        _, failed = self._batch("delete_message_batch", queue, entries, request, settle=True)
        return {chunk[int(i)].message_id: why for i, why in failed.items()}

    def _change_chunk(
        self, queue: str, chunk: Sequence[ReceivedMessage], *, timeout: int
    ) -> dict[str, str]:
        url = self._url(queue)
        entries: dict[str, ChangeMessageVisibilityBatchRequestEntryTypeDef] = {
            str(i): {"Id": str(i), "ReceiptHandle": m.receipt, "VisibilityTimeout": timeout}
            for i, m in enumerate(chunk)
        }

        def request(
            batch: list[ChangeMessageVisibilityBatchRequestEntryTypeDef], client: SQSClient
        ) -> _Answers:
            return _answers(client.change_message_visibility_batch(QueueUrl=url, Entries=batch))

        _, failed = self._batch(
            "change_message_visibility_batch", queue, entries, request, settle=True
        )
        return {chunk[int(i)].message_id: why for i, why in failed.items()}

    # -- queues --------------------------------------------------------------------------

    def ensure_queue(self, queue: str, settings: QueueSettings | None = None) -> None:
        """Create the queue, its dead-letter queue and redrive policy; update them if they exist.

        The dead-letter queue is created first, since the redrive policy names its ARN. A FIFO
        queue's dead-letter queue must be FIFO too, and both names must end in ``.fifo``. Both
        get ``MaximumMessageSize`` = ``settings.max_body_bytes``; FIFO ones get content-based
        deduplication.

        Raises:
            ConfigurationError: a FIFO queue (or its dead-letter queue) not named ``*.fifo``,
                or a standard one that is (checked before calling SQS).
        """
        settings = settings or QueueSettings()
        check_fifo_names(queue, settings)
        shared: dict[QueueAttributeNameType, str] = {
            "MaximumMessageSize": str(settings.max_body_bytes)
        }
        if settings.fifo:
            shared |= {"FifoQueue": "true", "ContentBasedDeduplication": "true"}
        attributes: dict[QueueAttributeNameType, str] = {
            "VisibilityTimeout": str(settings.visibility_timeout),
            **shared,
        }
        if settings.dead_letter_queue:
            dlq_url = self._create(settings.dead_letter_queue, shared)
            arn = self._attributes(settings.dead_letter_queue, dlq_url, ["QueueArn"])["QueueArn"]
            attributes["RedrivePolicy"] = json.dumps(
                {"deadLetterTargetArn": arn, "maxReceiveCount": str(settings.max_receive_count)}
            )
        self._create(queue, attributes)

    def _create(self, queue: str, attributes: Mapping[QueueAttributeNameType, str]) -> str:
        """Create the queue, or bring an existing one to ``attributes``; cache its URL and the
        ``MaximumMessageSize`` it now has (``attributes`` always name one).
        """

        def request(client: SQSClient) -> str:
            try:
                return client.create_queue(QueueName=queue, Attributes=attributes)["QueueUrl"]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in _ALREADY_EXISTS:
                    raise
            # It exists with other attributes: bring them to what was asked. FifoQueue cannot
            # change (and a mismatch would have failed on the name check already).
            url = client.get_queue_url(QueueName=queue)["QueueUrl"]
            changed: dict[QueueAttributeNameType, str] = {
                k: v for k, v in attributes.items() if k != "FifoQueue"
            }
            if changed:
                client.set_queue_attributes(QueueUrl=url, Attributes=changed)
                log.info("sqs_queue_attributes_updated", queue=queue, attributes=sorted(changed))
            return url

        url = self._call(queue, request)
        size = int(attributes["MaximumMessageSize"])
        self._known[queue] = _Known(url, self._capped(queue, size))
        return url

    def _attributes(
        self, queue: str, url: str, names: list[QueueAttributeNameType]
    ) -> dict[str, str]:
        response = self._call(
            queue, lambda c: c.get_queue_attributes(QueueUrl=url, AttributeNames=names)
        )
        return {str(name): value for name, value in response.get("Attributes", {}).items()}

    def list_queues(self, prefix: str = "") -> list[str]:
        """Names of the queues whose name starts with ``prefix``, sorted (every page)."""

        def request(client: SQSClient) -> list[str]:
            pages = client.get_paginator("list_queues").paginate(
                QueueNamePrefix=prefix, PaginationConfig={"PageSize": 1000}
            )
            return [url for page in pages for url in page.get("QueueUrls", [])]

        names = []
        for url in self._call(None, request):
            name = url.rsplit("/", 1)[-1]
            self._known.setdefault(name, _Known(url))
            names.append(name)
        return sorted(names)

    def stats(self, queue: str) -> QueueStats:
        """Approximate visible / in-flight / delayed counts, as SQS reports them."""
        counts = self._attributes(
            queue,
            self._url(queue),
            [
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )
        return QueueStats(
            queue,
            visible=int(counts.get("ApproximateNumberOfMessages", 0)),
            in_flight=int(counts.get("ApproximateNumberOfMessagesNotVisible", 0)),
            delayed=int(counts.get("ApproximateNumberOfMessagesDelayed", 0)),
        )

    def purge(self, queue: str) -> None:
        """Delete every message in the queue. SQS allows one purge per queue every 60 s."""
        url = self._url(queue)
        self._call(queue, lambda c: c.purge_queue(QueueUrl=url))

    def delete_queue(self, queue: str) -> None:
        """Delete the queue itself."""
        url = self._url(queue)
        self._call(queue, lambda c: c.delete_queue(QueueUrl=url))
        self._known.pop(queue, None)


def boto3_session_class() -> type[boto3.session.Session]:
    """boto3's own ``Session`` class, even where a library replaced it.

    Importing AWS's ``sqs_extended_client`` (a team migrating from it may) replaces
    ``boto3.session.Session`` for the whole process with a subclass whose SQS clients fetch
    claim-check payloads themselves, from any bucket, and rewrite receipt handles: ebsqs's bucket,
    digest and signature checks would be bypassed. ebsqs's clients come from the class it extends.
    """
    for cls in boto3.session.Session.__mro__:
        if cls.__module__ == "boto3.session" and cls.__name__ == "Session":
            return cls
    return boto3.session.Session


def _access_denied(
    code: str, operation: str, queue: str | None, endpoint: str, error: Mapping[str, Any]
) -> BrokerAccessDenied:
    """The error for a refusal that retrying, or restarting, cannot fix: it names what to fix."""
    if code in _UNAUTHENTICATED:
        fix = (
            "AWS does not accept these credentials: check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (or the profile or role), and that they belong to the "
            f"account and region of {endpoint}"
        )
    elif code in _KMS_DENIED:
        fix = (
            "the queue is encrypted with a KMS key this identity may not use: allow "
            "kms:GenerateDataKey and kms:Decrypt on the queue's key"
        )
    else:
        fix = f"allow sqs:{operation} on the queue in this identity's IAM policy"
    target = f"queue {queue!r}" if queue is not None else "SQS"
    message = error.get("Message", "")
    return BrokerAccessDenied(f"{target}: {operation} denied ({code}: {message}); {fix}")


def _send_entry(entry_id: str, message: OutgoingMessage) -> SendMessageBatchRequestEntryTypeDef:
    entry: SendMessageBatchRequestEntryTypeDef = {"Id": entry_id, "MessageBody": message.body}
    if message.attributes:
        entry["MessageAttributes"] = {
            name: _attribute(value) for name, value in message.attributes.items()
        }
    if message.group_id is not None:
        entry["MessageGroupId"] = message.group_id
    if message.dedup_id is not None:
        entry["MessageDeduplicationId"] = message.dedup_id
    if message.delay:
        # 0 is SQS's default, so it is left out (FIFO queues, which refuse any, get none).
        entry["DelaySeconds"] = message.delay
    return entry


def _attribute(value: str | int) -> MessageAttributeValueTypeDef:
    if isinstance(value, str):
        return {"DataType": "String", "StringValue": value}
    return {"DataType": "Number", "StringValue": str(value)}


def _answers(response: Mapping[str, Any]) -> _Answers:
    succeeded = {e["Id"]: e.get("MessageId", "") for e in response.get("Successful", [])}
    return succeeded, list(response.get("Failed", []))


def _sort_failures(
    pending: Mapping[str, object],
    succeeded: Mapping[str, str],
    errors: list[Mapping[str, Any]],
    failed: dict[str, str],
) -> dict[str, str]:
    """Record permanent failures in ``failed``; return ``{entry id: reason}`` of transient ones."""
    transient: dict[str, str] = {}
    for error in errors:
        reason = f"{error.get('Code', 'Error')}: {error.get('Message', '')}".rstrip(": ")
        if error.get("SenderFault", True):
            failed[error["Id"]] = reason
        else:
            transient[error["Id"]] = reason
    answered = succeeded.keys() | failed.keys() | transient.keys()
    for entry_id in pending.keys() - answered:
        failed[entry_id] = "SQS returned no result for this entry"
    return transient


def _received(queue: str, raw: MessageTypeDef) -> ReceivedMessage:
    system = raw.get("Attributes", {})
    sent = system.get("SentTimestamp")
    return ReceivedMessage(
        queue=queue,
        message_id=raw["MessageId"],
        receipt=raw["ReceiptHandle"],
        body=raw.get("Body", ""),
        receive_count=int(system.get("ApproximateReceiveCount", 1)),
        # String and Number attributes (a Number as its text); Binary ones are left out.
        attributes={
            name: value["StringValue"]
            for name, value in raw.get("MessageAttributes", {}).items()
            if "StringValue" in value
        },
        sent_at=int(sent) / 1000 if sent else None,
        group_id=system.get("MessageGroupId"),
        dedup_id=system.get("MessageDeduplicationId"),
    )
