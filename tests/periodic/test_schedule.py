"""Schedules, ticks and ``@periodic``: next runs (time zones, DST), missed-tick policies, names."""

from __future__ import annotations

import datetime as dt
import sys
from zoneinfo import ZoneInfo

import pytest

from ebsqs.errors import ConfigurationError
from ebsqs.periodic import Cron, Every, PeriodicRegistry, PeriodicTask, periodic, upcoming
from ebsqs.periodic.ticks import Tick, missed_ticks
from ebsqs.registry import TaskRegistry
from ebsqs.task import Task, task

pytestmark = pytest.mark.timeout(30)

UTC = dt.UTC
BERLIN = ZoneInfo("Europe/Berlin")


def at(*parts: int, tz: dt.tzinfo = UTC) -> dt.datetime:
    return dt.datetime(*parts, tzinfo=tz)  # type: ignore[misc]


def local(moments: list[dt.datetime]) -> list[str]:
    return [m.astimezone(BERLIN).strftime("%m-%d %H:%M%z") for m in moments]


def a_task(name: str = "t") -> Task[[], None]:
    return Task(lambda: None, name=name, registry=TaskRegistry())


def test_every_is_due_on_multiples_of_the_interval_since_the_epoch() -> None:
    five = Every(dt.timedelta(minutes=5))
    assert five.next_after(at(2026, 1, 1, 10, 3, 7)) == at(2026, 1, 1, 10, 5)
    assert five.next_after(at(2026, 1, 1, 10, 5)) == at(2026, 1, 1, 10, 10)  # strictly after
    assert five.previous_before(at(2026, 1, 1, 10, 5)) == at(2026, 1, 1, 10, 0)
    assert five.previous_before(at(2026, 1, 1, 10, 5, 0, 1)) == at(2026, 1, 1, 10, 5)
    shifted = Every(dt.timedelta(minutes=5), offset=dt.timedelta(minutes=2))
    assert upcoming(shifted, at(2026, 1, 1, 10, 3), 2) == [
        at(2026, 1, 1, 10, 7),
        at(2026, 1, 1, 10, 12),
    ]
    # The same instants whatever time zone the moment is given in.
    assert five.next_after(at(2026, 1, 1, 11, 3, tz=BERLIN)) == at(2026, 1, 1, 10, 5)


def test_cron_is_read_in_its_time_zone_and_answers_in_utc() -> None:
    daily = Cron("0 9 * * *", "Europe/Berlin")
    assert daily.next_after(at(2026, 1, 1, 12)) == at(2026, 1, 2, 8)  # 09:00 CET
    assert daily.next_after(at(2026, 7, 1, 12)) == at(2026, 7, 2, 7)  # 09:00 CEST
    assert daily.previous_before(at(2026, 1, 2, 8)) == at(2026, 1, 1, 8)
    assert Cron("*/5 * * * *").next_after(at(2026, 1, 1, 10, 4, 59)) == at(2026, 1, 1, 10, 5)


def test_cron_across_dst_follows_debian_cron() -> None:
    # Clocks go forward at 02:00 on 29 March: 02:30 does not exist; it runs at 03:00, once.
    spring = Cron("30 2 * * *", "Europe/Berlin")
    assert local(upcoming(spring, at(2026, 3, 28, 12), 3)) == [
        "03-29 03:00+0200",
        "03-30 02:30+0200",
        "03-31 02:30+0200",
    ]
    # Clocks go back at 03:00 on 25 October: a fixed 02:30 runs once, not in both hours...
    autumn = Cron("30 2 * * *", "Europe/Berlin")
    assert local(upcoming(autumn, at(2026, 10, 24, 12), 2)) == [
        "10-25 02:30+0200",
        "10-26 02:30+0100",
    ]
    # ...and a wildcard hour runs in both of them: four runs in the repeated hour, an hour apart.
    half_hourly = upcoming(Cron("*/30 * * * *", "Europe/Berlin"), at(2026, 10, 24, 23, 50), 4)
    assert half_hourly == [at(2026, 10, 25, 0, 0), at(2026, 10, 25, 0, 30), at(2026, 10, 25, 1, 0),
                           at(2026, 10, 25, 1, 30)]  # fmt: skip
    assert local(half_hourly) == ["10-25 02:00+0200", "10-25 02:30+0200", "10-25 02:00+0100",
                                  "10-25 02:30+0100"]  # fmt: skip


def test_bad_schedules_fail_when_decorated_with_what_to_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigurationError, match="'61 \\* \\* \\* \\*'"):
        Cron("61 * * * *")
    with pytest.raises(ConfigurationError, match="time zone 'Mars/Olympus' is unknown"):
        Cron("* * * * *", "Mars/Olympus")
    with pytest.raises(ConfigurationError, match="whole number of seconds"):
        Every(dt.timedelta(milliseconds=1500))
    monkeypatch.setitem(sys.modules, "cronsim", None)  # as if the extra were not installed
    with pytest.raises(ConfigurationError, match=r"pip install ebsqs\[cron\]"):
        Cron("* * * * *")


def test_periodic_stacks_over_task_and_checks_what_it_can_send() -> None:
    tasks, schedules = TaskRegistry(), PeriodicRegistry()

    @periodic(every=dt.timedelta(seconds=10), missed="all", catch_up=5, registry=schedules)
    @task(registry=tasks, queue_name="q.fifo")
    def job(scheduled_at: str, extra: int = 0) -> str:
        return scheduled_at

    assert isinstance(job, Task) and job("x") == "x"  # still the task, still callable
    (entry,) = schedules.entries()
    assert (entry.task, entry.missed, entry.catch_up, entry.takes_tick) == (job, "all", 5, True)

    @periodic(cron="0 * * * *", registry=schedules)
    @task(registry=tasks)
    def plain() -> None: ...

    assert {e.name: e.takes_tick for e in schedules.entries()}[plain.name] is False
    with pytest.raises(ConfigurationError, match="goes above @task"):
        periodic(every=dt.timedelta(seconds=1), registry=schedules)(lambda: None)  # type: ignore[type-var]
    with pytest.raises(ConfigurationError, match="give its other parameters defaults"):

        @periodic(every=dt.timedelta(seconds=1), registry=schedules)
        @task(registry=tasks)
        def needs(account: int) -> None: ...

    with pytest.raises(ConfigurationError, match="one of cron= or every="):
        periodic(cron="* * * * *", every=dt.timedelta(seconds=1))
    with pytest.raises(ConfigurationError, match="missed='some'"):
        periodic(every=dt.timedelta(seconds=1), missed="some")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("policy", "expected", "left_out"),
    [
        ("skip", [], True),
        ("last", ["10:00:00"], True),
        ("all", ["09:59:40", "09:59:50", "10:00:00"], True),  # capped at the latest three
    ],
)
def test_missed_ticks_follow_the_task_policy(
    policy: str, expected: list[str], left_out: bool
) -> None:
    entry = PeriodicTask(a_task(), Every(dt.timedelta(seconds=10)), policy, catch_up=3)  # type: ignore[arg-type]
    ticks, more = missed_ticks(entry, last=at(2026, 1, 1, 9, 59), started=at(2026, 1, 1, 10, 0, 5))
    assert [t.scheduled_at.strftime("%H:%M:%S") for t in ticks] == expected
    assert more is left_out


def test_nothing_is_missed_on_a_first_start_or_right_after_the_last_tick() -> None:
    entry = PeriodicTask(a_task(), Every(dt.timedelta(seconds=10)), "all")
    assert missed_ticks(entry, None, at(2026, 1, 1, 10)) == ([], False)
    assert missed_ticks(entry, at(2026, 1, 1, 10), at(2026, 1, 1, 10, 0, 9)) == ([], False)
    # Under the cap, every missed tick, the one at the start itself included.
    ticks, more = missed_ticks(entry, at(2026, 1, 1, 10), at(2026, 1, 1, 10, 0, 20))
    assert [t.iso for t in ticks] == ["2026-01-01T10:00:10Z", "2026-01-01T10:00:20Z"]
    assert more is False


def test_a_tick_is_named_by_its_task_and_scheduled_time() -> None:
    tick = Tick(at(2026, 12, 3, 15, 50), "reports.daily")
    assert tick.dedup_id == "reports.daily:2026-12-03T15:50:00Z"
    long = Tick(at(2026, 12, 3, 15, 50), "x" * 200)
    assert len(long.dedup_id) <= 128 and long.dedup_id.endswith(":2026-12-03T15:50:00Z")
    assert long.dedup_id == Tick(at(2026, 12, 3, 15, 50), "x" * 200).dedup_id  # stable
    assert Tick(at(2026, 12, 3, 15, 50), "rapport.été").dedup_id.isascii()
