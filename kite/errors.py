"""One error shape for every endpoint: {"detail": "...", "code": "..."}."""

import enum

from django.http import JsonResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


class Code(enum.StrEnum):
    INVALID = "invalid"
    MALFORMED_JSON = "malformed_json"
    NOT_AUTHENTICATED = "not_authenticated"
    AUTHENTICATION_FAILED = "authentication_failed"
    PERMISSION_DENIED = "permission_denied"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    TOO_LARGE = "payload_too_large"
    RATE_LIMITED = "rate_limited"
    CONFLICT = "conflict"
    SERVER_ERROR = "server_error"
    UNAVAILABLE = "unavailable"


class ApiError(Exception):
    """Raised by services; rendered by views as {detail, code} with `status`."""

    def __init__(self, detail: str, code: str, status: int = 400, headers: dict | None = None):
        super().__init__(detail)
        self.detail = detail
        self.code = str(code)
        self.status = status
        self.headers = headers or {}

    def response(self) -> JsonResponse:
        resp = JsonResponse({"detail": self.detail, "code": self.code}, status=self.status)
        for name, value in self.headers.items():
            resp[name] = value
        return resp


_DRF_CODES = {
    drf_exceptions.ParseError: Code.MALFORMED_JSON,
    drf_exceptions.NotAuthenticated: Code.NOT_AUTHENTICATED,
    drf_exceptions.AuthenticationFailed: Code.AUTHENTICATION_FAILED,
    drf_exceptions.PermissionDenied: Code.PERMISSION_DENIED,
    drf_exceptions.NotFound: Code.NOT_FOUND,
    drf_exceptions.MethodNotAllowed: Code.METHOD_NOT_ALLOWED,
    drf_exceptions.UnsupportedMediaType: Code.UNSUPPORTED_MEDIA_TYPE,
    drf_exceptions.Throttled: Code.RATE_LIMITED,
}


def _flatten(detail) -> str:
    """Turn DRF's nested validation errors into one readable sentence."""
    if isinstance(detail, dict):
        parts = []
        for field, value in detail.items():
            text = _flatten(value)
            parts.append(text if field == "non_field_errors" else f"{field}: {text}")
        return "; ".join(parts)
    if isinstance(detail, list):
        return " ".join(_flatten(item) for item in detail)
    return str(detail)


def exception_handler(exc, context):
    if isinstance(exc, ApiError):
        return Response({"detail": exc.detail, "code": exc.code}, status=exc.status, headers=exc.headers)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, drf_exceptions.ValidationError):
        body = {"detail": _flatten(exc.detail), "code": Code.INVALID, "fields": exc.detail}
    else:
        code = next((c for cls, c in _DRF_CODES.items() if isinstance(exc, cls)), Code.INVALID)
        body = {"detail": _flatten(exc.detail), "code": str(code)}
    if response.status_code == 401 and "WWW-Authenticate" not in response:
        response["WWW-Authenticate"] = 'Bearer realm="kite"'
    response.data = body
    return response


def json_error(detail: str, code: str, status: int) -> JsonResponse:
    return JsonResponse({"detail": detail, "code": str(code)}, status=status)


def handler400(request, exception=None):
    """Django's own refusals (a body over KITE_MAX_BODY_BYTES, a bad Host, too many fields) in
    the one error shape."""
    from django.core.exceptions import RequestDataTooBig

    if isinstance(exception, RequestDataTooBig):
        return json_error("Request body is too large.", Code.TOO_LARGE, 413)
    return json_error("Bad request.", Code.INVALID, 400)


def handler404(request, exception=None):
    return json_error("Not found.", Code.NOT_FOUND, 404)


def handler500(request):
    return json_error("Internal server error.", Code.SERVER_ERROR, 500)
