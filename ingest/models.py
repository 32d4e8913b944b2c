import json

from django.db import models
from django.utils import timezone

from ingest.cloudevent import DATA_BASE64, rfc3339, with_member
from kite.models import Team


class CurrentTransactionId(models.Func):
    """Column default: the writing transaction's id on PostgreSQL, 0 elsewhere.

    Event ids (a sequence) can commit out of order on PostgreSQL, so a reader
    resuming "after id N" could skip a lower id that commits late. Readers
    therefore order by (txid, id) and only read rows whose transaction is older
    than every transaction still running (see selectors.events_after): that
    sequence only ever grows at its end. SQLite has one writer at a time, so
    ids commit in order and txid stays 0.
    """

    output_field = models.BigIntegerField()

    def as_sql(self, compiler, connection, **extra):
        return "0", []

    def as_postgresql(self, compiler, connection, **extra):
        return "(pg_current_xact_id()::text::bigint)", []


class Source(models.Model):
    class Kind(models.TextChoices):
        STRIPE = "stripe"
        GITHUB = "github"
        STANDARD = "standard"
        CLOUDEVENTS = "cloudevents"
        NONE = "none", "none (unverified)"
        KITE = "kite", "kite (federation)"

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="sources")
    name = models.CharField(max_length=50)
    kind = models.CharField(max_length=20, choices=Kind.choices)
    secret_encrypted = models.TextField(blank=True, help_text="MultiFernet token; never shown")
    token_sha256 = models.CharField(
        max_length=64, blank=True, help_text="A cloudevents source with auth=token: SHA-256 of its bearer token"
    )
    secret_fingerprint = models.CharField(max_length=24, blank=True)
    rate_limit_per_second = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "name"], name="uniq_source_name")]

    def __str__(self):
        return f"{self.team_id}/{self.name}"


class Event(models.Model):
    """One stored CloudEvent. (team, ce_source, ce_id) is unique: the dedup key."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="events")
    source = models.ForeignKey(Source, on_delete=models.PROTECT, related_name="events")
    ce_id = models.CharField(max_length=255)
    ce_source = models.CharField(max_length=255)
    ce_type = models.CharField(max_length=255)
    ce_time = models.DateTimeField()
    ce_subject = models.CharField(max_length=255, blank=True)
    datacontenttype = models.CharField(max_length=100, default="application/json")
    data = models.TextField(help_text="The CloudEvent `data` as JSON text")
    extensions = models.JSONField(default=dict, blank=True)
    agent = models.CharField(max_length=100, blank=True, help_text="Addressee of an agent message")
    received_at = models.DateTimeField(default=timezone.now)
    txid = models.BigIntegerField(db_default=CurrentTransactionId(), editable=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["team", "ce_source", "ce_id"], name="uniq_event_dedup"),
        ]
        indexes = [
            models.Index(fields=["team", "txid", "id"], name="event_team_cursor"),
            models.Index(fields=["received_at"], name="event_received_at"),
            # An event's journey by its id alone (no ?source=): uniq_event_dedup has ce_source first
            models.Index(fields=["team", "ce_id"], name="event_team_ce_id"),
        ]

    def __str__(self):
        return f"{self.ce_type} {self.ce_id}"

    @property
    def cursor(self) -> str:
        return f"{self.txid}-{self.id}"

    def cloudevent_parts(self) -> tuple[dict, str, str]:
        """The CloudEvent's attributes (`kitecursor` included), the name of its data member (`data`,
        or `data_base64` for binary data) and that member's JSON text as stored."""
        event = {
            "specversion": "1.0",
            "id": self.ce_id,
            "source": self.ce_source,
            "type": self.ce_type,
            "time": rfc3339(self.ce_time),
            "datacontenttype": self.datacontenttype,
        }
        if self.ce_subject:
            event["subject"] = self.ce_subject
        extensions = dict(self.extensions or {})  # also holds `dataschema` and the binary-data mark
        binary = extensions.pop(DATA_BASE64, False)
        event.update(extensions)
        event["kitecursor"] = self.cursor
        return event, "data_base64" if binary else "data", self.data

    def to_cloudevent(self) -> dict:
        event, member, text = self.cloudevent_parts()
        event[member] = json.loads(text)
        return event

    def to_cloudevent_json(self) -> bytes:
        """to_cloudevent() as JSON, its data copied as stored rather than parsed and encoded again."""
        return with_member(*self.cloudevent_parts())
