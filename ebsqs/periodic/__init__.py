"""Periodic tasks: ``@periodic(cron=...)`` or ``@periodic(every=...)`` above ``@task``.

Every supervisor schedules them and each tick runs once (see :mod:`ebsqs.periodic.scheduler`
for how, and the README's "Periodic tasks" for the semantics). Importing this package does no
work.
"""

from ebsqs.periodic.registry import (
    PeriodicRegistry,
    PeriodicTask,
    periodic,
    periodic_registry,
)
from ebsqs.periodic.schedule import Cron, Every, Schedule, upcoming
from ebsqs.periodic.ticks import Tick

__all__ = [
    "Cron",
    "Every",
    "PeriodicRegistry",
    "PeriodicTask",
    "Schedule",
    "Tick",
    "periodic",
    "periodic_registry",
    "upcoming",
]
