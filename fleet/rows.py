"""What agents and peers may send, and how a fleet row is matched — pure, no Django.

One set of checks for every way an agent arrives (POST /api/fleet/agents, the
`kite listen --agent` WebSocket) and for what a peer answers: a peer is another
operator's server, so its rows are checked and cut to size like any input.
"""

import re
from dataclasses import dataclass
from datetime import datetime

NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")  # what an agent URL https://host/agents/<name> allows
LABEL_KEY = re.compile(r"[A-Za-z0-9._/-]{1,63}")
MAX_LABELS = 32
MAX_LABEL_VALUE = 200
MAX_VERSION = 100
MAX_HOST = 255
MAX_REMOTE_ROWS = 5000  # a peer answering more is cut here
MAX_REMOTE_ID = 100
STATUSES = ("online", "offline")
VIAS = ("listen", "api")  # fleet.models.Agent.Via
PEER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # federation.peers.PEER_NAME
REMOTE_PREFIX = "peer:"
# A peer's agent id that goes into the detail call's path as it is: URL-unreserved characters
# need no quoting, so the path the caller signs is the path the peer checks. (A Kite's ids are numbers.)
ASKABLE_ID = re.compile(r"[A-Za-z0-9._~-]{1,100}")
# A grant's resource_id narrows the peer's view to one agent by name, or to the agents
# carrying one label: "label:<key>=<value>".
LABEL_GRANT_PREFIX = "label:"


@dataclass
class Invalid(ValueError):
    field: str
    message: str

    def __str__(self):
        return f"{self.field}: {self.message}"


def clean_registration(data) -> dict:
    """{name, version?, host?, labels?} from a registration, or Invalid naming the field.
    A field left out (or null) is left out: the agent keeps what it said before."""
    if not isinstance(data, dict):
        raise Invalid("body", "send a JSON object {name, version?, host?, labels?}.")
    unknown = sorted(set(data) - {"name", "version", "host", "labels"})
    if unknown:
        raise Invalid(unknown[0], "unknown field.")
    cleaned = {"name": clean_name(data.get("name"))}
    checks = {"version": lambda v: _text(v, "version", MAX_VERSION), "host": lambda v: _text(v, "host", MAX_HOST),
              "labels": clean_labels}  # fmt: skip
    for field, check in checks.items():
        if data.get(field) is not None:
            cleaned[field] = check(data[field])
    return cleaned


def clean_name(value) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise Invalid("name", "1-100 letters, digits, '.', '_' or '-' is required.")
    return value


def _text(value, field: str, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise Invalid(field, f"a printable string of at most {limit} characters.")
    return value.strip()


def clean_labels(value) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > MAX_LABELS:
        raise Invalid("labels", f"an object of at most {MAX_LABELS} string labels, e.g. {{\"region\": \"eu\"}}.")
    for key, label in value.items():
        if not LABEL_KEY.fullmatch(key):
            raise Invalid("labels", f"key {key[:70]!r}: 1-63 letters, digits, '.', '_', '/' or '-'.")
        if not isinstance(label, str) or len(label) > MAX_LABEL_VALUE or not label.isprintable():
            raise Invalid("labels", f"{key}: a printable string of at most {MAX_LABEL_VALUE} characters.")
    return dict(value)


def parse_label_params(values: list[str]) -> dict[str, str]:
    """`key=value` strings (the CLI's --label, the WebSocket's agent_label) as a dict."""
    labels = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise Invalid("labels", f"{item[:70]!r} is not key=value.")
        labels[key.strip()] = value.strip()
    return labels


def matches(row: dict, q: str) -> bool:
    """Case-insensitive search in name, host, version and labels (`key`, `value` or `key=value`)."""
    needle = q.strip().lower()
    if not needle:
        return True
    labels = row.get("labels") or {}
    haystack = [row.get("name") or "", row.get("host") or "", row.get("version") or ""]
    haystack += [f"{key}={value}" for key, value in labels.items()]
    return any(needle in text.lower() for text in haystack)


def grant_allows(resource_id: str | None, name: str, labels: dict) -> bool:
    if not resource_id:
        return True
    if resource_id.startswith(LABEL_GRANT_PREFIX):
        key, _, value = resource_id[len(LABEL_GRANT_PREFIX):].partition("=")
        return labels.get(key) == value
    return name == resource_id


def checked_row(raw) -> dict | None:
    """One agent as a peer answered it, checked and cut to size; None if malformed. (A fleet list
    checks every row of every peer: exact type tests, each field read once.)"""
    if type(raw) is not dict:
        return None
    remote_id, name = raw.get("id"), raw.get("name")
    id_type = type(remote_id)  # exact: a JSON true is no id
    if id_type is str:
        if not remote_id or len(remote_id) > MAX_REMOTE_ID:
            return None
    elif id_type is not int or len(str(remote_id)) > MAX_REMOTE_ID:
        return None
    if type(name) is not str or not NAME.fullmatch(name):
        return None
    labels = raw.get("labels")
    if labels:
        try:
            labels = clean_labels(labels)
        except Invalid:
            labels = {}
    else:
        labels = {}
    status, version, host = raw.get("status"), raw.get("version"), raw.get("host")
    return {
        "id": remote_id,
        "name": name,
        "status": status if status in STATUSES else "offline",
        "last_seen": _timestamp(raw.get("last_seen")),
        "version": version[:MAX_VERSION] if type(version) is str else "",
        "host": host[:MAX_HOST] if type(host) is str else "",
        "labels": labels,
    }


def checked_rows(raws) -> list[dict]:
    if not isinstance(raws, list):
        return []
    rows = (checked_row(raw) for raw in raws[:MAX_REMOTE_ROWS])
    return [row for row in rows if row is not None]


def remote_row(peer_name: str, wire: dict, *, stale: bool) -> dict:
    """A checked peer row as our fleet shows it: namespaced `peer:<name>/<id>`, read-only."""
    return {**wire, "id": f"peer:{peer_name}/{wire['id']}", "peer": peer_name, "read_only": True, "stale": stale}


def parse_remote_id(value: str) -> tuple[str, str] | None:
    """`peer:<name>/<id>` as (peer name, the peer's id for the agent); None when it is not one."""
    if not value.startswith(REMOTE_PREFIX):
        return None
    name, slash, remote_id = value[len(REMOTE_PREFIX):].partition("/")
    if not slash or not PEER_NAME.fullmatch(name) or not remote_id or len(remote_id) > MAX_REMOTE_ID:
        return None
    return name, remote_id


def askable(remote_id: str) -> bool:
    """Whether the detail call may put `remote_id` in its path (no dot segment, nothing to quote)."""
    return ASKABLE_ID.fullmatch(remote_id) is not None and remote_id not in (".", "..")


def detail_row(raw) -> dict | None:
    """One agent as a peer's detail answer tells it, checked like a listed row, plus `first_seen`
    and `via`; None if malformed."""
    row = checked_row(raw)
    if row is None:
        return None
    via = raw.get("via")
    return {**row, "first_seen": _timestamp(raw.get("first_seen")), "via": via if via in VIAS else None}


def remote_detail(peer_name: str, detail: dict, *, stale: bool, outcome: str, last_contact: str | None) -> dict:
    """A peer's agent as GET /api/fleet/agents/peer:<name>/<id> shows it: a local agent's detail
    fields, namespaced and read-only, with the outcome of asking the peer now and when it last told
    us about the agent."""
    return {**remote_row(peer_name, detail, stale=stale), "first_seen": detail.get("first_seen"),
            "via": detail.get("via"), "outcome": outcome, "last_contact": last_contact}  # fmt: skip


def _timestamp(value) -> str | None:
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value


def answer_rows(body) -> list | None:
    """The agent list in a peer's answer `{results: [...]}`, or None when the answer is not one."""
    if isinstance(body, dict) and isinstance(body.get("results"), list):
        return body["results"]
    return None
