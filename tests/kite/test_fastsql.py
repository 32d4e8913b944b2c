"""kite.fastsql writes the same rows the ORM would, and fails the same way."""

import pytest
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from federation.models import OutboxEntry
from ingest.models import Event, Source
from kite import fastsql
from tests.factories import TeamFactory


def _event(source, ce_id, **fields):
    return Event(team_id=source.team_id, source=source, ce_id=ce_id, ce_source="s", ce_type="t",
                 ce_time=timezone.now(), data='{"a": [1, "é"]}', extensions={"x": {"y": 1}}, **fields)  # fmt: skip


@pytest.mark.django_db
def test_rows_match_what_the_orm_writes_including_db_defaults():
    team = TeamFactory()
    source = Source.objects.create(team=team, name="s", kind="none")
    by_orm = _event(source, "orm")
    by_orm.save(force_insert=True)
    fast = [_event(source, "f1"), _event(source, "f2", agent="bot")]
    fastsql.insert(fast)
    assert [e.pk for e in fast] == sorted(e.pk for e in fast) and fast[0].pk > by_orm.pk
    by_orm.refresh_from_db()
    assert fast[0].txid == fast[1].txid and fast[0].txid > 0  # the db_default, read back
    for obj in fast:
        stored = Event.objects.get(pk=obj.pk)
        assert not obj._state.adding
        for field in Event._meta.concrete_fields:
            if field.attname not in ("id", "ce_id", "agent", "txid", "received_at", "ce_time"):
                assert getattr(stored, field.attname) == getattr(by_orm, field.attname), field.name
        assert stored.extensions == {"x": {"y": 1}} and stored.agent == obj.agent and stored.txid == obj.txid
    entries = [OutboxEntry(team=team, peer_id=None, event=fast[0], provenance={"kitefedhops": 1})]
    with pytest.raises(IntegrityError), transaction.atomic():
        fastsql.insert(entries)  # peer is NOT NULL


@pytest.mark.django_db
def test_a_duplicate_raises_integrity_error_like_save():
    source = Source.objects.create(team=TeamFactory(), name="s", kind="none")
    fastsql.insert([_event(source, "dup")])
    with pytest.raises(IntegrityError), transaction.atomic():
        fastsql.insert([_event(source, "dup")])
    assert Event.objects.filter(ce_id="dup").count() == 1


@pytest.mark.django_db
def test_skipping_conflicts_returns_only_what_was_inserted():
    source = Source.objects.create(team=TeamFactory(), name="s", kind="none")
    first = fastsql.insert([_event(source, "a")])[0]
    batch = [_event(source, "b"), _event(source, "a"), _event(source, "c")]
    inserted = fastsql.insert(batch, skip_conflicts_on=("team", "ce_source", "ce_id"))
    assert [e.ce_id for e in inserted] == ["b", "c"] and all(e.pk and e.txid for e in inserted)
    assert batch[1].pk is None and batch[1]._state.adding  # the stored copy was left alone
    assert Event.objects.get(ce_id="a").pk == first.pk and Event.objects.count() == 3


GUARD = "SELECT 7 AS seven FROM ingest_source WHERE id = %s"


def _insert_guarded(obj, **options):
    statement = fastsql.guarded_insert(obj, **options)
    return statement.result(statement.run())


DEDUP = ("team", "ce_source", "ce_id")


@pytest.mark.django_db
def test_insert_guarded_inserts_only_when_the_guard_finds_a_row_and_skips_a_stored_key():
    team = TeamFactory()
    source = Source.objects.create(team=team, name="s", kind="none")
    first = _event(source, "g1")
    assert _insert_guarded(first, guard=GUARD, guard_params=[source.pk], skip_conflicts_on=DEDUP) == ((7,), True)
    stored = Event.objects.get(ce_id="g1")
    assert (stored.pk, stored.txid) == (first.pk, first.txid) and stored.extensions == {"x": {"y": 1}}
    assert stored.data == '{"a": [1, "é"]}' and not first._state.adding

    again = _event(source, "g1")
    assert _insert_guarded(again, guard=GUARD, guard_params=[source.pk], skip_conflicts_on=DEDUP) == ((7,), False)
    assert again.pk is None and Event.objects.filter(ce_id="g1").count() == 1

    refused = _event(source, "g2")
    answer = _insert_guarded(refused, guard=GUARD, guard_params=[-1], skip_conflicts_on=DEDUP)
    assert answer == (None, False) and not Event.objects.filter(ce_id="g2").exists()


@pytest.mark.django_db
def test_insert_guarded_still_checks_column_lengths():
    from django.db import DataError

    source = Source.objects.create(team=TeamFactory(), name="s", kind="none")
    with pytest.raises(DataError), transaction.atomic():
        _insert_guarded(_event(source, "x" * 256), guard=GUARD, guard_params=[source.pk], skip_conflicts_on=DEDUP)


def _run_many(statement) -> list:
    with connection.cursor() as cursor:
        cursor.execute(statement.sql, statement.params)
        return statement.result(cursor.fetchall())


@pytest.mark.django_db
def test_insert_guarded_many_stores_what_the_single_statement_stores_in_one_statement():
    source = Source.objects.create(team=TeamFactory(), name="s", kind="none")
    alone = _event(source, "alone")
    _insert_guarded(alone, guard=GUARD, guard_params=[source.pk], skip_conflicts_on=DEDUP)
    # a stored key, two new ones and the same new key twice: each key goes in once, in any order of arrival
    batch = [_event(source, "m1"), _event(source, "alone"), _event(source, "m2", agent="bot"), _event(source, "m1")]
    statement = fastsql.guarded_insert_many(batch, guard=GUARD, guard_params=[source.pk], skip_conflicts_on=DEDUP)
    assert _run_many(statement) == ((7,), [True, False, True, False])
    assert batch[1].pk is None and batch[3].pk is None and batch[1]._state.adding
    assert batch[0].txid == batch[2].txid > 0
    for obj in (batch[0], batch[2]):
        stored = Event.objects.get(pk=obj.pk)
        assert not obj._state.adding and stored.txid == obj.txid and stored.ce_id == obj.ce_id
        for field in Event._meta.concrete_fields:
            if field.attname not in ("id", "ce_id", "agent", "txid", "received_at", "ce_time"):
                assert getattr(stored, field.attname) == getattr(alone, field.attname), field.name
    assert Event.objects.get(pk=batch[2].pk).agent == "bot"
    assert Event.objects.filter(ce_id="m1").count() == 1 and Event.objects.count() == 3
    one = fastsql.guarded_insert_many([_event(source, "m3")], guard=GUARD, guard_params=[source.pk],
                                      skip_conflicts_on=DEDUP)  # fmt: skip
    assert one.sql == statement.sql  # one text, one prepared statement, whatever the number of rows
    assert _run_many(one) == ((7,), [True])


@pytest.mark.django_db
def test_insert_guarded_many_inserts_nothing_when_the_guard_finds_nothing_and_checks_lengths():
    from django.db import DataError

    source = Source.objects.create(team=TeamFactory(), name="s", kind="none")
    refused = [_event(source, "r1"), _event(source, "r2")]
    statement = fastsql.guarded_insert_many(refused, guard=GUARD, guard_params=[-1], skip_conflicts_on=DEDUP)
    assert _run_many(statement) == (None, [False, False])
    assert not Event.objects.exists() and refused[0].pk is None
    too_long = [_event(source, "ok"), _event(source, "x" * 256)]
    with pytest.raises(DataError), transaction.atomic():
        _run_many(fastsql.guarded_insert_many(too_long, guard=GUARD, guard_params=[source.pk], skip_conflicts_on=DEDUP))
    assert not Event.objects.exists()


def _select(model, fields, pk):
    qn = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {', '.join(qn(f.column) for f in fields)} FROM {qn(model._meta.db_table)} "
                       f"WHERE {qn(model._meta.pk.column)} = %s", [pk])  # fmt: skip
        return cursor.fetchone()


@pytest.mark.django_db
def test_load_reads_a_row_as_the_orm_does():
    source = Source.objects.create(team=TeamFactory(), name="s", kind="none")
    stored = fastsql.insert([_event(source, "r", agent="bot")])[0]
    fields = tuple(Event._meta.concrete_fields)
    loaded = fastsql.load(Event, fields, _select(Event, fields, stored.pk))
    by_orm = Event.objects.get(pk=stored.pk)
    assert not loaded._state.adding and loaded._state.db == by_orm._state.db
    for field in fields:
        assert getattr(loaded, field.attname) == getattr(by_orm, field.attname), field.name
    assert loaded.extensions == {"x": {"y": 1}} and timezone.is_aware(loaded.received_at)
    assert fastsql.load(Event, fields, _select(Event, fields, stored.pk)).extensions == {"x": {"y": 1}}  # converters kept

    some = (Event._meta.pk, Event._meta.get_field("extensions"), Event._meta.get_field("agent"))
    partial = fastsql.load(Event, some, _select(Event, some, stored.pk))
    assert (partial.pk, partial.extensions, partial.agent) == (stored.pk, {"x": {"y": 1}}, "bot")
    assert "data" in partial.get_deferred_fields() and "extensions" not in partial.get_deferred_fields()
    assert partial.data == by_orm.data  # a deferred field is read when asked for, as the ORM's
