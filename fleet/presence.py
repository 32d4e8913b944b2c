"""Agent presence from `kite listen --agent NAME` (registered in FleetConfig.ready()).

ingest runs these for every WebSocket listener: on connect, again every ~30 s while it
stays connected (so a connected agent stays online), and on disconnect. The CLI sends
its version, host name and `--label`s as `agent_version`, `agent_host` and repeated
`agent_label=key=value` query parameters.
"""

import logging

from fleet import rows, services
from fleet.models import Agent

log = logging.getLogger(__name__)


def _registration(agent_name: str, query: dict[str, list[str]]) -> dict:
    def last(name):
        values = query.get(name)
        return values[-1] if values else None

    return rows.clean_registration({
        "name": agent_name, "version": last("agent_version"), "host": last("agent_host"),
        "labels": rows.parse_label_params(query["agent_label"]) if query.get("agent_label") else None,
    })  # fmt: skip


def listener_announced(team_id: str, agent_name: str | None, meta: dict) -> None:
    if not agent_name:
        return
    try:
        registration = _registration(agent_name, meta.get("query") or {})
    except rows.Invalid as invalid:
        log.info("listener for agent %r not registered: %s", agent_name[:100], invalid)
        return
    services.agent_register(team_id=team_id, via=Agent.Via.LISTEN, **registration)


def listener_left(team_id: str, agent_name: str | None, meta: dict) -> None:
    if agent_name:
        services.agent_seen(team_id=team_id, name=agent_name)
