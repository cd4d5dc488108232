"""OpenTelemetry tracing of sends and attempts (the optional ``ebsqs[otel]`` extra).

Nothing here runs unless the application calls :func:`install`, in every process that sends or
works (the module named by ``--app`` is imported by both, so that is the place; under Django,
``AppConfig.ready()``). Importing ``ebsqs`` never imports this module or OpenTelemetry.

What is traced, following OpenTelemetry's messaging semantic conventions:

* each new message gets a ``PRODUCER`` span ``"<queue> publish"``, a child of the span current at
  ``.delay()`` (also for a send deferred until a transaction commits), and that span's W3C
  context (``traceparent``, ``tracestate``, through the configured propagator) goes into the
  envelope's ``trace`` field. The span marks the message's creation: it ends before the batch
  goes to the broker, so it is the creation context of exactly one message.
* each attempt gets a ``CONSUMER`` span ``"<queue> process"`` in the thread or process that runs
  the task, current while it runs (the task's own spans are its children). Its parent is the
  message's creation context, so one trace holds the request, the send and every attempt; it
  also carries a link to that context, as the conventions ask of process spans. Retries and long
  delays re-send the same envelope and so the same ``trace``: every attempt has the same parent.

With only ``opentelemetry-api`` (no SDK, or no tracer provider configured), the spans are
OpenTelemetry's no-ops and messages carry no trace context; nothing fails.
"""

from __future__ import annotations

import dataclasses
from contextvars import Token
from typing import Final

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError("ebsqs.tracing needs the otel extra: pip install 'ebsqs[otel]'") from exc

from ebsqs import middleware
from ebsqs.envelope import Envelope
from ebsqs.executors.execution import Job, Outcome, OutcomeKind

#: ``messaging.system`` of Amazon SQS in the semantic conventions.
MESSAGING_SYSTEM: Final = "aws_sqs"
#: The operation of the span made for each new message, and of each attempt's span.
PUBLISH: Final = "publish"
PROCESS: Final = "process"
#: Outcomes that are not errors of the attempt (a task that asked for a retry chose it).
_NOT_ERRORS: Final = frozenset({OutcomeKind.SUCCEEDED, OutcomeKind.RETRY})


class TracingMiddleware(middleware.Middleware):
    """Puts the trace context in new messages and traces each attempt.

    Args:
        tracer_provider: where spans go; OpenTelemetry's global provider if None (looked up
            at each span, so a provider configured after :func:`install` is used).
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        # The attempt's span and the token that made it current, by job key. task_started and
        # task_finished run in the same thread (or coroutine) for a job.
        self._attempts: dict[str, tuple[trace.Span, Token[otel_context.Context]]] = {}

    def before_send(self, envelope: Envelope, queue: str) -> Envelope:
        """In the sending process: a publish span, and its context into ``envelope.trace``."""
        attributes = _attributes(queue, PUBLISH) | {"ebsqs.task": envelope.task}
        with self._tracer.start_as_current_span(
            f"{queue} {PUBLISH}", kind=trace.SpanKind.PRODUCER, attributes=attributes
        ):
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
        if not carrier:  # no provider, no valid span: nothing to carry
            return envelope
        return dataclasses.replace(envelope, trace=carrier)

    def task_started(self, job: Job) -> None:
        """In the thread or process that runs the task: start the attempt's span."""
        envelope = job.envelope
        # A message sent untraced (or run eagerly, never sent) starts under the ambient span.
        creation = propagate.extract(dict(envelope.trace)) if envelope.trace else None
        created = trace.get_current_span(creation).get_span_context() if creation else None
        links = [trace.Link(created)] if created is not None and created.is_valid else []
        attributes = _attributes(job.queue, PROCESS) | {
            "messaging.message.id": job.key,
            "ebsqs.task": envelope.task,
            "ebsqs.task_id": envelope.id,
            "ebsqs.attempt": envelope.attempt,
        }
        span = self._tracer.start_span(
            f"{job.queue} {PROCESS}",
            context=creation,
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        )
        token = otel_context.attach(trace.set_span_in_context(span, creation))  # with baggage
        self._attempts[job.key] = (span, token)

    def task_finished(self, job: Job, outcome: Outcome) -> None:
        """In the thread or process that ran the task: end the attempt's span."""
        started = self._attempts.pop(job.key, None)
        if started is None:
            return
        span, token = started
        otel_context.detach(token)
        span.set_attribute("ebsqs.outcome", str(outcome.kind))
        if outcome.kind not in _NOT_ERRORS:
            span.set_attribute("error.type", outcome.error_type or str(outcome.kind))
            span.set_status(trace.StatusCode.ERROR, outcome.error or str(outcome.kind))
        span.end()


def _attributes(queue: str, operation: str) -> dict[str, str | int]:
    return {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.destination.name": queue,
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
    }


def install(tracer_provider: trace.TracerProvider | None = None) -> TracingMiddleware:
    """Register the tracing middleware in this process (once: a second call returns the first).

    Call it where the application starts, in the processes that send and in the workers
    (the ``--app`` module is imported by both). It configures no tracer provider: the
    application's OpenTelemetry SDK setup does.

    Args:
        tracer_provider: where spans go; the global provider if None.

    Returns:
        The registered middleware.
    """
    for item in middleware.MIDDLEWARE:
        if isinstance(item, TracingMiddleware):
            return item
    installed = TracingMiddleware(tracer_provider)
    middleware.add(installed)
    return installed
