"""Eager mode for users' own test suites: tasks run at .delay(), through the wire format."""

from __future__ import annotations

import datetime as dt

import pytest
from django.test import override_settings

from ebsqs.errors import SerializationError

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    "settings",
    [{"EBSQS": {"eager": True}}, {"EBSQS": {}, "EB_SQS_EXECUTE_INLINE": True}],
    ids=["EBSQS-eager", "EB_SQS_EXECUTE_INLINE"],
)
def test_eager_delay_runs_the_task_now(db_alias: str, settings: dict[str, object]) -> None:
    from shop.models import Row
    from shop.tasks import record

    with override_settings(**settings):
        record.delay("eager", db_alias)
        # What could not travel to a worker fails here too, naming the argument.
        with pytest.raises(SerializationError, match="positional argument 0"):
            record.delay(dt.date(2024, 1, 1), db_alias)

    assert list(Row.objects.using(db_alias).values_list("name", flat=True)) == ["eager"]
