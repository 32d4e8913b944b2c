"""broadcast.nobody_listening reads `listening_until` in every shape a database hands it back."""

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from ingest.broadcast import nobody_listening
from ingest.models import Event, Source


def _event(until="absent"):
    source = Source(team_id="tm_x", name="s", kind="none")
    if until != "absent":
        source.team_listening_until = until
    return Event(team_id="tm_x", source=source, ce_id="e", ce_source="s", ce_type="t")


@pytest.mark.parametrize(
    ("until", "skipped"),
    [
        ("absent", False),  # not read with a webhook's source: send, to be safe
        (None, True),  # nobody ever listened
        (timezone.now() + timedelta(hours=6), False),  # PostgreSQL: aware
        (timezone.now() - timedelta(seconds=1), True),
        (datetime.now(UTC).replace(tzinfo=None) + timedelta(hours=6), False),  # SQLite: naive UTC
        (datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=60), True),
        ((datetime.now(UTC) + timedelta(hours=6)).strftime("%Y-%m-%d %H:%M:%S.%f"), False),  # text
    ],
    ids=["absent", "never", "aware-ahead", "aware-past", "naive-ahead", "naive-past", "text-ahead"],
)
def test_nobody_listening(until, skipped):
    assert nobody_listening(_event(until)) is skipped
