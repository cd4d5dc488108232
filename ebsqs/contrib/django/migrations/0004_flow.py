"""The tables of flow control's store."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("ebsqs", "0003_periodic")]

    operations = [
        migrations.CreateModel(
            name="FlowEntry",
            fields=[
                ("key", models.CharField(max_length=255, primary_key=True, serialize=False)),
                ("value", models.CharField(default="", max_length=255)),
                ("number", models.FloatField(default=0.0)),
                ("expires_at", models.FloatField(db_index=True, help_text="epoch seconds")),
            ],
            options={"default_permissions": ()},
        ),
        migrations.CreateModel(
            name="FlowLease",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("key", models.CharField(db_index=True, max_length=255)),
                ("holder", models.CharField(max_length=255)),
                ("expires_at", models.FloatField(help_text="epoch seconds")),
            ],
            options={
                "default_permissions": (),
                "constraints": [
                    models.UniqueConstraint(
                        fields=("key", "holder"), name="ebsqs_flowlease_key_holder"
                    )
                ],
            },
        ),
    ]
