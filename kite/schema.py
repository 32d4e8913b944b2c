"""The OpenAPI schema (GET /api/schema/) clients are generated from: drf-spectacular, plus

- the admin API key as the `bearerAuth` scheme of every admin operation (the session cookie too);
- the plain Django views other instances and providers call (the peer-facing endpoints, the webhook
  hook): each names, with `documented_by`, an APIView that only describes it; they carry the tag
  `peer-facing` and the `peerSignature` scheme (Standard Webhooks headers, SECURITY.md "The signed message");
- Kite's one error shape `{detail, code}` for every error status an operation can answer.
"""

from django.conf import settings
from drf_spectacular import openapi
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.generators import EndpointEnumerator, SchemaGenerator
from drf_spectacular.utils import inline_serializer
from rest_framework import serializers

PEER_FACING = "peer-facing"
BEARER = "bearerAuth"
PEER_SIGNATURE = "peerSignature"
PEER_GRANT = "peerGrant"
ERROR = {"$ref": "#/components/schemas/Error"}

SECURITY_SCHEMES = {
    PEER_SIGNATURE: {
        "type": "apiKey", "in": "header", "name": "webhook-signature",
        "description": (
            "Standard Webhooks, as another Kite instance signs (SECURITY.md has the exact message). Headers: "
            "`webhook-id` (used once per sender on control calls), `webhook-timestamp` (unix seconds, ±5 min), "
            "`webhook-signature` (space-separated `v1,<base64 HMAC-SHA256(secret, msg)>` and, when the peer's "
            "certificate is pinned, `v1a,<base64 Ed25519(identity key, msg)>`), `kite-peer` (the sender's "
            "instance ID) and, with a certificate, `kite-key` (its thumbprint). msg is "
            "`{webhook-id}.{webhook-timestamp}.{body}`; control calls also bind method, path and team. A "
            "refusal is 401 with a code naming the factor: unknown_peer, bad_secret, bad_certificate, "
            "missing_certificate, stale_timestamp."
        ),
    },
    PEER_GRANT: {
        "type": "apiKey", "in": "header", "name": "kite-grant",
        "description": "A fleet.agents grant token `fg-<id>.<secret>` this instance issued to the calling peer.",
    },
}  # fmt: skip

ERROR_SCHEMA = {
    "type": "object",
    "description": "Every error Kite answers: a sentence for people and a stable code for programs.",
    "properties": {
        "detail": {"type": "string"},
        "code": {"type": "string", "description": "e.g. invalid, not_found, bad_secret, database_unavailable"},
        "fields": {
            "type": "object", "additionalProperties": True,
            "description": "400 invalid only: the refused fields, each with why",
        },
    },
    "required": ["detail", "code"],
}  # fmt: skip

ERROR_STATUSES = {
    "400": "Bad input (nothing changed): a malformed body or parameter, a field this write does not take.",
    "401": "Not authenticated: no credentials, or credentials that are unknown, revoked or do not verify.",
    "403": "Authenticated but not allowed (not a member or not a team admin; a grant that does not cover it).",
    "404": "No such object in your team.",
    "413": "The body is larger than this instance takes.",
    "422": "Understood but not supported.",
    "429": "Rate limited: try again after Retry-After seconds.",
    "503": "The database or the message broker is unavailable (Retry-After); nothing was done.",
}
WRITES = {"post", "put", "patch", "delete"}
NO_BODY_SCHEMA = {
    "type": "object", "maxProperties": 0,
    "description": "This call takes no body: a field sent is refused (400 naming it) and nothing changes.",
}  # fmt: skip


class NoBody(serializers.Serializer):
    """`request=NoBody`: a write that takes no body (kite.fields.refuse_any)."""


class AutoSchema(openapi.AutoSchema):
    """drf-spectacular's, but every write says what body it takes: a DELETE too (Kite's refuse any
    field; the handshake's withdrawal takes its nonce), and `NoBody` as an empty object."""

    def _get_request_body(self, direction="request"):
        declared = self.get_request_serializer() if self.method in ("POST", "DELETE") else None
        if declared is NoBody or isinstance(declared, NoBody):
            return {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/NoBody"}}},
                    "required": False}  # fmt: skip
        if self.method != "DELETE":
            return super()._get_request_body(direction)
        schema, required = self._get_request_for_media_type(declared, direction)
        return {"content": {"application/json": {"schema": schema}}, "required": required}

    def _get_request_for_media_type(self, serializer, direction="request"):
        """A PATCH whose serializer is `WholeOnPatch` validates its body whole (its required fields
        stay required), not as a partial update."""
        if self.method != "PATCH" or not isinstance(serializer, type) or not issubclass(serializer, WholeOnPatch):
            return super()._get_request_for_media_type(serializer, direction)
        self.method = "PUT"  # drf-spectacular makes a PATCH body partial by the method alone
        try:
            return super()._get_request_for_media_type(serializer, direction)
        finally:
            self.method = "PATCH"


class WholeOnPatch:
    """Mixed into a serializer given to @extend_schema(request=…) for a PATCH that is not partial."""


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "kite.auth.ApiKeyAuthentication"
    name = BEARER

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An admin API key of a team: `Authorization: Bearer <key>` (bootstrap writes one to "
            "$KITE_DATA_DIR/admin-api-key; `manage.py createapikey --team T` makes more).",
        }


def documented_by(description_view):
    """Mark a plain Django view as described, in the schema, by `description_view` (an APIView
    never routed: its handlers' @extend_schema and docstrings are the documentation). Outermost."""

    def mark(view):
        view.openapi_view = description_view.as_view()
        return view

    return mark


class Enumerator(EndpointEnumerator):
    """DRF views, and the plain views marked with `documented_by`."""

    def should_include_endpoint(self, path, callback):
        return super().should_include_endpoint(path, getattr(callback, "openapi_view", callback))

    def get_allowed_methods(self, callback):
        return super().get_allowed_methods(getattr(callback, "openapi_view", callback))


class Generator(SchemaGenerator):
    endpoint_inspector_cls = Enumerator

    def create_view(self, callback, method, request=None):
        return super().create_view(getattr(callback, "openapi_view", callback), method, request)


def page(name: str, item: serializers.Serializer, **extra) -> serializers.Serializer:
    """`{results: [item…]}`, as Kite's lists answer."""
    return inline_serializer(name, {"results": item, **extra})


def _error_statuses(path: str, method: str, operation: dict) -> list[str]:
    parameters = operation.get("parameters", [])
    schemes = {name for requirement in operation.get("security", []) for name in requirement}
    peer_facing = PEER_FACING in operation.get("tags", [])
    statuses = ["503"]
    if method in WRITES or any(p.get("in") in ("query", "header") for p in parameters) or peer_facing:
        statuses.append("400")
    if schemes:
        statuses.append("401")
    if schemes & {BEARER, PEER_GRANT}:  # not a member, not a team admin; a grant that does not cover it
        statuses.append("403")
    if "{" in path or any(p.get("name") == "team" for p in parameters):
        statuses.append("404")
    if "requestBody" in operation:
        statuses.append("413")
    if peer_facing:
        statuses.append("429")
    return statuses


def postprocess(result, generator, request, public):
    """Security schemes of the peer-facing calls, the Error component, and its answers on every
    operation (what a view declares itself is kept)."""
    components = result.setdefault("components", {})
    components.setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
    components.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    components["schemas"]["NoBody"] = NO_BODY_SCHEMA
    for path, operations in result.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            for code in _error_statuses(path, method, operation):
                responses.setdefault(code, {"description": ERROR_STATUSES[code]})
            for code, response in responses.items():
                if code >= "400" and "content" not in response:  # declared by the view without a body
                    response["content"] = {"application/json": {"schema": ERROR}}
            operation["responses"] = dict(sorted(responses.items()))
    result["servers"] = [{"url": settings.KITE_PUBLIC_URL}]
    return result


