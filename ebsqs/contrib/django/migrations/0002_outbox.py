"""The tables of the durable outbox."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("ebsqs", "0001_initial")]

    operations = [
        migrations.CreateModel(
            name="OutboxMessage",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("queue", models.CharField(help_text="the physical queue", max_length=255)),
                ("fifo", models.BooleanField(default=False)),
                ("task_id", models.CharField(max_length=64)),
                ("body", models.TextField()),
                ("attributes", models.JSONField(default=dict)),
                ("group_id", models.CharField(max_length=128, null=True)),
                ("dedup_id", models.CharField(max_length=128, null=True)),
                ("created_at", models.FloatField()),
                ("due_at", models.FloatField()),
                ("next_attempt_at", models.FloatField(db_index=True)),
                ("attempts", models.IntegerField(default=0)),
                ("last_error", models.TextField(blank=True, default="")),
            ],
            options={"default_permissions": ()},
        ),
        migrations.CreateModel(
            name="OutboxLease",
            fields=[
                ("name", models.CharField(max_length=64, primary_key=True, serialize=False)),
                ("holder", models.CharField(max_length=255)),
                ("expires_at", models.FloatField()),
            ],
            options={"default_permissions": ()},
        ),
    ]
