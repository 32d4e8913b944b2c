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
