"""One error shape for every endpoint: {"detail": "...", "code": "..."}."""

import enum
import logging
import sqlite3
import sys

import kombu.exceptions
import psycopg
import redis.exceptions
from django.db import InterfaceError, OperationalError, connections
from django.http import JsonResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from kite import crypto


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
    DATABASE_UNAVAILABLE = "database_unavailable"
    BROKER_UNAVAILABLE = "broker_unavailable"
    ENCRYPTION_KEY_MISSING = "encryption_key_missing"


log = logging.getLogger(__name__)
OUTAGE_RETRY_SECONDS = 5  # a database restart or a broker failover takes seconds


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
    outage = outage_error(exc)
    if outage is not None:
        return Response({"detail": outage.detail, "code": outage.code}, status=503, headers=outage.headers)
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
    """What Django answers for an exception nothing else handled; an outage met outside a view
    (in a middleware, e.g. saving a session) is a 503 here too."""
    outage = outage_error(sys.exc_info()[1])
    if outage is not None:
        return outage.response()
    return json_error("Internal server error.", Code.SERVER_ERROR, 500)


# --- outages: the database or the broker unreachable --------------------------------

# SQLSTATE classes of a connection that is gone or cannot be had: 08 connection exception,
# 53 insufficient resources (too many connections), 57P admin/crash shutdown, starting up.
_CONNECTION_SQLSTATES = ("08", "53", "57P")
# SQLite: busy/locked past the busy timeout, the file cannot be opened or read.
_SQLITE_UNAVAILABLE = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR}


def outage_error(exc: BaseException | None) -> ApiError | None:
    """The 503 for an exception that means the database or the broker (Redis) cannot be reached,
    else None. The caller may retry: nothing was half-stored (a transaction that failed rolled
    back), and a broken database connection is closed so the next request opens a new one.
    A stored secret the configured keys cannot decrypt is a 503 too: nothing was done, and the
    request succeeds once the operator restores the key (kite.crypto.keys_origin says how)."""
    if isinstance(exc, crypto.UndecryptableSecret):
        log.error("%s", exc)
        return ApiError("A secret stored on this instance cannot be decrypted with its KITE_ENCRYPTION_KEYS: its "
                        "operator must restore the key that encrypted it.", Code.ENCRYPTION_KEY_MISSING, status=503,
                        headers={"Retry-After": "60"})  # fmt: skip
    if _database_unreachable(exc):
        _close_broken_connections()
        log.warning("database unavailable: %s: %s", type(exc).__name__, str(exc).strip()[:300])
        return ApiError("The database is unavailable; try again shortly.", Code.DATABASE_UNAVAILABLE, status=503,
                        headers={"Retry-After": str(OUTAGE_RETRY_SECONDS)})  # fmt: skip
    if _broker_unreachable(exc):
        log.warning("broker unavailable: %s: %s", type(exc).__name__, str(exc).strip()[:300])
        return ApiError("The message broker is unavailable; try again shortly.", Code.BROKER_UNAVAILABLE,
                        status=503, headers={"Retry-After": str(OUTAGE_RETRY_SECONDS)})  # fmt: skip
    return None


def _database_unreachable(exc) -> bool:
    """Connection-level only: a constraint, a bad query or a deadlock is not an outage."""
    if isinstance(exc, (InterfaceError, psycopg.InterfaceError)):
        return True
    if not isinstance(exc, (OperationalError, psycopg.OperationalError)):
        return False
    cause = exc if isinstance(exc, psycopg.Error) else exc.__cause__
    if isinstance(cause, psycopg.Error):
        # No SQLSTATE: no server answered (connection refused, reset, closed unexpectedly).
        return cause.sqlstate is None or cause.sqlstate.startswith(_CONNECTION_SQLSTATES)
    if isinstance(cause, sqlite3.Error):
        return (getattr(cause, "sqlite_errorcode", 0) & 0xFF) in _SQLITE_UNAVAILABLE
    return False


def _broker_unreachable(exc) -> bool:
    return isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                            kombu.exceptions.OperationalError))  # fmt: skip


def _close_broken_connections() -> None:
    for connection in connections.all(initialized_only=True):
        if not connection.in_atomic_block:  # (a test's own transaction)
            connection.close_if_unusable_or_obsolete()
