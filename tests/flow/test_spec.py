"""Rates and ``@task``'s flow keywords: what is accepted, what is refused with a reason."""

from __future__ import annotations

import datetime as dt

import pytest

from ebsqs import task
from ebsqs.errors import ConfigurationError
from ebsqs.flow import Rate, Scope, parse_rate
from ebsqs.flow.spec import FlowKeyError, build_spec
from ebsqs.registry import TaskRegistry

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("text", "count", "per"),
    [("100/m", 100, 60), ("10/s", 10, 1), ("5/h", 5, 3600), ("1/30s", 1, 30), ("2/day", 2, 86400)],
)
def test_rates(text: str, count: float, per: float) -> None:
    assert parse_rate(text) == Rate(count, per)


@pytest.mark.parametrize("text", ["10", "10/x", "0/s", "/s", "ten/s", "1/0s"])
def test_bad_rates_say_how_to_write_one(text: str) -> None:
    with pytest.raises(ConfigurationError, match="rate"):
        parse_rate(text)


def test_no_flow_keywords_no_spec_and_no_middleware() -> None:
    reg = TaskRegistry()
    assert task(name="plain", registry=reg)(print).flow is None


def test_a_spec_from_the_keywords() -> None:
    reg = TaskRegistry()
    t = task(
        name="t",
        registry=reg,
        rate_limit=("10/s", lambda account_id, **_: account_id),
        concurrency_limit=5,
        unique_for=dt.timedelta(minutes=10),
        limit_scope="host",
    )(print)
    spec = t.flow
    assert spec is not None and spec.rate == Rate(10, 1) and spec.concurrency == 5
    assert spec.unique_for == 600 and spec.scope is Scope.HOST
    # One rate limit per account; the concurrency limit is the task's.
    assert spec.rate_name((), {"account_id": 1}) != spec.rate_name((), {"account_id": 2})
    assert spec.concurrency_name((), {"account_id": 1}) == "running:t"
    assert spec.unique_name((1,), {}) == spec.unique_name((1,), {})
    assert spec.unique_name((1,), {}) != spec.unique_name((2,), {})
    with pytest.raises(FlowKeyError):
        spec.check_keys((), {})


@pytest.mark.parametrize(
    ("keywords", "match"),
    [
        ({"concurrency_limit": 0}, "concurrency_limit"),
        ({"concurrency_limit": True}, "concurrency_limit"),
        ({"unique_for": dt.timedelta(0)}, "unique_for"),
        ({"unique_key": lambda **_: 1}, "needs unique_for"),
        ({"rate_limit": ("1/s",)}, "key function"),
        ({"rate_limit": "1/s", "limit_scope": "planet"}, "limit_scope"),
        ({"unique_for": 60, "unique_key": "user"}, "function"),
    ],
)
def test_bad_keywords_are_refused_when_the_task_is_defined(
    keywords: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        build_spec("t", **keywords)  # type: ignore[arg-type]
