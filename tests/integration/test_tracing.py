"""OpenTelemetry tracing (``ebsqs.tracing``) from ``.delay()`` across a real worker process.

The producer's spans go to the SDK's in-memory exporter in this process; the worker runs
``--app tests.fixtures.traced_tasks``, whose SDK provider writes its spans to a JSON-lines file
this test reads. Tasks record the span current while they ran.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer

from ebsqs import middleware, tracing
from ebsqs.envelope import Envelope, decode
from tests.fixtures import traced_tasks, worker_tasks
from tests.integration.processes import Backend, WorkerProcess
from tests.waiting import wait_until

APP = "tests.fixtures.traced_tasks"


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    """Tracing installed in this process with its own SDK provider (the global one untouched);
    the middleware registry restored afterwards."""
    saved = list(middleware.MIDDLEWARE)
    middleware.MIDDLEWARE.clear()
    made = TracerProvider()
    tracing.install(made)
    yield made
    middleware.MIDDLEWARE[:] = saved
    made.shutdown()


@pytest.fixture
def exporter(provider: TracerProvider) -> InMemorySpanExporter:
    """The spans this process finishes."""
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return spans


@pytest.fixture
def tracer(provider: TracerProvider) -> Tracer:
    """To open a span around ``.delay()``, as a web request's instrumentation would."""
    return provider.get_tracer(__name__)


def only(spans: list[Any], name: str) -> Any:
    found = [span for span in spans if span.name == name]
    assert len(found) == 1, [span.name for span in spans]
    return found[0]


def hexes(span: ReadableSpan) -> tuple[str, str]:
    context = span.get_span_context()
    assert context is not None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def start_worker(backend: Backend, queue: str, *flags: str, **env: str) -> WorkerProcess:
    return WorkerProcess(
        ["--app", APP, "--queues", queue, "--wait", "1", *flags],
        {
            **backend.env,
            worker_tasks.RECORD_ENV: str(backend.record_file),
            "EBSQS_BACKOFF_BASE": "0",
            **env,
        },
        backend.tmp_path / "worker.log",
    )


def read_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.mark.timeout(30)
def test_delay_injects_the_publish_span_context_into_the_message(
    exporter: InMemorySpanExporter,
    tracer: Tracer,
    backend: Backend,
    unique_queue: Callable[..., str],
) -> None:
    queue = unique_queue()
    backend.create(queue)

    with tracer.start_as_current_span("request"):
        task_id = traced_tasks.traced.send_with(queue_name=queue).delay("one")

    spans = list(exporter.get_finished_spans())
    request, publish = only(spans, "request"), only(spans, f"{queue} publish")
    trace_id, span_id = hexes(publish)
    assert publish.kind.name == "PRODUCER"
    assert publish.parent is not None and publish.parent.span_id == request.context.span_id
    assert dict(publish.attributes) == {
        "messaging.system": "aws_sqs",
        "messaging.destination.name": queue,
        "messaging.operation.type": "publish",
        "messaging.operation.name": "publish",
        "ebsqs.task": traced_tasks.traced.name,
    }
    [message] = backend.broker.receive(
        backend.settings.physical_queue(queue), 10, wait_seconds=0, visibility_timeout=60
    )
    envelope = decode(message.body)
    assert envelope.id == task_id
    assert envelope.trace is not None
    version, trace_part, span_part, _flags = envelope.trace["traceparent"].split("-")
    assert (version, trace_part, span_part) == ("00", trace_id, span_id)


@pytest.mark.timeout(30)
def test_a_deferred_send_is_traced_under_the_span_current_at_delay(
    exporter: InMemorySpanExporter,
    tracer: Tracer,
    backend: Backend,
    unique_queue: Callable[..., str],
) -> None:
    """A send held until a commit runs later, outside the request's span: its publish span is
    still the request's child."""
    queue = unique_queue()
    backend.create(queue)
    held: list[Callable[[], object]] = []

    class HoldSends(middleware.Middleware):
        def send_later(self, *, on_commit: bool) -> Callable[[Callable[[], object]], None]:
            return held.append

    middleware.add(HoldSends())
    with tracer.start_as_current_span("request"):
        traced_tasks.traced.send_with(queue_name=queue).delay("held")
    assert [span.name for span in exporter.get_finished_spans()] == ["request"]
    [send] = held
    send()  # "the transaction commits", with no span current here

    request = only(list(exporter.get_finished_spans()), "request")
    publish = only(list(exporter.get_finished_spans()), f"{queue} publish")
    assert publish.context.trace_id == request.context.trace_id
    assert publish.parent is not None and publish.parent.span_id == request.context.span_id


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("backend", "executor"),
    [("sqlite", "thread"), ("fauxqs", "thread"), ("sqlite", "process")],
    indirect=["backend"],
)
def test_each_attempt_is_a_consumer_span_in_the_producers_trace(
    exporter: InMemorySpanExporter,
    tracer: Tracer,
    backend: Backend,
    executor: str,
    unique_queue: Callable[..., str],
) -> None:
    """In the worker's own threads, and in the process executor's children."""
    queue = unique_queue()
    backend.create(queue)
    spans_file = backend.tmp_path / "spans.jsonl"

    with tracer.start_as_current_span("request"):
        task_id = traced_tasks.traced_fails_once.send_with(queue_name=queue).delay("retried")
    trace_id, publish_id = hexes(only(list(exporter.get_finished_spans()), f"{queue} publish"))

    spans_env = {traced_tasks.SPANS_ENV: str(spans_file)}
    with start_worker(backend, queue, "--executor", executor, **spans_env) as worker:
        wait_until(
            lambda: len(read_spans(spans_file)) >= 2,
            timeout=30,
            message=lambda: f"spans: {read_spans(spans_file)}; {worker.describe()}",
        )
        assert worker.stop() == 0, worker.describe()

    attempts = sorted(read_spans(spans_file), key=lambda span: span["attributes"]["ebsqs.attempt"])
    assert [span["attributes"]["ebsqs.attempt"] for span in attempts] == [1, 2]
    for span in attempts:
        assert span["name"] == f"{queue} process"
        assert span["kind"] == "CONSUMER"
        # Parent: the message's creation context; link: the same context (the conventions').
        assert span["trace_id"] == trace_id
        assert span["parent_span_id"] == publish_id
        assert span["links"] == [{"trace_id": trace_id, "span_id": publish_id}]
        attributes = span["attributes"]
        assert attributes["messaging.system"] == "aws_sqs"
        assert attributes["messaging.destination.name"] == queue
        assert attributes["messaging.operation.type"] == "process"
        assert attributes["messaging.message.id"]
        assert attributes["ebsqs.task"] == traced_tasks.traced_fails_once.name
        assert attributes["ebsqs.task_id"] == task_id
    first, second = attempts
    assert first["status"] == "ERROR" and first["attributes"]["error.type"].endswith("Boom")
    assert second["status"] == "UNSET" and "error.type" not in second["attributes"]
    # Inside the task, the attempt's span is the current one.
    assert backend.executions() == [
        f"retried 1 {trace_id} {first['span_id']}",
        f"retried 2 {trace_id} {second['span_id']}",
    ]


@pytest.mark.timeout(60)
def test_without_a_tracer_provider_tasks_send_and_run_untraced(
    backend: Backend, unique_queue: Callable[..., str]
) -> None:
    """Installed with OpenTelemetry's default (no-op) provider, here and in the worker."""
    queue = unique_queue()
    backend.create(queue)
    saved = list(middleware.MIDDLEWARE)
    middleware.MIDDLEWARE.clear()
    try:
        tracing.install()
        traced_tasks.traced.send_with(queue_name=queue).delay("untraced")
    finally:
        middleware.MIDDLEWARE[:] = saved

    with start_worker(backend, queue, **{traced_tasks.INSTALL_ENV: "1"}) as worker:
        wait_until(
            lambda: backend.executions(),
            timeout=30,
            message=lambda: worker.describe(),
        )
        assert worker.stop() == 0, worker.describe()
    assert backend.executions() == [f"untraced 1 {0:032x} {0:016x}"]
    assert worker.events("task_succeeded"), worker.describe()


@pytest.mark.timeout(10)
def test_retries_hops_and_fifo_attempts_keep_the_trace() -> None:
    trace = {"traceparent": f"00-{1:032x}-{2:016x}-01"}
    envelope = Envelope(task="t", trace=trace)
    assert envelope.next_attempt(due=None).trace == trace
    assert envelope.with_due(123.0).trace == trace
    assert envelope.at_attempt(3).trace == trace
