"""Migration operations for tables that may be large when the migration runs: their indexes, and
how fast autovacuum cleans them up."""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db.migrations import AddIndex
from django.db.migrations.operations.base import Operation


class AddIndexOnline(AddIndexConcurrently):
    """CREATE INDEX CONCURRENTLY on PostgreSQL, so ingest keeps writing while a big table's index
    is built (a plain CREATE INDEX blocks every INSERT until it is done); a plain AddIndex on
    SQLite, which has no such thing. The migration must say `atomic = False`."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            return super().database_forwards(app_label, schema_editor, from_state, to_state)
        return AddIndex.database_forwards(self, app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            return super().database_backwards(app_label, schema_editor, from_state, to_state)
        return AddIndex.database_backwards(self, app_label, schema_editor, from_state, to_state)


class PaceAutovacuum(Operation):
    """autovacuum_vacuum_cost_delay (ms) for one table on PostgreSQL (nothing on SQLite). Tables
    whose dead rows come in bulk — a retention purge deletes a day at once — are vacuumed right
    after it, and at PostgreSQL's default pace (2 ms) that vacuum writes WAL fast enough to raise
    the commit latency of every webhook meanwhile (bench/RESULTS.md, Retention). ALTER TABLE … SET
    takes a lock that reads and writes do not wait for; an operator may set another value."""

    reversible = True

    def __init__(self, table: str, delay_ms: int):
        self.table, self.delay_ms = table, int(delay_ms)

    def deconstruct(self):
        return self.__class__.__name__, [], {"table": self.table, "delay_ms": self.delay_ms}

    def state_forwards(self, app_label, state):
        pass  # storage parameters are not part of Django's model state

    def _alter(self, schema_editor, change: str) -> None:
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(f"ALTER TABLE {schema_editor.quote_name(self.table)} {change}")

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        self._alter(schema_editor, f"SET (autovacuum_vacuum_cost_delay = {self.delay_ms})")

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        self._alter(schema_editor, "RESET (autovacuum_vacuum_cost_delay)")

    def describe(self):
        return f"Autovacuum of {self.table} paced at {self.delay_ms} ms"
