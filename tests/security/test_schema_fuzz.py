"""Schemathesis over the live REST API: no operation of GET /api/schema/ answers 5xx, whatever it is sent.

One throwaway instance (PostgreSQL, Redis, HTTPS on loopback), the admin API key, every operation
the schema lists, with valid and with malformed input (`--mode all`: wrong types, out-of-range
numbers, missing fields), through the coverage and fuzzing phases. Destructive operations run too:
the instance is thrown away.

- Reproducible: deterministic generation (no random seed, no example database: the same cases for
  the same schema and answers); the report names each failing request as a curl command.
- Past the 404s: one object of each kind is made first (peer, invited peer, grant, token, trusted
  sender, certificate, agent, sources), and path parameters name one of them half of the time; the
  peer-facing operations and the webhook hook (in the schema, signed: the admin key is no credential
  there) get the team's id half of the time, so that their signature checks run.
- Text that has broken parsers before (HOSTILE) is mixed into every string parameter and field:
  digits `str.isdigit()` admits but `int()` refuses or reads otherwise, NUL, huge numbers, dates
  at the edge of the calendar.
- Besides `not_a_server_error`, every error answer must be Kite's one shape `{"detail", "code"}`
  (the check below, loaded into the schemathesis process as its hooks module: SCHEMATHESIS_HOOKS),
  and every answer must match the schema (`response_schema_conformance`): a generated client reads it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import schemathesis

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
MAX_EXAMPLES = 40  # per operation and phase
RUN_SECONDS = 300
DEAD_END = "https://127.0.0.1:9/hooks/fuzz/peer"  # loopback, nothing listens: a ping fails at once
HOSTILE = [
    "²", "٣", "１２", "𝟗", "0", "-1", "+1", " 7 ", "1_000", "1e400", "NaN", "99999999999999999999",
    "9" * 5000, "a\x00b", "\x00", "\u202e", "%00", "../../etc", "peer:x/1", "fg-².x", "fg-99999999999999999999.x",
    "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2026-02-30T00:00:00Z", "2026-01-31T12:00:00Z",
]  # fmt: skip
# What of it a header can carry (HTTP sends latin-1, no control character, no edge whitespace): the
# headers of the signed, peer-facing operations take these instead, or the client could not send them.
HEADER_HOSTILE = [value for value in HOSTILE if value == value.strip() and value.isprintable() and value.isascii()
                  or value == "²"]  # fmt: skip
SIGNED_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature", "kite-peer", "kite-key", "kite-grant")
# uvicorn's own answer to a request it cannot parse (e.g. a header value it refuses), before Kite sees it.
PROTOCOL_REFUSAL = (400, "Invalid HTTP request received.")


@schemathesis.check
def error_answers_are_json_detail_code(ctx, response, case):
    """One error shape: a 4xx or 5xx answer is a JSON object with a string `detail` and a string `code`."""
    if response.status_code < 400 or (response.status_code, response.text) == PROTOCOL_REFUSAL:
        return None
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"{response.status_code} answer is not JSON: {response.text[:200]!r}") from None
    if not (isinstance(body, dict) and isinstance(body.get("detail"), str) and isinstance(body.get("code"), str)):
        raise AssertionError(f"{response.status_code} answer is not {{detail, code}}: {str(body)[:200]}")
    return None


@pytest.fixture(scope="module")
def kite(tmp_path_factory):
    from tests.e2e.conftest import Instances  # here: schemathesis imports this module for its check alone

    started = Instances(tmp_path_factory)
    try:
        yield started.start("fuzz")
    finally:
        started.close()


def _made(kite, path: str, body: dict) -> dict:
    response = kite.api("POST", path, json=body)
    assert response.status_code in (200, 201), f"POST {path}: {response.status_code} {response.text}"
    return response.json()


def seed_objects(kite) -> tuple[dict[str, list], dict[str, list]]:
    """Objects for the path parameters to name: ({parameter: ids} for every operation, the same
    for DELETE alone). DELETE gets objects of its own: it would otherwise revoke the peer every
    later operation is meant to reach."""
    peer = _made(kite, "/api/federation/peers", {"name": "fuzz-peer", "peer_hook_url": DEAD_END})
    invited = _made(kite, "/api/federation/invitations", {"name": "fuzz-invited"})
    doomed = _made(kite, "/api/federation/peers", {"name": "fuzz-doomed", "peer_hook_url": DEAD_END})
    grant, doomed_grant = (_made(kite, f"/api/federation/peers/{row['id']}/grants", {"resource_kind": "fleet.agents"})
                           for row in (peer, doomed))  # fmt: skip
    certificate, doomed_certificate = (_made(kite, "/api/federation/certificates", {"subject": f"fuzz-{n}"})
                                       for n in (1, 2))  # fmt: skip
    token = _made(kite, "/api/federation/tokens", {"label": "fuzz"})
    sender = _made(kite, "/api/federation/trusted-senders", {"name": "fuzz-sender"})
    agent = _made(kite, "/api/fleet/agents", {"name": "fuzz-agent"})
    open_source = _made(kite, "/api/sources", {"name": "fuzz-open", "kind": "none"})
    team_id = kite.team_id()
    kept = {"peer_id": [peer["id"], invited["peer_id"]], "grant_id": [grant["id"]],
            "certificate_id": [certificate["id"]], "agent_id": [str(agent["id"]), agent["name"]],
            "team_id": [team_id], "source": ["kite", open_source["name"]], "query.team": [team_id]}  # fmt: skip
    deleted = {"peer_id": [doomed["id"]], "grant_id": [doomed_grant["id"]], "certificate_id": [doomed_certificate["id"]],
               "token_id": [token["id"]], "sender_id": [sender["id"]]}  # fmt: skip
    return kept, deleted


def _toml_list(values: list) -> str:
    # A JSON string is a TOML basic string here: ensure_ascii=False escapes only control characters
    # (\u0000), never a surrogate pair, which TOML would refuse.
    return "[" + ", ".join(json.dumps(value, ensure_ascii=False) for value in values) + "]"


def _bindings(ids: dict[str, list], prefix: str) -> tuple[list[str], list[str]]:
    """(dictionaries, parameters) lines: each parameter (`name`: a path one, or `query.name`) takes a
    seeded value half of the time."""
    dictionaries, parameters = [], []
    for key, values in ids.items():
        location, _, name = key.rpartition(".")
        dictionaries.append(f"[dictionaries.{prefix}{name}]\nvalues = {_toml_list(values)}")
        parameters.append(f'"{location or "path"}.{name}" = {{ dictionary = "{prefix}{name}", probability = 0.5 }}')
    return dictionaries, parameters


def config_toml(kept: dict[str, list], deleted: dict[str, list]) -> str:
    kept_dictionaries, kept_parameters = _bindings(kept, "")
    deleted_dictionaries, deleted_parameters = _bindings(deleted, "deleted_")
    return "\n".join([
        "[generation]", 'mode = "all"', f"max-examples = {MAX_EXAMPLES}", "deterministic = true",
        'dictionaries.string = { dictionary = "hostile", probability = 0.2 }',
        "[dictionaries.hostile]", f"values = {_toml_list(HOSTILE)}", *kept_dictionaries, *deleted_dictionaries,
        "[dictionaries.header_hostile]", f"values = {_toml_list(HEADER_HOSTILE)}",
        "[parameters]", *kept_parameters,
        *(f'"header.{name}" = {{ dictionary = "header_hostile", probability = 0.2 }}' for name in SIGNED_HEADERS),
        # DELETE: objects of its own, and no ids taken from earlier answers (those are the kept objects).
        "[[operations]]", 'include-method = "DELETE"', "[operations.parameters]", *deleted_parameters,
        *(f"[operations.phases.{phase}.extra-data-sources]\nresponses = false" for phase in ("coverage", "fuzzing")),
    ]) + "\n"  # fmt: skip


def schema_operations(kite) -> int:
    response = kite.api("GET", "/api/schema/", params={"format": "json"})
    assert response.status_code == 200, response.text
    methods = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    return sum(1 for operations in response.json()["paths"].values() for method in operations if method in methods)


def schemathesis_run(kite, workdir: Path, config: str) -> subprocess.CompletedProcess:
    """`schemathesis run` as an operator runs it, from a fresh directory (no cache, no example database)."""
    (workdir / "schemathesis.toml").write_text(config)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": __name__, "PYTHONPATH": str(REPO)}
    argv = [
        str(SCHEMATHESIS), "--config-file", str(workdir / "schemathesis.toml"), "run", f"{kite.url}/api/schema/",
        "--tls-verify", str(kite.cert),
        "--header", f"Authorization: Bearer {kite.admin_key}",
        "--checks", f"not_a_server_error,response_schema_conformance,{error_answers_are_json_detail_code.__name__}",
        "--continue-on-failure", "--workers", "1", "--request-timeout", "30", "--no-color",
    ]  # fmt: skip
    return subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_SECONDS)


def test_no_operation_answers_a_server_error_to_valid_or_malformed_input(kite, tmp_path):
    operations = schema_operations(kite)
    run = schemathesis_run(kite, tmp_path, config_toml(*seed_objects(kite)))

    assert run.returncode == 0, f"schemathesis found failures:\n{run.stdout[-20000:]}\n{run.stderr[-3000:]}"
    assert f"Tested: {operations}\n" in run.stdout, run.stdout[-3000:]  # every operation ran
    assert "Internal Server Error" not in kite.log_path.read_text(errors="replace"), kite.log_tail  # Django's 500 log
