"""Every outbound peer call goes through here (STYLE §8).

Owns sessions (keep-alive per peer), TLS (system CAs, or the peer's pinned
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
import requests
from requests.adapters import HTTPAdapter
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


class _PeerAdapter(HTTPAdapter):
    """Verify the server by its certificate's SHA-256 instead of a CA (self-signed peers), and/or
    present our identity certificate as the TLS client certificate (an SSLContext holding it)."""

    def __init__(self, fingerprint_hex: str = "", ssl_context=None, **kwargs):
        self.fingerprint_hex, self.ssl_context = fingerprint_hex, ssl_context
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        if self.fingerprint_hex:
            kwargs["assert_fingerprint"] = self.fingerprint_hex
        if self.ssl_context is not None:
            kwargs["ssl_context"] = self.ssl_context
        super().init_poolmanager(*args, **kwargs)


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
_sessions: dict[tuple, requests.Session] = {}
_sessions_lock = threading.Lock()


def _session(tls_fingerprint: str, signer=None) -> requests.Session:
    key = (tls_fingerprint, signer.thumbprint if signer else "", threading.get_ident())
    with _sessions_lock:
        session = _sessions.get(key)
        if session is None:
            session = requests.Session()
            # No proxies or CA bundles from the environment: REQUESTS_CA_BUNDLE would
            # silently override verify=False below and break pinned peers.
            session.trust_env = False
            if tls_fingerprint:
                context = signer.pinned_context if signer else None
                session.mount("https://", _PeerAdapter(tls_fingerprint.removeprefix("sha256:"), context))
                session.verify = False  # the pin above replaces CA verification, and is stricter
            else:
                if signer:
                    session.mount("https://", _PeerAdapter("", signer.ca_context))
                session.verify = SYSTEM_CAS
            _sessions[key] = session
    return session


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
    headers: dict
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
        response = _session(target.tls_fingerprint, target.signer).request(
            method, target.url, data=body or None, headers=headers,
            timeout=timeout or (CONNECT_TIMEOUT, READ_TIMEOUT), allow_redirects=False,
        )  # fmt: skip
    except requests.exceptions.SSLError as exc:
        raise PeerCallError("transient", f"TLS: {_short(exc)}", code="tls") from None
    except requests.exceptions.RequestException as exc:
        raise PeerCallError("transient", f"{exc.__class__.__name__}: {_short(exc)}", code="connection",
                            timed_out=isinstance(exc, requests.exceptions.Timeout)) from None  # fmt: skip
    latency_ms = int((time.perf_counter() - started) * 1000)
    answer = PeerAnswer(response.status_code, _json_or_text(response), latency_ms, dict(response.headers),
                        response.content)  # fmt: skip
    outcome = backoff.classify(response.status_code)
    if outcome == "ok":
        return answer
    detail, code = _error_of(answer)
    if code == Code.STALE_TIMESTAMP:
        # The clocks disagree: nothing to paste, so no auth_failed pause. Retried like an outage (five
        # in a row pause the queue as down), and the first heartbeat that passes resumes it.
        outcome = "transient"
    raise PeerCallError(
        outcome, f"HTTP {response.status_code}: {detail}", response.status_code, _retry_after(response), code
    )


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


def _json_or_text(response) -> object:
    try:
        return orjson.loads(response.content)  # JSON is UTF-8 (RFC 8259); orjson.JSONDecodeError is a ValueError
    except ValueError:
        return response.text[:500]


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
