"""Unique tasks at the producer: a second send with the same unique key within the task's
window is dropped, and ``.delay()`` returns the first send's task id instead.

The claim is kept in ``flow_store`` (one round trip per unique call) for ``unique_for`` from the
first send; it is not given back when the task completes (the window is the window). A send that
fails after its claim gives the claim back, so the call can be made again.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from ebsqs.flow.base import FlowStore, FlowStoreError
from ebsqs.flow.spec import FlowSpec
from ebsqs.flow.store import store_for
from ebsqs.log import get_logger

log = get_logger(__name__)

#: SQS's FIFO deduplication window, seconds.
FIFO_DEDUP_SECONDS = 300


def claim_sends(
    spec: FlowSpec,
    calls: Sequence[tuple[tuple[Any, ...], Mapping[str, Any]]],
    task_ids: Sequence[str],
    store_url: str,
    host_path: str = "",
) -> tuple[list[str | None], list[tuple[str, str]]]:
    """Claim each call's unique key for its task id.

    Returns:
        Per call, the task id of the send that holds its key (it is then dropped), or None to
        send it; and the ``(key, task id)`` claims made, to give back if the send fails. A
        store that fails lets every call through (logged as ``flow_store_unavailable``).
    """
    assert spec.unique_for is not None
    store: FlowStore = store_for(store_url, host_path)
    firsts: list[str | None] = []
    claimed: list[tuple[str, str]] = []
    now = time.time()
    for (args, kwargs), task_id in zip(calls, task_ids, strict=True):
        key = spec.unique_name(args, kwargs)
        try:
            first = store.claim(key, task_id, spec.unique_for, now)
        except FlowStoreError as exc:
            log.warning("flow_store_unavailable", error=str(exc), failing="open")
            first = None
        else:
            if first is None:
                claimed.append((key, task_id))
        if first is not None:
            log.info("task_send_dropped", task=spec.task, task_id=first, reason="unique")
        firsts.append(first)
    return firsts, claimed


def unclaim(claimed: Sequence[tuple[str, str]], store_url: str, host_path: str = "") -> None:
    """Give back claims of sends that failed (best effort: they expire anyway)."""
    store = store_for(store_url, host_path)
    for key, task_id in claimed:
        try:
            store.unclaim(key, task_id)
        except FlowStoreError as exc:
            log.warning("flow_store_unavailable", error=str(exc), failing="open")


def fifo_dedup_id(spec: FlowSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str | None:
    """The FIFO deduplication id of a unique call whose window covers SQS's five minutes (SQS
    then drops a duplicate too, even one the store let through while it was down); else None
    (a shorter window must not outlast itself in SQS)."""
    if spec.unique_for is None or spec.unique_for < FIFO_DEDUP_SECONDS:
        return None
    return spec.unique_name(args, kwargs).rsplit(":", 1)[-1]
