from django.db import migrations, models

from kite.indexes import AddIndexOnline


class Migration(migrations.Migration):
    """An event's journey by its CloudEvent id alone (GET /api/events/{id}/journey without ?source=)
    read every event of the team: uniq_event_dedup leads with ce_source. Built CONCURRENTLY on
    PostgreSQL (atomic = False), so webhooks keep being stored while it is built."""

    atomic = False

    dependencies = [
        ("ingest", "0002_source_cloudevents"),
    ]

    operations = [
        AddIndexOnline(
            model_name="event",
            index=models.Index(fields=["team", "ce_id"], name="event_team_ce_id"),
        ),
    ]
