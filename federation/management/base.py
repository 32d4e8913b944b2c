"""What the federation commands share: `--team` (default `default`), service errors as CommandError,
and the actor their audit rows name (`manage.py`)."""

from contextlib import contextmanager

from django.core.management.base import BaseCommand, CommandError

from federation import audit, selectors
from kite import selectors as kite_selectors
from kite.errors import ApiError

ACTOR = audit.COMMAND_LINE


class TeamCommand(BaseCommand):
    def add_arguments(self, parser):
        parser.add_argument("--team", default="default", help="team id or name (default: default)")

    def team(self, ref: str):
        found = kite_selectors.team_by_ref(ref)
        if found is None:
            raise CommandError(f"No team with id or name {ref!r}.")
        return found

    def peer(self, team, ref: str):
        found = selectors.peer_by_ref(team.id, ref)
        if found is None:
            raise CommandError(f"Team {team.name} has no peer named {ref!r} (or with that id).")
        return found


@contextmanager
def service_errors():
    """A service's refusal ({detail, code} in the API) as a CommandError: exit code 1 and the message."""
    try:
        yield
    except ApiError as exc:
        raise CommandError(f"{exc.detail} ({exc.code})") from None


def scope_list(value: str) -> list[str]:
    return [scope.strip() for scope in value.split(",") if scope.strip()]
