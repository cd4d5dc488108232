"""The tables of periodic ticks."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("ebsqs", "0002_outbox")]

    operations: list[migrations.operations.base.Operation] = [  # type: ignore[misc]
        migrations.CreateModel(
            name="PeriodicTick",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("task", models.CharField(max_length=255)),
                ("scheduled_at", models.DateTimeField()),
                ("claimed_by", models.CharField(help_text="host:pid", max_length=255)),
                ("claimed_at", models.DateTimeField()),
                ("sent_at", models.DateTimeField(blank=True, null=True)),
            ],
            options={"default_permissions": ()},
        ),
        migrations.AddConstraint(
            model_name="periodictick",
            constraint=models.UniqueConstraint(
                fields=("task", "scheduled_at"), name="ebsqs_periodic_once"
            ),
        ),
    ]
