from django.db import migrations, models

from kite.indexes import AddIndexOnline


class Migration(migrations.Migration):
    """Reads that scanned a whole table at scale (bench/scale.py, 700,000 outbox entries): a peer's
    owed and dead outbox entries are counted from a partial index (delivered history is not in it),
    and /api/audit filtered on an action, an outcome or a peer finds its rows by index. Built
    CONCURRENTLY on PostgreSQL (atomic = False): writers are not blocked while they are built."""

    atomic = False

    dependencies = [
        ("federation", "0013_delivery_age"),
    ]

    operations = [
        AddIndexOnline(
            model_name="outboxentry",
            index=models.Index(
                fields=["peer", "status"], condition=models.Q(status__in=["pending", "in_flight", "dead"]),
                name="outbox_owed",
            ),
        ),
        AddIndexOnline(
            model_name="auditevent",
            index=models.Index(fields=["team", "action", "-id"], name="audit_team_action"),
        ),
        AddIndexOnline(
            model_name="auditevent",
            index=models.Index(fields=["team", "outcome", "-id"], name="audit_team_outcome"),
        ),
        AddIndexOnline(
            model_name="auditevent",
            index=models.Index(fields=["team", "peer_name", "-id"], name="audit_team_peer"),
        ),
    ]
