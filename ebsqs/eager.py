"""Eager mode: ``.delay()`` runs the task here, through the same encode/decode path.

Arguments that could not travel fail here just as they would in production. Retries run at
once (no delay); a final failure is raised to the caller so tests see it.
"""

from __future__ import annotations

import uuid

from ebsqs.config import Settings
from ebsqs.envelope import Envelope, decode, encode
from ebsqs.executors.execution import Job, OutcomeKind, run_job
from ebsqs.registry import registry


class EagerTaskFailed(Exception):
    """A task run eagerly failed; the original exception is ``__cause__`` when available."""


def run_eagerly(envelope: Envelope, settings: Settings) -> str:
    """Run every attempt of ``envelope`` now; return its task id."""
    body = encode(envelope, signing_key=settings.signing_keys)
    current = decode(
        body,
        signing_key=settings.signing_keys,
        accept_pickle=settings.accept_pickle,
        max_signature_age=settings.signature_max_age,
    )
    while True:
        outcome = run_job(Job(key=str(uuid.uuid4()), envelope=current, queue="eager"), registry)
        if outcome.kind is OutcomeKind.SUCCEEDED:
            return envelope.id
        retry = outcome.kind is OutcomeKind.RETRY or outcome.retryable
        if not retry or current.retries_left == 0:
            raise EagerTaskFailed(
                f"task {envelope.task!r} failed on attempt {current.attempt}: "
                f"{outcome.error_type}: {outcome.error}\n{outcome.traceback or ''}"
            )
        current = current.next_attempt(None)
