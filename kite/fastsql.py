"""INSERT model instances in one prepared statement on PostgreSQL.

Each webhook inserts an event (and, federated, its outbox entries). Django compiles
the INSERT anew every time; on the 2-core machine Kite is measured on that
compilation was a fifth of a federated webhook's web CPU (bench/RESULTS.md). Here
the SQL is built once per (model, row count) and only the values are converted,
with the same `pre_save` / `get_db_prep_save` calls the ORM makes, so the rows are
identical. Columns with a `db_default` are left to the database and read back with
the primary key, as `Model.save()` does. Other databases use the ORM.
"""

import functools

from django.db import connection


@functools.cache
def _insert_sql(model, rows: int) -> tuple[str, list, list]:
    qn = connection.ops.quote_name
    meta = model._meta
    written = [f for f in meta.concrete_fields if not f.primary_key and not f.has_db_default()]
    returned = [meta.pk] + [f for f in meta.concrete_fields if f.has_db_default()]
    one = "(" + ", ".join(["%s"] * len(written)) + ")"
    sql = (
        f"INSERT INTO {qn(meta.db_table)} ({', '.join(qn(f.column) for f in written)}) "
        f"VALUES {', '.join([one] * rows)} RETURNING {', '.join(qn(f.column) for f in returned)}"
    )
    return sql, written, returned


def insert(objs: list) -> None:
    """Insert unsaved instances of one model; sets their primary key and db_default fields.
    Raises django.db.IntegrityError like save() on a constraint violation."""
    if not objs:
        return
    model = type(objs[0])
    if connection.vendor != "postgresql":
        if len(objs) == 1:
            objs[0].save(force_insert=True)
        else:
            model.objects.bulk_create(objs)
        return
    sql, written, returned = _insert_sql(model, len(objs))
    params = [field.get_db_prep_save(field.pre_save(obj, True), connection) for obj in objs for field in written]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    # RETURNING follows the VALUES order for a plain INSERT.
    for obj, row in zip(objs, rows, strict=True):
        for field, value in zip(returned, row, strict=True):
            setattr(obj, field.attname, value)
        obj._state.adding, obj._state.db = False, connection.alias
