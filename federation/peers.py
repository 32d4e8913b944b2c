"""A peer row's own rules, shared by everything that makes or calls one: the checks of what an
operator or a handshake gives (name, URL, scopes, filters, secrets, TLS pin, certificate), its
secrets, and where and how a call to it goes (`target_for`, `ping_url`)."""

import functools
import re
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from federation import certificates, client
from federation import filters as peer_filters
from federation.errors import Code
from federation.models import Peer, PeerHealth
from kite import crypto, fastsql
from kite.errors import ApiError
from kite.models import Team

PEER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
TLS_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")
MIN_SECRET_LENGTH = 16
MAX_SCOPES = 50


# --- what an operator (or a handshake) gives ----------------------------------------------------


# --- reading peers with their health on hot paths (plain SQL: the ORM's compilation of this one
# query was ~0.8 ms of CPU, more than the query; an outbox drain and every peer request read one) -

_PEER_FIELDS = tuple(Peer._meta.concrete_fields)
_HEALTH_FIELDS = tuple(PeerHealth._meta.concrete_fields)
_HEALTH_KEY = _HEALTH_FIELDS.index(PeerHealth._meta.pk)  # NULL: the peer has no health row yet


@functools.cache
def with_health_sql() -> str:
    """SELECT of peers (alias `p`) with their health rows and, on PostgreSQL, each row's version
    (its xmin, which every UPDATE changes), to be completed by a WHERE clause; rows for `loaded`."""
    version = ", p.xmin::text" if connection.vendor == "postgresql" else ", NULL"
    return (
        f"SELECT {', '.join(f'p.{field.column}' for field in _PEER_FIELDS)}, "
        f"{', '.join(f'h.{field.column}' for field in _HEALTH_FIELDS)}{version} "
        f"FROM {Peer._meta.db_table} p LEFT JOIN {PeerHealth._meta.db_table} h ON h.{PeerHealth._meta.pk.column} = p.id "
    )


def loaded(row) -> Peer:
    """A peer from a row of `with_health_sql`: its health row attached, its version as `row_version`."""
    peer = fastsql.load(Peer, _PEER_FIELDS, row[: len(_PEER_FIELDS)])
    health = row[len(_PEER_FIELDS) : -1]
    if health[_HEALTH_KEY] is None:  # no health row yet: an empty one, made by its first write (PeerHealth.record)
        peer.health = PeerHealth(peer=peer)
    else:
        peer.health = fastsql.load(PeerHealth, _HEALTH_FIELDS, health)
    peer.row_version = row[-1]
    return peer


def with_health(peer_id: int) -> Peer | None:
    """`Peer.objects.filter(pk=…).select_related("health").first()`, without the ORM's compilation."""
    with connection.cursor() as cursor:
        cursor.execute(with_health_sql() + "WHERE p.id = %s", [peer_id])
        row = cursor.fetchone()
    return loaded(row) if row is not None else None


def check_name(name: str) -> str:
    if not PEER_NAME.match(name or ""):
        raise ApiError("name must be 1-63 letters, digits, '.', '_' or '-'.", Code.INVALID)
    return name


def check_secret(value: str, field: str) -> str:
    if not isinstance(value, str) or len(value.strip()) < MIN_SECRET_LENGTH:
        raise ApiError(f"{field} must be a secret of at least {MIN_SECRET_LENGTH} characters.", Code.INVALID)
    return value.strip()


def check_url(url: str) -> str:
    try:
        return client.check_url(url)
    except client.UnsafeUrl as exc:
        raise ApiError(str(exc), Code.INSECURE_URL) from None


def check_scopes(scopes) -> list[str]:
    if not isinstance(scopes, list) or len(scopes) > MAX_SCOPES:
        raise ApiError(f"scopes must be a list of at most {MAX_SCOPES} globs.", Code.INVALID)
    for scope in scopes:
        if not isinstance(scope, str) or not scope.strip() or len(scope) > 200:
            raise ApiError("Every scope must be a non-empty glob such as 'stripe.*'.", Code.INVALID)
    return [scope.strip() for scope in scopes]


def check_filters(value) -> list:
    try:
        return peer_filters.validate(value)
    except peer_filters.InvalidFilters as exc:
        raise ApiError(str(exc), Code.INVALID_FILTERS) from None


def check_tls_fingerprint(value: str) -> str:
    value = (value or "").strip().lower()
    if value and not TLS_FINGERPRINT.match(value):
        raise ApiError("tls_fingerprint must be 'sha256:' and 64 hex digits.", Code.INVALID)
    return value


def pin_certificate(peer: Peer, pem: str) -> None:
    peer.certificate_pem, peer.certificate_thumbprint = certificates.parse_peer_pem(pem) if pem.strip() else ("", "")


# --- the row ----------------------------------------------------------------------------------


def set_secret(peer: Peer, direction: str, secret: str) -> None:
    setattr(peer, f"{direction}_secret_encrypted", crypto.encrypt(secret))
    setattr(peer, f"{direction}_fingerprint", crypto.fingerprint(secret))


def save_new(peer: Peer) -> None:
    try:
        with transaction.atomic():
            peer.save()
    except IntegrityError:
        raise ApiError(_name_taken(peer), Code.CONFLICT, status=409) from None


def _name_taken(peer: Peer) -> str:
    """The 409's sentence; when the name is a trusted sender's and a peer is wanted, how to get one."""
    taken = f"Team already has a peer named {peer.name!r}."
    sender = Peer.objects.filter(team_id=peer.team_id, name=peer.name, role=Peer.Role.SENDER).exclude(
        status=Peer.Status.REVOKED).first()  # fmt: skip
    if sender is None or peer.role != Peer.Role.PEER:
        return taken
    return (f"{taken} It is trusted sender {sender.name!r} (id {sender.pk}): to send to it as well, make it a peer "
            f"with PATCH /api/federation/trusted-senders/{sender.pk} {{peer_hook_url, outbound_token?, scopes, "
            "max_hops?, tls_fingerprint?}: the same row, its inbound secret kept.")  # fmt: skip


def peer_summary(peer: Peer) -> dict:
    """What the audit trail keeps of a peer's configuration: fingerprints, never secrets."""
    return {
        "id": peer.pk, "role": peer.role, "status": peer.status, "peer_hook_url": peer.peer_hook_url,
        "scopes": peer.scopes, "filters": peer.filters, "max_hops": peer.max_hops,
        "outbound_fingerprint": peer.outbound_fingerprint, "inbound_fingerprint": peer.inbound_fingerprint,
        "certificate_thumbprint": peer.certificate_thumbprint,
    }  # fmt: skip


def secret_of(peer: Peer, direction: str) -> str:
    return crypto.decrypt_cached(getattr(peer, f"{direction}_secret_encrypted"))


def inbound_secrets(peer: Peer) -> list[str]:
    """The current inbound secret and, within its grace period, the previous one."""
    found = [secret_of(peer, "inbound")] if peer.inbound_secret_encrypted else []
    if peer.previous_inbound_secret_encrypted and (
        peer.previous_inbound_expires_at and peer.previous_inbound_expires_at > timezone.now()
    ):
        found.append(crypto.decrypt_cached(peer.previous_inbound_secret_encrypted))
    return found


# --- where a call to it goes ------------------------------------------------------------------


def hook_url_for(team: Team) -> str:
    """The hook URL a team's peers deliver to here."""
    return f"{settings.KITE_PUBLIC_URL}/hooks/{team.id}/kite"


_KITE_HOOK = re.compile(r"/hooks/([A-Za-z0-9_-]{1,64})/kite/?")


def ping_url(peer: Peer, path: str = "/api/federation/ping") -> str:
    """The peer's `path`, on the host of its hook URL. A Kite hook URL names the team whose rows
    know us: `?team=` tells the peer, so it tries that team's secrets only, not those of every team
    peered with this instance (inbound.team_hint; the signature still decides)."""
    parts = urlsplit(peer.peer_hook_url)
    hook = _KITE_HOOK.fullmatch(parts.path)
    return urlunsplit((parts.scheme, parts.netloc, path, f"team={hook.group(1)}" if hook else "", ""))


def target_for(peer: Peer) -> client.Target:
    """A call to the peer's hook URL: signed with our outbound secret and the team's certificates."""
    return client.Target(
        url=peer.peer_hook_url,
        secret=secret_of(peer, "outbound"),
        sender_id=settings.KITE_INSTANCE_ID,
        tls_fingerprint=peer.tls_fingerprint,
        signer=certificates.signer_for(peer.team_id),
    )
