"""The dashboard's table of master snapshots, and its permissions."""

from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    operations = [
        migrations.CreateModel(
            name="MasterSnapshot",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("key", models.CharField(help_text="host:pid", max_length=255, unique=True)),
                ("host", models.CharField(max_length=255)),
                ("pid", models.IntegerField()),
                ("document", models.JSONField()),
                ("updated_at", models.DateTimeField(db_index=True)),
            ],
            options={
                "permissions": [
                    ("view_dashboard", "Can view the ebsqs dashboard"),
                    ("manage_dead_letters", "Can redrive and delete dead letters"),
                    ("view_task_arguments", "Can see task arguments in dead letters"),
                ],
                "default_permissions": (),
            },
        ),
    ]
