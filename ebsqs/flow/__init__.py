"""Flow control: rate limits, concurrency limits and unique tasks (``@task(rate_limit=...)``).

See the README's "Flow control" section. The parts: :mod:`.rate` (``"100/m"``), :mod:`.spec`
(one task's limits and keys), :mod:`.base` (the :class:`~ebsqs.flow.base.FlowStore` protocol),
:mod:`.store` (the host store, and a store from the ``flow_store`` setting; :mod:`.redis_store`,
:mod:`.django_store`), :mod:`.middleware` (the worker side) and :mod:`.unique` (the producer
side).

Only the light parts are imported here: ``import ebsqs`` (a web process that only sends) loads
neither SQLite, Redis nor the logging library for flow control.
"""

from __future__ import annotations

from ebsqs.flow.rate import Rate, parse_rate
from ebsqs.flow.spec import FlowKeyError, FlowSpec, Scope, build_spec

__all__ = ["FlowKeyError", "FlowSpec", "Rate", "Scope", "build_spec", "parse_rate"]
