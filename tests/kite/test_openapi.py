"""GET /api/schema/ is a schema clients can be generated from: valid with no warning, every route of
/api/ and /hooks/ in it, a request body for every write, answers for every operation (errors as
{detail, code}), the bearer scheme on every admin operation, the peer-facing ones marked and signed."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.urls import URLPattern, URLResolver, get_resolver

from kite.schema import Generator

REPO = Path(__file__).resolve().parents[2]
METHODS = {"get", "put", "post", "patch", "delete"}
WRITES = {"put", "post", "patch", "delete"}
PEER_FACING = {
    ("get", "/api/federation/ping"), ("post", "/api/federation/terminate"), ("post", "/api/federation/rotate"),
    ("post", "/api/federation/handshake"), ("delete", "/api/federation/handshake"),
    ("get", "/api/federation/fleet/agents"), ("get", "/api/federation/fleet/agents/{agent_id}"),
    ("post", "/hooks/{team_id}/{source}"),
}  # fmt: skip
NOT_OPERATIONS = {"/api/schema/", "/api/docs/"}  # the schema itself and its viewer


@pytest.fixture(scope="module")
def schema():
    return Generator().get_schema(request=None, public=True)


def operations(schema):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield method, path, operation


def _routes(patterns, prefix=""):
    for pattern in patterns:
        route = prefix + str(pattern.pattern).lstrip("^").rstrip("$")
        if isinstance(pattern, URLResolver):
            yield from _routes(pattern.url_patterns, route)
        elif isinstance(pattern, URLPattern):
            yield "/" + route


def _as_template(route: str) -> str:
    route = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", route)  # re_path(r"^agents/(?P<agent_id>.+)$")
    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route)  # path("…/<int:peer_id>")


def test_the_schema_validates_with_no_warning(tmp_path):
    """As an operator checks it: drf-spectacular's own command, a warning fails it."""
    env = {**os.environ, "KITE_DATA_DIR": str(tmp_path / "data")}
    run = subprocess.run([sys.executable, "manage.py", "spectacular", "--validate", "--fail-on-warn", "--file",
                          str(tmp_path / "schema.yaml")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-5000:]
    assert "Warning" not in run.stderr and "Error" not in run.stderr, run.stderr[-5000:]
    assert "/api/federation/handshake:" in (tmp_path / "schema.yaml").read_text()


def test_every_route_of_the_api_and_the_hooks_is_an_operation(schema):
    routes = {_as_template(route) for route in _routes(get_resolver().url_patterns)}
    wanted = {route for route in routes if route.startswith(("/api/", "/hooks/"))} - NOT_OPERATIONS
    assert wanted - set(schema["paths"]) == set()
    assert set(schema["paths"]) - wanted == set()


def test_every_write_has_a_request_body_and_every_operation_its_answers(schema):
    ids = []
    for method, path, operation in operations(schema):
        ids.append(operation["operationId"])
        if method in WRITES:
            body = operation.get("requestBody", {}).get("content", {})
            assert body, f"{method.upper()} {path} has no requestBody"
            assert all(media.get("schema") for media in body.values()), f"{method.upper()} {path}"
        responses = operation["responses"]
        successes = {code: answer for code, answer in responses.items() if code < "300"}
        assert successes, f"{method.upper()} {path} has no success answer"
        for code, answer in successes.items():
            assert code == "204" or answer.get("content"), f"{method.upper()} {path} {code} has no body"
        errors = {code: answer for code, answer in responses.items() if code >= "400"}
        assert "400" in errors or method == "get", f"{method.upper()} {path}"
        assert "503" in errors, f"{method.upper()} {path}"
        for code, answer in errors.items():
            assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, code
    assert len(ids) == len(set(ids)), "operationIds must be unique"
    error = schema["components"]["schemas"]["Error"]
    assert error["required"] == ["detail", "code"] and set(error["properties"]) >= {"detail", "code"}


def test_admin_operations_take_the_api_key_as_bearer_and_the_session_cookie(schema):
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearerAuth"]["type"] == "http" and schemes["bearerAuth"]["scheme"] == "bearer"
    assert schemes["cookieAuth"] == {"type": "apiKey", "in": "cookie", "name": "sessionid"}
    admin = [(method, path, op) for method, path, op in operations(schema) if (method, path) not in PEER_FACING]
    assert len(admin) > 40
    for method, path, operation in admin:
        assert operation["security"] == [{"bearerAuth": []}, {"cookieAuth": []}], f"{method.upper()} {path}"
        assert "peer-facing" not in operation["tags"], f"{method.upper()} {path}"
        assert "401" in operation["responses"] and "403" in operation["responses"], f"{method.upper()} {path}"


def test_peer_facing_operations_are_tagged_and_signed_not_bearer(schema):
    found = {(method, path): operation for method, path, operation in operations(schema)
             if "peer-facing" in operation.get("tags", [])}  # fmt: skip
    assert set(found) == PEER_FACING
    scheme = schema["components"]["securitySchemes"]["peerSignature"]
    assert scheme["type"] == "apiKey" and scheme["in"] == "header" and scheme["name"] == "webhook-signature"
    for name in ("webhook-id", "webhook-timestamp", "v1,", "v1a,", "kite-peer"):
        assert name in scheme["description"]
    for (method, path), operation in found.items():
        names = {name for requirement in operation["security"] for name in requirement}
        assert "peerSignature" in names and "bearerAuth" not in names, f"{method.upper()} {path}"
        assert "401" in operation["responses"], f"{method.upper()} {path}"
    assert found["get", "/api/federation/fleet/agents"]["security"] == [{"peerSignature": [], "peerGrant": []}]
    handshake = found["post", "/api/federation/handshake"]["requestBody"]["content"]["application/json"]["schema"]
    assert handshake == {"$ref": "#/components/schemas/HandshakeRequest"}
    required = set(schema["components"]["schemas"]["HandshakeRequest"]["required"])
    assert {"code", "instance_id", "inbound_secret"} <= required


@pytest.mark.django_db
def test_the_schema_is_served_as_generated(api, schema):
    response = api.get("/api/schema/", {"format": "json"})

    assert response.status_code == 200
    served = response.json()
    assert {path: set(item) for path, item in served["paths"].items()} == {
        path: set(item) for path, item in schema["paths"].items()
    }
    assert served["servers"] and served["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
