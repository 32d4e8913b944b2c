import orjson
from django.db import models
from django.utils import timezone

from federation.models import Peer
from kite.models import Team


class Agent(models.Model):
    """One of a team's listeners or workers (README "The fleet across instances"). Online or offline is read from
    `last_seen` against KITE_AGENT_OFFLINE_SECONDS: an agent is never deleted for being away."""

    class Via(models.TextChoices):
        LISTEN = "listen"  # `kite listen --agent NAME` (its WebSocket announces it)
        API = "api"  # POST /api/fleet/agents

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="agents")
    name = models.CharField(max_length=100)
    version = models.CharField(max_length=100, blank=True)
    host = models.CharField(max_length=255, blank=True)
    labels = models.JSONField(default=dict, blank=True)
    via = models.CharField(max_length=10, choices=Via.choices, default=Via.API)
    first_seen = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "name"], name="uniq_agent_name")]

    def __str__(self):
        return f"{self.name} ({self.team_id})"


class JsonText(models.TextField):
    """JSON kept as text, written and read whole by orjson: for a value only ever stored and
    served whole, never queried inside (a peer's fleet). PostgreSQL's jsonb would parse it on every
    write and render it back on every read — most of a snapshot-only list's database time."""

    def from_db_value(self, value, expression, connection):
        return None if value is None else orjson.loads(value)

    def to_python(self, value):
        return orjson.loads(value) if isinstance(value, str) else value

    def get_prep_value(self, value):
        return None if value is None else orjson.dumps(value).decode()

    def value_to_string(self, obj):
        return self.get_prep_value(self.value_from_object(obj))


class Snapshot(models.Model):
    """The last fleet a peer showed us, kept to answer with (flagged stale) when it does not.

    `rows` and `fetched_at` are from the last successful contact (never overwritten by a
    failure); `outcome`, `attempted_at`, `latency_ms` and `detail` are of the last attempt."""

    peer = models.OneToOneField(Peer, on_delete=models.CASCADE, related_name="fleet_snapshot")
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+")
    rows = JsonText(default=list, blank=True)
    fetched_at = models.DateTimeField(null=True, blank=True, help_text="last successful contact")
    attempted_at = models.DateTimeField(default=timezone.now)
    outcome = models.CharField(max_length=20, default="ok")
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    detail = models.TextField(blank=True)

    def __str__(self):
        return f"fleet of {self.peer_id} ({self.outcome})"
