from django.db import migrations, models


class Migration(migrations.Migration):
    """The daily retention purge deletes delivery attempts older than the cutoff: without an index
    on attempted_at each batch was a sequential scan of every delivery row (the one index,
    delivery_recent, leads with the peer). Audit rows (audit_age) and events (event_received_at)
    already have theirs."""

    dependencies = [
        ("federation", "0012_peer_filters"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="delivery",
            index=models.Index(fields=["attempted_at"], name="delivery_age"),
        ),
    ]
