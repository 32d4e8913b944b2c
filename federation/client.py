"""Every outbound peer call goes through here (docs/architecture.md "Outbound calls").

Owns connection pools (keep-alive per peer), TLS (system CAs, or the peer's pinned
server-certificate fingerprint), signing, timeouts, the destination policy (no
peer call reaches loopback, private, link-local or other non-global addresses
unless KITE_PEER_ALLOWED_NETWORKS lists them; the address checked is the one
connected to), answers read up to a size limit, and turning answers into one
`PeerCallError` carrying `permanent` / `kind`.
"""

import ipaddress
import os
import socket
import ssl
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson
import urllib3
from django.conf import settings
from urllib3.exceptions import InsecureRequestWarning

from federation import backoff, signing
from federation.errors import Code
from ingest import cloudevent

# urllib3 warns about verify=False even when the fingerprint pin verifies the
# server; Kite never sends unverified requests, so the warning is only noise.
warnings.filterwarnings("ignore", category=InsecureRequestWarning)

CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 10.0
# Answers are read up to these sizes, so a peer cannot make this process hold what it sends.
MAX_ANSWER_BYTES = 1024 * 1024  # control calls and deliveries: a few KiB in practice
MAX_FLEET_ANSWER_BYTES = 16 * 1024 * 1024  # a peer's fleet list: tens of thousands of agents
_READ_CHUNK = 64 * 1024
RESOLVED_SECONDS = 30.0  # a checked resolution is reused this long (one lookup per peer, not per call)

# --- destination policy -------------------------------------------------------------
# Special-purpose space (the IANA registries) where no Kite on the internet lives: a peer URL
# there reaches this host, its private network or its cloud's metadata service instead.
_NON_GLOBAL_V4 = [(ipaddress.ip_network(cidr), why) for cidr, why in (
    ("0.0.0.0/8", "unspecified"), ("10.0.0.0/8", "private"), ("100.64.0.0/10", "shared (CGNAT)"),
    ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "link-local (cloud metadata)"), ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"), ("192.0.2.0/24", "documentation"), ("192.88.99.0/24", "reserved"),
    ("192.168.0.0/16", "private"), ("198.18.0.0/15", "benchmarking"), ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"), ("224.0.0.0/4", "multicast"), ("240.0.0.0/4", "reserved"),
)]  # fmt: skip
_NON_GLOBAL_V6 = [(ipaddress.ip_network(cidr), why) for cidr, why in (
    ("::/128", "unspecified"), ("::1/128", "loopback"), ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"), ("2001::/23", "reserved"), ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"), ("fc00::/7", "unique local (ULA)"), ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"), ("ff00::/8", "multicast"),
)]  # fmt: skip
# IPv6 forms that carry an IPv4 address the packets end up at: judged by that address.
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")  # IPv6 outside it is reserved or special


class UnsafeUrl(ValueError):
    pass


def refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address, allowed=()) -> str | None:
    """Why no peer call may go to `address` ("loopback", "private", ...), or None: a global address,
    or one inside a network of `allowed` (KITE_PEER_ALLOWED_NETWORKS)."""
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a socket to ::ffff:a.b.c.d talks to a.b.c.d
    if any(address in network for network in allowed):
        return None
    return _non_global(address)


def _non_global(address) -> str | None:
    for network, why in _NON_GLOBAL_V4 if address.version == 4 else _NON_GLOBAL_V6:
        if address in network:
            return why
    if address.version == 4:
        return None
    form, embedded = _embedded_ipv4(address)
    if embedded is not None:
        why = _non_global(embedded)
        return f"{why} ({form} form of {embedded})" if why else None
    return None if address in _GLOBAL_UNICAST_V6 else "reserved"


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address | None]:
    if address in _NAT64 or address in _IPV4_COMPATIBLE:
        form = "NAT64" if address in _NAT64 else "IPv4-compatible"
        return form, ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _SIX_TO_FOUR:
        return "6to4", address.sixtofour
    return "", None


@dataclass(frozen=True)
class Destination:
    """A peer URL's host, resolved and checked: calls connect to `addresses` and nothing else,
    while TLS (SNI, certificate name) and the Host header use `host`."""

    host: str
    port: int
    addresses: tuple[str, ...]

    @property
    def host_header(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == 443 else f"{name}:{self.port}"


def check_url(url: str, *, resolve: bool = True) -> str:
    """https only, and (with `resolve`) every address the host resolves to passes the destination policy."""
    if resolve:
        destination(url)
    else:
        _host_and_port(url)
    return url


def destination(url: str) -> Destination:
    """Resolve the URL's host (or reuse a resolution of the last RESOLVED_SECONDS) and check every
    address: one that fails refuses the URL, since a connection could be made to any of them."""
    host, port = _host_and_port(url)
    addresses = _resolve(host, port)
    for address in addresses:
        why = refusal(ipaddress.ip_address(address), settings.KITE_PEER_ALLOWED_NETWORKS)
        if why:
            raise UnsafeUrl(_refused(host, address, why))
    return Destination(host, port, addresses)


def _host_and_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise UnsafeUrl("Peer URLs must use https:// (federation traffic is never sent in clear text).")
    if not parts.hostname:
        raise UnsafeUrl("Peer URL has no host.")
    try:
        return parts.hostname, parts.port or 443
    except ValueError as exc:  # a port that is not one
        raise UnsafeUrl(f"Peer URL has a bad port: {exc}") from None


_resolved: dict[tuple[str, int], tuple[float, tuple[str, ...]]] = {}


def _resolve(host: str, port: int) -> tuple[str, ...]:
    try:
        ipaddress.ip_address(host)
        return (host,)  # a literal: nothing to look up
    except ValueError:
        pass
    now = time.monotonic()
    cached = _resolved.get((host, port))
    if cached is not None and cached[0] > now:
        return cached[1]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeUrl(f"Cannot resolve {host}: {exc}") from None
    addresses = tuple(dict.fromkeys(info[4][0] for info in infos))  # in the resolver's order, once each
    if len(_resolved) >= 4096:  # peers are few: only a flood of names fills it
        _resolved.clear()
    _resolved[(host, port)] = (now + RESOLVED_SECONDS, addresses)
    return addresses


def _refused(host: str, address: str, why: str) -> str:
    where = f"{address} is" if host == address else f"{host} resolves to {address},"
    ip = ipaddress.ip_address(address.split("%")[0])
    ip = getattr(ip, "ipv4_mapped", None) or ip
    example = "127.0.0.0/8,::1/128" if why == "loopback" else ipaddress.ip_network(ip)
    return (f"{where} a {why} address: peer URLs must reach public addresses. To federate over such a network, "
            f"list it in KITE_PEER_ALLOWED_NETWORKS (comma-separated CIDRs, e.g. {example}).")  # fmt: skip


def _system_cas() -> str | bool:
    """Peers without a pin are verified by the system CAs, not certifi's bundle (SECURITY.md, attacker 5)."""
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
class RawAnswer:
    status: int
    headers: urllib3.HTTPHeaderDict  # case-insensitive
    data: bytes


def _send(target: "Target", method: str, body: bytes, headers: dict, timeout: tuple[float, float],
          max_answer_bytes: int = MAX_ANSWER_BYTES) -> RawAnswer:  # fmt: skip
    """One HTTPS exchange with an address the destination policy passed, the answer read up to
    `max_answer_bytes` (tests/federation/loopback.py replaces it to stay in process)."""
    where = _checked(target.url)
    parts = urlsplit(target.url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # urllib3 is handed the address, never the name: it has nothing to resolve again (DNS rebinding).
    headers = {**headers, "host": where.host_header}
    manager = _pool(target.tls_fingerprint, target.signer)
    for attempt, address in enumerate(where.addresses, start=1):
        pool = manager.connection_from_host(address, where.port, "https", pool_kwargs={"server_hostname": where.host})
        try:
            response = pool.urlopen(
                method, path, body=body or None, headers=headers, redirect=False, retries=False,
                timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]), preload_content=False,
                decode_content=False,  # no Accept-Encoding is sent: a compressed answer could not be bounded
            )  # fmt: skip
        except urllib3.exceptions.ConnectTimeoutError:  # nothing was sent: the next checked address may answer
            if attempt == len(where.addresses):
                raise
            continue
        return RawAnswer(response.status, response.headers, _read_bounded(response, max_answer_bytes))
    raise AssertionError("a destination has at least one address")


def _checked(url: str) -> Destination:
    try:
        return destination(url)
    except UnsafeUrl as unsafe:  # never sent
        raise PeerCallError("permanent", str(unsafe), code=Code.INSECURE_URL) from None


def _read_bounded(response, limit: int) -> bytes:
    """The answer's body, or PeerCallError `answer_too_large` as soon as it is known to pass `limit`
    (Content-Length first, then what arrives); the rest is never read and the connection is closed."""
    chunks, size = [], 0
    try:
        declared = response.headers.get("content-length", "")
        if declared.strip().isascii() and declared.strip().isdigit() and int(declared) > limit:  # not "²"
            raise too_large(response.status, limit)
        while chunk := response.read(_READ_CHUNK):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise too_large(response.status, limit)
    except BaseException:
        response.close()  # not drained: the connection cannot carry another request
        response.release_conn()
        raise
    response.release_conn()
    return b"".join(chunks)


def too_large(status: int, limit: int) -> "PeerCallError":
    # transient: the peer may well have done what was asked (a delivery is answered `duplicate` when
    # sent again), and an answer this size is the peer's fault, like a 5xx.
    detail = f"answer_too_large: the peer's HTTP {status} answer is over {limit:,} bytes; not read, connection closed."
    return PeerCallError("transient", detail, code="answer_too_large")


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
         headers: dict[str, str] | None = None, audit_as=None,
         max_answer_bytes: int = MAX_ANSWER_BYTES) -> PeerAnswer:  # fmt: skip
    """Signed request; raises PeerCallError for anything but a 2xx. `headers`: extra, unsigned
    (e.g. `kite-grant`); the signature headers always win. `audit_as`: a federation.audit.PeerCall
    the outcome is noted on (Federation.PeerCalled + the calls metric) — every call but event
    deliveries passes one (those are the hot path, and have their Delivery rows). A URL the
    destination policy refuses is PeerCallError `insecure_url`, an answer over `max_answer_bytes`
    PeerCallError `answer_too_large`."""
    if audit_as is not None:
        again = {"content_type": content_type, "msg_id": msg_id, "timeout": timeout, "headers": headers,
                 "max_answer_bytes": max_answer_bytes}  # fmt: skip
        return _noted(audit_as, target.url, method, lambda: call(target, method, body, **again))
    _checked(target.url)
    extra = dict(headers or {})
    headers = extra | signing.sign_headers(
        secret=target.secret,
        msg_id=msg_id or f"msg_{uuid.uuid4().hex}",
        timestamp=int(time.time()),
        body=body,
        sender_id=target.sender_id,
        binding=signing.binding_for(method, target.url),
        ed25519_sign=target.signer.sign if target.signer else None,
        key_thumbprint=target.signer.thumbprint if target.signer else None,
        also_signed_by=target.signer.also_signed_by if target.signer else (),
    )
    if body:
        headers["content-type"] = content_type
    started = time.perf_counter()
    try:
        response = _send(target, method, body, headers, timeout or (CONNECT_TIMEOUT, READ_TIMEOUT),
                         max_answer_bytes=max_answer_bytes)  # fmt: skip
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


encode = cloudevent.json_bytes  # compact UTF-8 JSON
