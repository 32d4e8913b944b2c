"""kite.indexes.PaceAutovacuum both ways on PostgreSQL: a migration rolled back leaves the table as
PostgreSQL's defaults would."""

import pytest
from django.db import connection

from kite.indexes import PaceAutovacuum


def _options(table: str):
    with connection.cursor() as cursor:
        cursor.execute("SELECT reloptions FROM pg_class WHERE relname = %s", [table])
        return cursor.fetchone()[0]


@pytest.mark.django_db
def test_pace_autovacuum_sets_the_delay_and_rolling_back_resets_it():
    operation = PaceAutovacuum("ingest_event", 7)
    with connection.schema_editor() as editor:
        operation.database_backwards("ingest", editor, None, None)
    assert _options("ingest_event") in (None, [])
    with connection.schema_editor() as editor:
        operation.database_forwards("ingest", editor, None, None)
    assert _options("ingest_event") == ["autovacuum_vacuum_cost_delay=7"]
    assert operation.deconstruct() == ("PaceAutovacuum", [], {"table": "ingest_event", "delay_ms": 7})
