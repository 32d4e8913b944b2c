"""Grants (README "Grants and permissions"): what a peer may read here, by bearer token `fg-<id>.<secret>`.

Only the SHA-256 of the secret is stored; the token is shown once. A grant names a
resource kind (the fleet issue reads `fleet.agents`), optionally one resource, the
permission scopes, the source networks it may be used from, and an expiry (30 days
by default). `check()` is what an endpoint serving peers calls.
"""

import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from federation import audit
from federation.errors import Code
from federation.models import Grant, Peer
from kite.errors import ApiError

DEFAULT_TTL_SECONDS = 30 * 24 * 3600
MAX_TTL_SECONDS = 365 * 24 * 3600
KINDS = {"fleet.agents"}
MAX_CIDRS = 32


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _cidrs(values) -> list[str]:
    if not isinstance(values, list) or len(values) > MAX_CIDRS:
        raise ApiError(f"source_cidrs must be a list of at most {MAX_CIDRS} networks.", Code.INVALID)
    try:
        return [str(ipaddress.ip_network(str(value).strip(), strict=False)) for value in values]
    except ValueError as exc:
        raise ApiError(f"source_cidrs: {exc}", Code.INVALID) from None


def create(*, peer: Peer, resource_kind: str, resource_id: str | None = None, permission_scopes: list | None = None,
           source_cidrs: list | None = None, ttl_seconds: int = DEFAULT_TTL_SECONDS,
           actor: str = "") -> tuple[Grant, str]:  # fmt: skip
    if resource_kind not in KINDS:
        raise ApiError(f"resource_kind must be one of {sorted(KINDS)}.", Code.INVALID)
    if not 60 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise ApiError(f"ttl_seconds must be between 60 and {MAX_TTL_SECONDS}.", Code.INVALID)
    scopes = permission_scopes if permission_scopes is not None else ["read"]
    if not isinstance(scopes, list) or not all(isinstance(s, str) and s for s in scopes):
        raise ApiError("permission_scopes must be a list of names such as 'read'.", Code.INVALID)
    cidrs = _cidrs(source_cidrs or [])
    secret = secrets.token_urlsafe(32)
    with transaction.atomic():
        grant = Grant.objects.create(
            team_id=peer.team_id, peer=peer, resource_kind=resource_kind, resource_id=resource_id or None,
            permission_scopes=scopes, source_cidrs=cidrs, secret_sha256=digest(secret),
            expires_at=timezone.now() + timedelta(seconds=ttl_seconds),
        )  # fmt: skip
        audit.record(audit.GRANT_CREATED, peer=peer, actor=actor, data=audit_data(grant))
    return grant, f"fg-{grant.pk}.{secret}"


def revoke(*, peer: Peer, grant_id: int, actor: str = "") -> bool:
    """Delete one of the peer's grants: its token stops working at once. False: no such grant."""
    with transaction.atomic():
        grant = peer.grants.filter(pk=grant_id).first()
        if grant is None:
            return False
        audit.record(audit.GRANT_REVOKED, peer=peer, actor=actor, data=audit_data(grant))
        grant.delete()
    return True


def audit_data(grant: Grant) -> dict:
    return {
        "id": grant.pk, "resource_kind": grant.resource_kind, "resource_id": grant.resource_id,
        "permission_scopes": grant.permission_scopes, "source_cidrs": grant.source_cidrs,
        "expires_at": grant.expires_at.isoformat(),
    }  # fmt: skip


@dataclass(frozen=True)
class Refused(Exception):
    code: str
    detail: str


def check(token: str, *, resource_kind: str, resource_id: str | None = None, scope: str = "read",
          client_ip: str = "", endpoint: str = "", audit_refusal: bool = True, caller: Peer | None = None) -> Grant:  # fmt: skip
    """The grant a presented token stands for, if it allows this use now from this address.

    A refusal raises Refused(code, detail) and, unless `audit_refusal=False` (the caller records
    it itself), is audited here as Federation.AuthFailed with the code as outcome (bad_grant,
    grant_revoked, grant_expired, grant_scope, grant_source) and counted: against the grant's
    peer and team when the token names a real grant, without a team when it names none.
    `endpoint`: the path the token was presented to, for that row. `caller`: the authenticated peer
    presenting it, if known (spares reading the grant's peer again when it is the same row)."""
    grant = None
    try:
        grant = _lookup(token)
        if caller is not None and caller.pk == grant.peer_id:
            grant.peer = caller
        _allows(grant, resource_kind, resource_id, scope, client_ip)
    except Refused as refused:
        if audit_refusal:
            audit.auth_failed(outcome=refused.code, endpoint=endpoint, detail=refused.detail, remote_addr=client_ip,
                              peer=grant.peer if grant is not None else None)  # fmt: skip
        raise
    return grant


def _lookup(token: str) -> Grant:
    prefix, _, secret = (token or "").partition(".")
    grant_id = prefix[3:]
    # ASCII digits that fit a bigint: str.isdigit() also admits "²", which int() refuses.
    well_formed = prefix.startswith("fg-") and grant_id.isascii() and grant_id.isdigit() and len(grant_id) <= 18
    if not well_formed or not secret:
        raise Refused("bad_grant", "Send a grant token 'fg-<id>.<secret>'.")
    # Plain SQL: every peer call that reads a grant makes this query (the ORM's compilation cost more).
    grant = next(iter(Grant.objects.raw(f"SELECT * FROM {Grant._meta.db_table} WHERE id = %s", [int(grant_id)])), None)
    if grant is None or not hmac.compare_digest(grant.secret_sha256, digest(secret)):
        raise Refused("bad_grant", "Unknown grant token.")
    return grant


def _allows(grant: Grant, resource_kind: str, resource_id: str | None, scope: str, client_ip: str) -> None:
    if grant.peer.status == Peer.Status.REVOKED:
        raise Refused("grant_revoked", "The peer of this grant is revoked.")
    if grant.expires_at <= timezone.now():
        raise Refused("grant_expired", f"This grant expired at {grant.expires_at.isoformat()}.")
    if grant.resource_kind != resource_kind or (grant.resource_id and grant.resource_id != resource_id):
        raise Refused("grant_scope", f"This grant is for {grant.resource_kind} {grant.resource_id or '(all)'}.")
    if scope not in grant.permission_scopes:
        raise Refused("grant_scope", f"This grant does not allow {scope!r}.")
    if grant.source_cidrs:
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            raise Refused("grant_source", "The caller's address is unknown.") from None
        if not any(address in ipaddress.ip_network(cidr) for cidr in grant.source_cidrs):
            raise Refused("grant_source", f"{client_ip} is outside the networks this grant may be used from.")
