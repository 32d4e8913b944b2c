"""INSERT model instances in one prepared statement on PostgreSQL, and read rows of hand-written
SELECTs into model instances.

Each webhook inserts an event (and, federated, its outbox entries). Django compiles
the INSERT anew every time; on the 2-core machine Kite is measured on that
compilation was a fifth of a federated webhook's web CPU (bench/RESULTS.md). Here
the SQL is built once per (model, row count) and only the values are converted,
with the same `pre_save` / `get_db_prep_save` calls the ORM makes, so the rows are
identical. Columns with a `db_default` are left to the database and read back with
the primary key, as `Model.save()` does. Other databases use the ORM.

`load` turns a row into an instance with the converters the ORM applies (any database): the
delivery's claim and the peer lookup of every inbound peer request read their rows so.

`unflushed` is a transaction whose commit does not wait for PostgreSQL's WAL flush, for writes a
database crash may lose without harm (the outbox's claims and delivered marks, the purges' batches).
"""

import contextlib
import functools
import weakref

from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction
from django.db.models.base import ModelState


@functools.cache
def _insert_sql(model, rows: int, skip_conflicts_on: tuple[str, ...] = ()) -> tuple[str, list, list]:
    qn = connection.ops.quote_name
    meta = model._meta
    written = [f for f in meta.concrete_fields if not f.primary_key and not f.has_db_default()]
    returned = [meta.pk] + [f for f in meta.concrete_fields if f.has_db_default()]
    returned += [meta.get_field(name) for name in skip_conflicts_on if meta.get_field(name) not in returned]
    one = "(" + ", ".join(["%s"] * len(written)) + ")"
    conflict = ""
    if skip_conflicts_on:
        columns = ", ".join(qn(meta.get_field(name).column) for name in skip_conflicts_on)
        conflict = f" ON CONFLICT ({columns}) DO NOTHING"
    sql = (
        f"INSERT INTO {qn(meta.db_table)} ({', '.join(qn(f.column) for f in written)}) "
        f"VALUES {', '.join([one] * rows)}{conflict} RETURNING {', '.join(qn(f.column) for f in returned)}"
    )
    return sql, written, returned


def insert(objs: list, *, skip_conflicts_on: tuple[str, ...] = ()) -> list:
    """Insert unsaved instances of one model; sets their primary key and db_default fields and
    returns the instances inserted. Raises django.db.IntegrityError like save() on a constraint
    violation — except, with `skip_conflicts_on` (the fields of a unique constraint, unique
    among `objs`; PostgreSQL only), a row whose key is already stored is skipped and left out
    of the result (ON CONFLICT DO NOTHING: waits for a concurrent insert of the key, no error)."""
    if not objs:
        return []
    model = type(objs[0])
    if connection.vendor != "postgresql":
        if skip_conflicts_on:
            raise NotImplementedError("skip_conflicts_on needs PostgreSQL")
        if len(objs) == 1:
            objs[0].save(force_insert=True)
        else:
            model.objects.bulk_create(objs)
        return objs
    sql, written, returned = _insert_sql(model, len(objs), tuple(skip_conflicts_on))
    db = connections[DEFAULT_DB_ALIAS]  # `connection` is a proxy: one thread-local lookup, not one per value
    params = [field.get_db_prep_save(field.pre_save(obj, True), db) for obj in objs for field in written]
    with db.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    if skip_conflicts_on:  # only inserted rows come back: match them by their key
        by_key = {tuple(getattr(obj, model._meta.get_field(n).attname) for n in skip_conflicts_on): obj for obj in objs}
        at = [returned.index(model._meta.get_field(n)) for n in skip_conflicts_on]
        inserted = [by_key[tuple(row[i] for i in at)] for row in rows]
    else:  # RETURNING follows the VALUES order for a plain INSERT (as Django's bulk_create assumes)
        inserted = objs
    for obj, row in zip(inserted, rows, strict=True):
        for field, value in zip(returned, row, strict=True):
            setattr(obj, field.attname, value)
        obj._state.adding, obj._state.db = False, connection.alias
    return inserted


def _cast(field) -> str:
    """The type a parameter is cast to in INSERT … SELECT, where the column does not type it.
    Strings go as text, so the column's own length check still applies on assignment."""
    db_type = field.db_type(connection)
    return "text" if db_type.startswith("varchar") else db_type


@functools.cache
def _guarded_insert_sql(model, guard: str, conflict_on: tuple[str, ...], many: bool = False, children: tuple = ()):
    qn = connection.ops.quote_name
    meta = model._meta
    # many: the conflict key comes back too, to tell which rows went in
    _, written, returned = _insert_sql(model, 1, conflict_on if many else ())
    columns = ", ".join(qn(meta.get_field(name).column) for name in conflict_on)
    if many:  # one array per column: one statement text (one prepared statement) for any number of rows,
        # bound in binary: psycopg escapes each element of a text-format array with a regular
        # expression, which took a third of a verified webhook's web CPU for a 1 kB `data`
        rows = f"SELECT v.* FROM guard, unnest({', '.join(f'%b::{_cast(f)}[]' for f in written)}) AS v"
    else:
        rows = f"SELECT {', '.join(f'%s::{_cast(f)}' for f in written)} FROM guard"
    sql = (
        f"WITH guard AS ({guard}), inserted AS ("
        f"INSERT INTO {qn(meta.db_table)} ({', '.join(qn(f.column) for f in written)}) {rows} "
        f"ON CONFLICT ({columns}) DO NOTHING RETURNING {', '.join(qn(f.column) for f in returned)}) "
        + (_children_sql(model, conflict_on, *children) if children else "")
        + "SELECT * FROM guard LEFT JOIN inserted ON TRUE"
    )
    return sql, written, returned


def _children_sql(model, conflict_on: tuple[str, ...], child, parent: str, varying: tuple[str, ...],
                  generated: tuple[tuple[str, str], ...]) -> str:  # fmt: skip
    """The `Children` part of a guarded_insert_many: a data-modifying WITH item (PostgreSQL runs it
    whether or not the query reads it) inserting `child` rows joined to the rows `inserted` returned,
    by their conflict key. Parameters: the shared values, then the key arrays, then the varying ones."""
    qn = connection.ops.quote_name
    _, written, _ = _insert_sql(child, 1)
    keys = [model._meta.get_field(name) for name in conflict_on]
    vary = [child._meta.get_field(name) for name in varying]
    parent_field, expressions = child._meta.get_field(parent), dict(generated)
    select = []
    for field in written:
        if field.name in expressions:
            select.append(expressions[field.name])
        elif field is parent_field:
            select.append(f"i.{qn(model._meta.pk.column)}")
        elif field in vary:
            select.append(f"c.v{vary.index(field)}")
        else:
            select.append(f"%s::{_cast(field)}")
    arrays = [f"%b::{_cast(field)}[]" for field in keys + vary]
    names = [f"k{i}" for i in range(len(keys))] + [f"v{i}" for i in range(len(vary))]
    join = " AND ".join(f"i.{qn(field.column)} = c.k{i}" for i, field in enumerate(keys))
    return (
        f", children AS (INSERT INTO {qn(child._meta.db_table)} ({', '.join(qn(f.column) for f in written)}) "
        f"SELECT {', '.join(select)} FROM unnest({', '.join(arrays)}) AS c({', '.join(names)}) "
        f"JOIN inserted i ON {join}) "
    )


class Children:
    """Rows of another model that a `guarded_insert_many` writes in its own statement for the
    objects it inserts (none for an object met as a stored duplicate, or as a copy of an earlier
    one): `shared`, an unsaved instance of that model, gives the values every row shares;
    `parent` names its field that takes the inserted object's primary key; `rows` are
    (index into the objects, values of the `varying` fields in their order); `generated` maps
    fields to SQL expressions evaluated per row, as insert_each's does."""

    __slots__ = ("shared", "parent", "varying", "rows", "generated")

    def __init__(self, shared, parent: str, varying: tuple[str, ...], rows: list[tuple[int, tuple]],
                 generated: dict[str, str] | None = None):  # fmt: skip
        self.shared, self.parent, self.varying, self.rows = shared, parent, tuple(varying), rows
        self.generated = tuple(sorted((generated or {}).items()))

    def params(self, objs: list, conflict_on: tuple[str, ...], db) -> list:
        model, child = type(objs[0]), type(self.shared)
        _, written, _ = _insert_sql(child, 1)
        skip = {child._meta.get_field(name) for name in (self.parent, *self.varying)} | {
            child._meta.get_field(name) for name, _ in self.generated}  # fmt: skip
        params = [f.get_db_prep_save(f.pre_save(self.shared, True), db) for f in written if f not in skip]
        keys = [model._meta.get_field(name) for name in conflict_on]
        first = {}  # each key's first object: the one the INSERT keeps
        for index, obj in enumerate(objs):
            first.setdefault(tuple(getattr(obj, f.attname) for f in keys), index)
        rows = [(index, values) for index, values in self.rows
                if first[tuple(getattr(objs[index], f.attname) for f in keys)] == index]  # fmt: skip
        for f in keys:
            params.append([f.get_db_prep_save(getattr(objs[index], f.attname), db) for index, _ in rows])
        for at, name in enumerate(self.varying):
            f = child._meta.get_field(name)
            params.append([f.get_db_prep_save(values[at], db) for _, values in rows])
        return params


class Guarded:
    """One guarded INSERT (`guarded_insert`): its SQL and parameters, run here (`run`) or by any
    psycopg connection, sync or async (ingest.edge), and what its row means (`result`)."""

    __slots__ = ("obj", "sql", "params", "returned")

    def __init__(self, obj, sql: str, params: list, returned: list):
        self.obj, self.sql, self.params, self.returned = obj, sql, params, returned

    def run(self):
        """Its row, through this thread's Django connection."""
        with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
            cursor.execute(self.sql, self.params)
            return cursor.fetchone()

    def result(self, row):
        """(guard_row, inserted): guard_row is None when the guard found nothing (nothing
        inserted); otherwise the guard's columns, and `inserted` says whether `obj` went in (its
        primary key and db_default fields are then set) or met a stored duplicate."""
        if row is None:
            return None, False
        returned = self.returned
        guard_row, inserted_row = row[: -len(returned)], row[-len(returned):]
        if inserted_row[0] is None:
            return guard_row, False
        for field, value in zip(returned, inserted_row, strict=True):
            setattr(self.obj, field.attname, value)
        self.obj._state.adding, self.obj._state.db = False, DEFAULT_DB_ALIAS
        return guard_row, True


def guarded_insert(obj, *, guard: str, guard_params: list, skip_conflicts_on: tuple[str, ...]) -> Guarded:
    """One statement (PostgreSQL only): INSERT `obj` only if the `guard` query (at most one row)
    finds a row, skipping it if its `skip_conflicts_on` key is already stored. Builds it; no
    database access (the values are converted as the ORM converts them for PostgreSQL)."""
    db = connections[DEFAULT_DB_ALIAS]  # `connection` is a proxy: one thread-local lookup, not one per value
    if db.vendor != "postgresql":
        raise NotImplementedError("guarded_insert needs PostgreSQL")
    sql, written, returned = _guarded_insert_sql(type(obj), guard, tuple(skip_conflicts_on))
    params = list(guard_params) + [field.get_db_prep_save(field.pre_save(obj, True), db) for field in written]
    return Guarded(obj, sql, params, returned)


class GuardedMany:
    """`guarded_insert_many`'s statement: its SQL and parameters, and what its rows mean (`result`)."""

    __slots__ = ("objs", "sql", "params", "returned", "key")

    def __init__(self, objs: list, sql: str, params: list, returned: list, key: list):
        self.objs, self.sql, self.params, self.returned, self.key = objs, sql, params, returned, key

    def run(self) -> list:
        """Its rows, through this thread's Django connection."""
        with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
            cursor.execute(self.sql, self.params)
            return cursor.fetchall()

    def result(self, rows: list) -> tuple[tuple | None, list[bool]]:
        """(guard_row, inserted): guard_row is None when the guard found nothing (nothing inserted);
        otherwise the guard's columns, and `inserted` says for each of `objs` whether it went in
        (its primary key and db_default fields are then set) or met a stored duplicate (or an
        earlier one of `objs` with the same key)."""
        if not rows:
            return None, [False] * len(self.objs)
        returned, width = self.returned, len(self.returned)
        at = sorted(returned.index(field) for field in self.key)
        came_back = {tuple(row[-width:][i] for i in at): row[-width:] for row in rows if row[-width] is not None}
        inserted = []
        for obj in self.objs:
            values = came_back.pop(tuple(getattr(obj, returned[i].attname) for i in at), None)
            if values is not None:
                for field, value in zip(returned, values, strict=True):
                    setattr(obj, field.attname, value)
                obj._state.adding, obj._state.db = False, DEFAULT_DB_ALIAS
            inserted.append(values is not None)
        return rows[0][:-width], inserted


def guarded_insert_many(objs: list, *, guard: str, guard_params: list, skip_conflicts_on: tuple[str, ...],
                        children: Children | None = None) -> GuardedMany:  # fmt: skip
    """`guarded_insert` for any number of instances of one model in one statement (INSERT … SELECT
    from unnest(): one array per column, so its text and its prepared statement are the same for
    one row or a hundred), with the `children` rows of those it inserts in the same statement.
    Builds it; no database access."""
    db = connections[DEFAULT_DB_ALIAS]
    if db.vendor != "postgresql":
        raise NotImplementedError("guarded_insert_many needs PostgreSQL")
    model, conflict_on = type(objs[0]), tuple(skip_conflicts_on)
    shape = (type(children.shared), children.parent, children.varying, children.generated) if children else ()
    sql, written, returned = _guarded_insert_sql(model, guard, conflict_on, many=True, children=shape)
    params = list(guard_params)
    params += [[field.get_db_prep_save(field.pre_save(obj, True), db) for obj in objs] for field in written]
    if children:
        params += children.params(objs, conflict_on, db)
    key = [model._meta.get_field(name) for name in skip_conflicts_on]
    return GuardedMany(objs, sql, params, returned, key)


@functools.cache
def _fan_out_sql(model, varying: str, generated: tuple[tuple[str, str], ...]) -> tuple[str, list]:
    qn = connection.ops.quote_name
    meta = model._meta
    _, written, _ = _insert_sql(model, 1)
    vary, expressions = meta.get_field(varying), dict(generated)
    shared = [f for f in written if f is not vary and f.name not in expressions]
    select = [expressions[f.name] if f.name in expressions else "v.value" if f is vary else f"%s::{_cast(f)}"
              for f in written]  # fmt: skip
    sql = (
        f"INSERT INTO {qn(meta.db_table)} ({', '.join(qn(f.column) for f in written)}) "
        f"SELECT {', '.join(select)} FROM unnest(%s::{_cast(vary)}[]) AS v(value)"
    )
    return sql, shared


def insert_each(obj, field: str, values: list, *, generated: dict[str, str] | None = None) -> int:
    """Insert one row per item of `values`: `obj`'s values (unsaved; it is not saved itself) with
    `field` set to the item. Returns the number of rows written; nothing is read back.

    PostgreSQL: one statement whatever the number of rows — INSERT … SELECT … FROM unnest(array),
    the values the rows share converted once (the ORM's `pre_save` / `get_db_prep_save`) and bound
    once, the array of `values` one parameter. (A multi-row VALUES binds every column of every row:
    at 200 rows, 2,400 parameters, and psycopg parses a statement that long anew on every call.)
    `generated` maps fields to SQL expressions evaluated per row in place of the field's Python
    default (e.g. {"msg_id": "gen_random_uuid()"} for a unique default). Other databases: one
    instance per item (each with its own defaults for the `generated` fields), bulk_create."""
    if not values:
        return 0
    model = type(obj)
    generated = generated or {}
    if connection.vendor != "postgresql":
        meta = model._meta
        given = {f.attname: getattr(obj, f.attname) for f in meta.concrete_fields
                 if not f.primary_key and f.name not in generated and f.name != field}  # fmt: skip
        vary = meta.get_field(field).attname
        model.objects.bulk_create([model(**given, **{vary: value}) for value in values])
        return len(values)
    sql, shared = _fan_out_sql(model, field, tuple(sorted(generated.items())))
    db = connections[DEFAULT_DB_ALIAS]  # `connection` is a proxy: one thread-local lookup, not one per value
    vary = model._meta.get_field(field)
    params = [f.get_db_prep_save(f.pre_save(obj, True), db) for f in shared]
    params.append([vary.get_db_prep_save(value, db) for value in values])
    with db.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


# --------------------------------------------------------------------------- reading rows

_loaders: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # connection → {fields: (attnames, converters)}


def _loader(conn, fields: tuple) -> tuple[list[str], list]:
    """The attnames of `fields` and, for each field whose column the ORM converts when it reads it
    (JSON, and on SQLite dates and times), (index, column, converters) — worked out once per
    connection, as the ORM's compiler does for every query."""
    per_connection = _loaders.setdefault(conn, {})
    known = per_connection.get(fields)
    if known is None:
        converting = []
        for index, field in enumerate(fields):
            column = field.cached_col
            found = conn.ops.get_db_converters(column) + column.get_db_converters(conn)
            if found:
                converting.append((index, column, found))
        known = per_connection[fields] = ([field.attname for field in fields], converting)
    return known


def copied(obj):
    """A copy of a model instance that a request may annotate without touching the original (a
    per-process cached row), sharing the related rows it holds; copy.copy goes through pickling:
    ten times the CPU."""
    clone = type(obj).__new__(type(obj))
    clone.__dict__.update(obj.__dict__)
    clone._state = ModelState()
    clone._state.db, clone._state.adding = obj._state.db, False
    clone._state.fields_cache = dict(obj._state.fields_cache)
    return clone


def load(model, fields: tuple, row, conn=None):
    """A model instance from a row of a hand-written SELECT whose columns are `fields` (all of the
    model's concrete fields, in their order, or some of them: the others deferred), its values
    converted as the ORM converts what it reads. Cheaper than a RawQuerySet, which works out the
    columns, their order and their converters again for every query."""
    conn = connections[DEFAULT_DB_ALIAS if conn is None else conn.alias]  # the thread's own, not the proxy
    attnames, converting = _loader(conn, fields)
    values = list(row)
    for index, column, converters in converting:
        value = values[index]
        for convert in converters:
            value = convert(value, column, conn)
        values[index] = value
    return model.from_db(conn.alias, attnames, values)


# --------------------------------------------------------------------------- commits

UNFLUSHED_WITH = "unflushed AS (SELECT set_config('synchronous_commit', 'off', true) AS off),"
UNFLUSHED_CHECK = "(SELECT off FROM unflushed) = 'off'"


def unflushed_forms(template: str) -> tuple[str, str]:
    """One PostgreSQL statement as `unflushed` would run it, without its transaction: (inside a
    caller's transaction, alone). `template` names `{unflushed_with}` first in its WITH list and
    `{unflushed}` as a condition of the statement that writes; alone, that condition turns
    `synchronous_commit` off for the statement's own transaction (set_config local to it, read by
    its commit), so the write is one round trip where BEGIN, SET LOCAL, the statement and COMMIT
    were four (in one process: 728 → 247 µs, client CPU 404 → 119 µs per call). Inside a caller's
    transaction the condition is TRUE: that transaction keeps its durable commit."""
    return (template.format(unflushed_with="", unflushed="TRUE"),
            template.format(unflushed_with=UNFLUSHED_WITH, unflushed=UNFLUSHED_CHECK))  # fmt: skip


def execute_unflushed(cursor, forms: tuple[str, str], params) -> None:
    """Run the form of `unflushed_forms` that fits the connection's state."""
    cursor.execute(forms[not connection.in_atomic_block], params)


@contextlib.contextmanager
def unflushed():
    """A transaction whose commit does not wait for PostgreSQL to flush its WAL to disk
    (`synchronous_commit` off for this transaction alone; still atomic, still crash-consistent):
    for writes whose loss in a database crash costs nothing but doing them again — the outbox's
    claims and delivered marks (the entry is sent again; at-least-once, the receiver deduplicates),
    a purge's batch (deleted again by the next run). A flush is the largest part of a small
    commit's latency, and every commit that waits for one also waits for the WAL written before it.
    Inside a caller's transaction it is only a savepoint: that transaction keeps its durable commit.
    Other databases: a plain transaction."""
    outermost = not connection.in_atomic_block
    with transaction.atomic():
        if outermost and connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
        yield
