"""The dashboard's table: one row per supervisor master, its latest status document.

Masters write their row every few seconds (:mod:`ebsqs.contrib.django.publish`); rows not
written for :data:`~ebsqs.contrib.django.publish.EXPIRE_AFTER` are deleted by the next write
of any master. The model also carries the dashboard's permissions.
"""

from __future__ import annotations

import datetime

from django.db import models


class MasterSnapshot(models.Model):
    """A master's status document (:func:`ebsqs.ops.status.document`), with where it runs."""

    id: models.BigAutoField[int, int] = models.BigAutoField(primary_key=True)
    key: models.CharField[str, str] = models.CharField(
        max_length=255, unique=True, help_text="host:pid"
    )
    host: models.CharField[str, str] = models.CharField(max_length=255)
    pid: models.IntegerField[int, int] = models.IntegerField()
    document = models.JSONField()
    updated_at: models.DateTimeField[datetime.datetime, datetime.datetime] = models.DateTimeField(
        db_index=True
    )

    class Meta:
        app_label = "ebsqs"
        default_permissions = ()
        permissions = [
            ("view_dashboard", "Can view the ebsqs dashboard"),
            ("manage_dead_letters", "Can redrive and delete dead letters"),
            ("view_task_arguments", "Can see task arguments in dead letters"),
        ]

    def __str__(self) -> str:
        return f"master {self.key}"


# -- the durable outbox (ebsqs.contrib.django.outbox) -----------------------------------------


class OutboxMessage(models.Model):
    """One encoded message kept in the sender's transaction until the relay sends it.

    Times are epoch seconds (``time.time()``), whatever ``USE_TZ`` says. ``due_at`` is when the
    message may become visible on its queue (the delay is worked out again at each send, so a
    message that waited in the outbox is not delayed twice); ``next_attempt_at`` is when the
    relay may try it (its creation, then a backoff after each failed send).
    """

    id: models.BigAutoField[int, int] = models.BigAutoField(primary_key=True)
    queue: models.CharField[str, str] = models.CharField(
        max_length=255, help_text="the physical queue"
    )
    fifo: models.BooleanField[bool, bool] = models.BooleanField(default=False)
    task_id: models.CharField[str, str] = models.CharField(max_length=64)
    body: models.TextField[str, str] = models.TextField()
    attributes = models.JSONField(default=dict)
    group_id: models.CharField[str | None, str | None] = models.CharField(max_length=128, null=True)
    dedup_id: models.CharField[str | None, str | None] = models.CharField(max_length=128, null=True)
    created_at: models.FloatField[float, float] = models.FloatField()
    due_at: models.FloatField[float, float] = models.FloatField()
    next_attempt_at: models.FloatField[float, float] = models.FloatField(db_index=True)
    attempts: models.IntegerField[int, int] = models.IntegerField(default=0)
    last_error: models.TextField[str, str] = models.TextField(blank=True, default="")

    class Meta:
        app_label = "ebsqs"
        default_permissions = ()

    def __str__(self) -> str:
        return f"outbox message {self.task_id} for {self.queue}"


class OutboxLease(models.Model):
    """Which relay may send, on databases without ``SKIP LOCKED`` (one row per lease)."""

    name: models.CharField[str, str] = models.CharField(max_length=64, primary_key=True)
    holder: models.CharField[str, str] = models.CharField(max_length=255)
    expires_at: models.FloatField[float, float] = models.FloatField()

    class Meta:
        app_label = "ebsqs"
        default_permissions = ()

    def __str__(self) -> str:
        return f"outbox lease {self.name} held by {self.holder}"


# -- periodic ticks (ebsqs.periodic) ----------------------------------------------------------


class PeriodicTick(models.Model):
    """One due time of one periodic task, claimed by the scheduler whose INSERT won.

    The unique (task, scheduled_at) pair is what makes a tick run once across the fleet
    (:mod:`ebsqs.periodic.django_store`); ``sent_at`` stays empty until the message is sent.
    """

    id: models.BigAutoField[int, int] = models.BigAutoField(primary_key=True)
    task: models.CharField[str, str] = models.CharField(max_length=255)
    scheduled_at: models.DateTimeField[datetime.datetime, datetime.datetime] = (
        models.DateTimeField()
    )
    claimed_by: models.CharField[str, str] = models.CharField(max_length=255, help_text="host:pid")
    claimed_at: models.DateTimeField[datetime.datetime, datetime.datetime] = models.DateTimeField()
    sent_at: models.DateTimeField[datetime.datetime | None, datetime.datetime | None] = (
        models.DateTimeField(null=True, blank=True)
    )

    class Meta:
        app_label = "ebsqs"
        default_permissions = ()
        constraints = [
            models.UniqueConstraint(fields=["task", "scheduled_at"], name="ebsqs_periodic_once")
        ]

    def __str__(self) -> str:
        return f"tick {self.task} at {self.scheduled_at.isoformat()}"


# -- flow control's store (ebsqs.flow) --------------------------------------------------------


class FlowEntry(models.Model):
    """A flow-control value kept until ``expires_at``: a rate limit's next free slot
    (``number``), a deferred task's reserved slot (``number``), a claim (``value``)."""

    key: models.CharField[str, str] = models.CharField(max_length=255, primary_key=True)
    value: models.CharField[str, str] = models.CharField(max_length=255, default="")
    number: models.FloatField[float, float] = models.FloatField(default=0.0)
    expires_at: models.FloatField[float, float] = models.FloatField(
        db_index=True, help_text="epoch seconds"
    )

    class Meta:
        app_label = "ebsqs"
        default_permissions = ()

    def __str__(self) -> str:
        return f"flow {self.key}"


class FlowLease(models.Model):
    """One running task's concurrency slot under a limit's ``key``, until ``expires_at``."""

    id: models.BigAutoField[int, int] = models.BigAutoField(primary_key=True)
    key: models.CharField[str, str] = models.CharField(max_length=255, db_index=True)
    holder: models.CharField[str, str] = models.CharField(max_length=255)
    expires_at: models.FloatField[float, float] = models.FloatField(help_text="epoch seconds")

    class Meta:
        app_label = "ebsqs"
        default_permissions = ()
        constraints = [
            models.UniqueConstraint(fields=["key", "holder"], name="ebsqs_flowlease_key_holder")
        ]

    def __str__(self) -> str:
        return f"lease {self.key} {self.holder}"
