import secrets

from django.conf import settings
from django.db import models


def new_team_id() -> str:
    return "tm_" + secrets.token_hex(8)


class Team(models.Model):
    id = models.CharField(primary_key=True, max_length=40, default=new_team_id, editable=False)
    name = models.CharField(max_length=100, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Bumped in the transaction that changes where the team's events go (its federation peers).
    # Webhooks read it with their source, so each process's cached routes stay exact without
    # a query or a round trip per event (federation.enqueue.routes_for).
    routes_version = models.BigIntegerField(default=0)
    # Someone may be listening to the team's stream until then (WS listeners keep pushing it
    # ahead while connected). Read with a webhook's source: no listener, no broadcast.
    listening_until = models.DateTimeField(null=True, blank=True)

    def __str__(self):
        return self.name


class Membership(models.Model):
    """A browser user's seat in a team. API keys act as team admins."""

    class Role(models.TextChoices):
        ADMIN = "admin"
        MEMBER = "member"

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="kite_memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "user"], name="uniq_membership")]

    def __str__(self):
        return f"{self.user} in {self.team} ({self.role})"


class ApiKey(models.Model):
    """A team admin credential. Only the SHA-256 digest of the key is stored."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="api_keys")
    label = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, help_text="First characters of the key, to recognise it")
    digest = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self):
        return f"{self.prefix}… ({self.team})"
