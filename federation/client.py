"""Every outbound peer call goes through here (STYLE §8).

Owns connection pools (keep-alive per peer), TLS (system CAs, or the peer's pinned
server-certificate fingerprint), signing, timeouts, refusing link-local /
metadata targets, and turning answers into one `PeerCallError` carrying
`permanent` / `kind`.
"""

import ipaddress
import json
import socket
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson
import urllib3
from urllib3.exceptions import InsecureRequestWarning

from federation import backoff, signing
from federation.errors import Code

# urllib3 warns about verify=False even when the fingerprint pin verifies the
# server; Kite never sends unverified requests, so the warning is only noise.
warnings.filterwarnings("ignore", category=InsecureRequestWarning)

CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 10.0
BLOCKED_NETWORKS = [ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10")]


class UnsafeUrl(ValueError):
    pass


def check_url(url: str, *, resolve: bool = True) -> str:
    """https only; never a link-local or cloud-metadata address."""
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise UnsafeUrl("Peer URLs must use https:// (federation traffic is never sent in clear text).")
    if not parts.hostname:
        raise UnsafeUrl("Peer URL has no host.")
    if resolve:
        try:
            infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as exc:
            raise UnsafeUrl(f"Cannot resolve {parts.hostname}: {exc}") from None
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%")[0])
            if any(address in network for network in BLOCKED_NETWORKS):
                raise UnsafeUrl(f"{parts.hostname} resolves to {address}, a link-local/metadata address.")
    return url


def _system_cas() -> str | bool:
    """DESIGN §3: peers without a pin are verified by the system CAs (not certifi's bundle)."""
    import os
    import ssl

    for candidate in (os.environ.get("SSL_CERT_FILE"), ssl.get_default_verify_paths().cafile,
                      "/etc/ssl/certs/ca-certificates.crt"):  # fmt: skip
        if candidate and os.path.exists(candidate):
            return candidate
    return True


SYSTEM_CAS = _system_cas()
_pools: dict[tuple, urllib3.PoolManager] = {}
_pools_lock = threading.Lock()


def _pool(tls_fingerprint: str, signer=None) -> urllib3.PoolManager:
    """Keep-alive connections per (pin, identity, thread), straight on urllib3: `requests` on top
    cost ~450 µs of CPU per call (a fleet list makes one per peer; a delivery one per batch). No
    proxies or CA bundles from the environment; no retries or redirects (the outbox retries)."""
    key = (tls_fingerprint, signer.thumbprint if signer else "", threading.get_ident())
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            if tls_fingerprint:  # the pin replaces CA verification, and is stricter
                pool = urllib3.PoolManager(
                    assert_fingerprint=tls_fingerprint.removeprefix("sha256:"), cert_reqs="CERT_NONE",
                    ssl_context=signer.pinned_context if signer else None, retries=False,
                )  # fmt: skip
            elif signer:  # its context holds the system CAs already (loading them again costs ~30 ms)
                pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ssl_context=signer.ca_context, retries=False)
            else:
                pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", retries=False,
                                           ca_certs=SYSTEM_CAS if isinstance(SYSTEM_CAS, str) else None)  # fmt: skip
            _pools[key] = pool
    return pool


@dataclass
class _Response:
    status: int
    headers: urllib3.HTTPHeaderDict  # case-insensitive
    data: bytes


def _send(target: "Target", method: str, body: bytes, headers: dict, timeout: tuple[float, float]) -> _Response:
    """One HTTPS exchange (tests/federation/loopback.py replaces it to stay in process)."""
    response = _pool(target.tls_fingerprint, target.signer).request(
        method, target.url, body=body or None, headers=headers, redirect=False, retries=False,
        timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
    )  # fmt: skip
    return _Response(response.status, response.headers, response.data)


def _failure_name(exc: Exception) -> tuple[str, bool]:
    """(what to call it, whether it timed out): the names operators know from earlier releases."""
    if isinstance(exc, urllib3.exceptions.NewConnectionError):  # refused, no route (a ConnectTimeoutError subclass)
        return "ConnectionError", False
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return "ConnectTimeout", True
    if isinstance(exc, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
        return "ReadTimeout", True
    return "ConnectionError", False


@dataclass
class PeerCallError(Exception):
    """One failed call. kind: transient | auth | gone | permanent | tls."""

    kind: str
    detail: str
    status_code: int | None = None
    retry_after: float | None = None
    code: str = ""
    timed_out: bool = False  # no answer within the timeout (the fleet view reports `timeout`, not `unreachable`)

    def __str__(self):
        return self.detail

    @property
    def permanent(self) -> bool:
        return self.kind != "transient"


@dataclass
class PeerAnswer:
    status_code: int
    body: object
    latency_ms: int
    headers: urllib3.HTTPHeaderDict  # case-insensitive
    raw_body: bytes = b""


@dataclass(frozen=True)
class Target:
    url: str
    secret: str
    sender_id: str
    tls_fingerprint: str = ""
    signer: object = None  # federation.certificates.Signer: v1a signature + TLS client certificate


def call(target: Target, method: str, body: bytes = b"", *, content_type: str = "application/json",
         msg_id: str | None = None, timeout: tuple[float, float] | None = None,
         headers: dict[str, str] | None = None, audit_as=None) -> PeerAnswer:  # fmt: skip
    """Signed request; raises PeerCallError for anything but a 2xx. `headers`: extra, unsigned
    (e.g. `kite-grant`); the signature headers always win. `audit_as`: a federation.audit.PeerCall
    the outcome is noted on (Federation.PeerCalled + the calls metric) — every call but event
    deliveries passes one (those are the hot path, and have their Delivery rows)."""
    if audit_as is not None:
        again = {"content_type": content_type, "msg_id": msg_id, "timeout": timeout, "headers": headers}
        return _noted(audit_as, target.url, method, lambda: call(target, method, body, **again))
    check_url(target.url)
    extra = dict(headers or {})
    headers = extra | signing.sign_headers(
        secret=target.secret,
        msg_id=msg_id or f"msg_{uuid.uuid4().hex}",
        timestamp=int(time.time()),
        body=body,
        sender_id=target.sender_id,
        ed25519_sign=target.signer.sign if target.signer else None,
        key_thumbprint=target.signer.thumbprint if target.signer else None,
        also_signed_by=target.signer.also_signed_by if target.signer else (),
    )
    if body:
        headers["content-type"] = content_type
    started = time.perf_counter()
    try:
        response = _send(target, method, body, headers, timeout or (CONNECT_TIMEOUT, READ_TIMEOUT))
    except urllib3.exceptions.SSLError as exc:
        raise PeerCallError("transient", f"TLS: {_short(exc)}", code="tls") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        name, timed_out = _failure_name(exc)
        raise PeerCallError("transient", f"{name}: {_short(exc)}", code="connection", timed_out=timed_out) from None
    latency_ms = int((time.perf_counter() - started) * 1000)
    answer = PeerAnswer(response.status, _json_or_text(response.data), latency_ms, response.headers, response.data)
    outcome = backoff.classify(response.status)
    if outcome == "ok":
        return answer
    detail, code = _error_of(answer)
    if code == Code.STALE_TIMESTAMP:
        # The clocks disagree: nothing to paste, so no auth_failed pause. Retried like an outage (five
        # in a row pause the queue as down), and the first heartbeat that passes resumes it.
        outcome = "transient"
    raise PeerCallError(outcome, f"HTTP {response.status}: {detail}", response.status, _retry_after(response), code)


def _noted(audit_as, url: str, method: str, make_call) -> PeerAnswer:
    started = time.perf_counter()
    try:
        answer = make_call()
    except PeerCallError as failure:
        latency_ms = int((time.perf_counter() - started) * 1000)
        audit_as.done(method, url, status_code=failure.status_code, latency_ms=latency_ms, failure=failure)
        raise
    except UnsafeUrl as unsafe:  # never sent, and noted so
        refused = PeerCallError("permanent", str(unsafe), code="insecure_url")
        audit_as.done(method, url, status_code=None, latency_ms=0, failure=refused)
        raise
    audit_as.done(method, url, status_code=answer.status_code, latency_ms=answer.latency_ms)
    return answer


def _json_or_text(data: bytes) -> object:
    try:
        return orjson.loads(data)  # JSON is UTF-8 (RFC 8259); orjson.JSONDecodeError is a ValueError
    except ValueError:
        return data[:2000].decode("utf-8", "replace")[:500]


def _error_of(answer: PeerAnswer) -> tuple[str, str]:
    if isinstance(answer.body, dict):
        return str(answer.body.get("detail", ""))[:500], str(answer.body.get("code", ""))
    return str(answer.body)[:200], ""


def _retry_after(response) -> float | None:
    try:
        return float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None


def _short(exc: Exception) -> str:
    return str(exc)[:300]


def encode(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
