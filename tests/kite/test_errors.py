"""One error shape everywhere: {"detail": "...", "code": "..."}."""

import json

import pytest
from django.test import RequestFactory

from kite import errors
from kite.errors import ApiError, Code


def assert_error(response, status: int, code: str) -> dict:
    body = response.json()
    assert (response.status_code, body["code"]) == (status, code)
    assert isinstance(body["detail"], str) and body["detail"]
    return body


@pytest.mark.parametrize("path", ["/nope", "/api/nope", "/hooks/too/many/parts"])
def test_unknown_path_is_json_404(client, path):
    assert_error(client.get(path), 404, "not_found")


def test_wrong_method_on_an_api_endpoint_is_405(api):
    assert_error(api.delete("/api/me"), 405, "method_not_allowed")
    assert_error(api.post("/api/events", {}, format="json"), 405, "method_not_allowed")


def test_malformed_json_to_the_api_is_400_malformed_json(api):
    assert_error(api.post("/api/sources", "{", content_type="application/json"), 400, "malformed_json")


def test_non_json_body_to_the_api_is_415(api):
    response = api.post("/api/sources", "name=x&kind=none", content_type="application/x-www-form-urlencoded")

    assert_error(response, 415, "unsupported_media_type")


def test_validation_error_is_one_sentence_naming_the_fields(api):
    body = assert_error(api.post("/api/sources", {"kind": "paypal"}, format="json"), 400, "invalid")

    assert "name:" in body["detail"] and "kind:" in body["detail"]
    assert set(body["fields"]) == {"name", "kind"}


def test_unauthenticated_api_call_says_how_to_authenticate(anonymous_api, db):
    response = anonymous_api.get("/api/me")

    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"] == 'Bearer realm="kite"'


def test_api_error_renders_its_status_code_and_headers():
    response = ApiError("Slow down.", Code.RATE_LIMITED, status=429, headers={"Retry-After": "3"}).response()

    assert (response.status_code, response["Retry-After"]) == (429, "3")
    assert json.loads(response.content) == {"detail": "Slow down.", "code": "rate_limited"}


def test_api_error_defaults_to_400():
    error = ApiError("Bad.", "invalid")

    assert (error.status, error.code, error.response().status_code) == (400, "invalid", 400)


def test_server_error_handler_answers_json_without_internals():
    response = errors.handler500(RequestFactory().get("/x"))

    assert response.status_code == 500
    assert json.loads(response.content) == {"detail": "Internal server error.", "code": "server_error"}


def test_nested_validation_details_are_flattened():
    detail = {"name": ["This field is required."], "non_field_errors": ["Pick one."], "peer": {"url": ["Bad URL."]}}

    assert errors._flatten(detail) == "name: This field is required.; Pick one.; peer: url: Bad URL."


# --- outages: 503 database_unavailable / broker_unavailable with Retry-After, never a 500 -------


def _psycopg_outage(error=None) -> Exception:
    """The exception Django raises when the server went away mid-request (sqlstate-less, as
    psycopg reports a connection closed under it), or for `error`, a psycopg error of the server."""
    import psycopg
    from django.db import OperationalError

    cause = error or psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")
    try:
        raise OperationalError(str(cause)) from cause
    except OperationalError as exc:
        return exc


def _raising(exc):
    def raise_it(*args, **kwargs):
        raise exc

    return raise_it


def assert_outage(response, code: str) -> None:
    assert_error(response, 503, code)
    assert int(response["Retry-After"]) > 0


@pytest.mark.parametrize("sqlstate_error", [None, "AdminShutdown", "CannotConnectNow", "TooManyConnections"])
def test_a_webhook_meeting_a_database_outage_is_503_and_stores_nothing(client, team, monkeypatch, sqlstate_error):
    import psycopg.errors

    from ingest import services as ingest_services
    from ingest.models import Event
    from tests.factories import SourceFactory

    SourceFactory(team=team, name="plain", kind="none")
    error = getattr(psycopg.errors, sqlstate_error)("terminating connection") if sqlstate_error else None
    monkeypatch.setattr(ingest_services, "event_store", _raising(_psycopg_outage(error)))

    response = client.post(f"/hooks/{team.id}/plain", b'{"id": "e1"}', content_type="application/json")

    assert_outage(response, "database_unavailable")
    assert not Event.objects.exists()


def test_an_api_call_meeting_a_database_outage_is_503_too(api, monkeypatch):
    from ingest.api import views as event_views

    monkeypatch.setattr(event_views.selectors, "events_after", _raising(_psycopg_outage()))

    assert_outage(api.get("/api/events"), "database_unavailable")


@pytest.mark.parametrize("error", ["IntegrityError", "DataError", "ProgrammingError"])
def test_a_database_error_that_is_not_an_outage_stays_a_500(error):
    from django import db

    assert errors.outage_error(getattr(db, error)("duplicate key value")) is None


@pytest.mark.parametrize("server_error", ["DeadlockDetected", "QueryCanceled", "LockNotAvailable", "SerializationFailure"])
def test_an_operational_error_the_server_answered_with_is_not_an_outage(server_error):
    import psycopg.errors

    assert errors.outage_error(_psycopg_outage(getattr(psycopg.errors, server_error)("x"))) is None


def test_an_outage_met_outside_any_view_is_a_503_from_the_last_resort_handler():
    try:
        raise _psycopg_outage()
    except Exception:
        response = errors.handler500(RequestFactory().get("/x"))
    assert (response.status_code, int(response["Retry-After"])) == (503, errors.OUTAGE_RETRY_SECONDS)
    assert json.loads(response.content) == {"detail": "The database is unavailable; try again shortly.",
                                            "code": "database_unavailable"}  # fmt: skip


def test_a_rate_limited_webhook_with_redis_unreachable_is_503_broker_unavailable(client, team, monkeypatch):
    import redis

    from ingest.models import Event
    from kite import ratelimit
    from tests.factories import SourceFactory

    SourceFactory(team=team, name="plain", kind="none", rate_limit_per_second=10)
    nowhere = redis.Redis(host="127.0.0.1", port=1, socket_timeout=1, socket_connect_timeout=1)
    monkeypatch.setattr(ratelimit, "_redis", lambda: nowhere)

    response = client.post(f"/hooks/{team.id}/plain", b'{"id": "e1"}', content_type="application/json")

    assert_outage(response, "broker_unavailable")
    assert not Event.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_connection_the_server_dropped_is_a_503_then_replaced_by_a_fresh_one(client, team):
    """No mock: our session is terminated by the server as a restart would. The request that
    meets it is a 503 and closes it; the next request works on a new connection."""
    import psycopg
    from django.db import connection

    from ingest.models import Event
    from tests.factories import SourceFactory

    SourceFactory(team=team, name="plain", kind="none")
    assert client.post(f"/hooks/{team.id}/plain", b'{"id": "warm"}', content_type="application/json").status_code == 202
    params = connection.get_connection_params()
    with psycopg.connect(**{k: v for k, v in params.items() if k in ("dbname", "user", "host", "port", "password")},
                         autocommit=True) as admin:  # fmt: skip
        admin.execute("SELECT pg_terminate_backend(%s)", [connection.connection.info.backend_pid])

    dropped = client.post(f"/hooks/{team.id}/plain", b'{"id": "e1"}', content_type="application/json")
    assert_outage(dropped, "database_unavailable")
    assert connection.connection is None  # closed: not handed to the next request
    again = client.post(f"/hooks/{team.id}/plain", b'{"id": "e1"}', content_type="application/json")
    assert again.status_code == 202, again.content
    assert Event.objects.count() == 2 and Event.objects.filter(ce_id=again.json()["id"]).count() == 1
