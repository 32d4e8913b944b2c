from django.db import migrations

from kite.indexes import PaceAutovacuum


class Migration(migrations.Migration):
    """The retention purge deletes a day of events at once; the autovacuum right after it runs at
    10 ms per cost round (PostgreSQL's default is 2 ms, its default before version 12 was 20 ms)
    so that its WAL does not raise every webhook's commit latency (bench/retention.py)."""

    dependencies = [
        ("ingest", "0003_scale_indexes"),
    ]

    operations = [PaceAutovacuum("ingest_event", 10)]
