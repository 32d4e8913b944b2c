"""Identity certificates (README "Identity certificates (the second factor)"): X.509 with an Ed25519 key, per team.

The private key is encrypted at rest (MultiFernet) and never leaves the instance:
it signs the `v1a` factor of outbound requests and is presented as the TLS client
certificate. Several may be valid at once; all of them sign, the first in signing order is
presented in TLS, so rotating is: issue a new one, give peers its PEM, delete the old one.
federation.renewal does that by itself for peers with a signed channel.
"""

import dataclasses
import functools
import hashlib
import os
import ssl
import tempfile
import threading
from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from django.db import connection, transaction
from django.utils import timezone

from federation import audit, client
from federation.errors import Code
from federation.models import IdentityCertificate
from kite import crypto, fastsql
from kite.errors import ApiError

DEFAULT_VALIDITY_DAYS = 90
MAX_VALIDITY_DAYS = 825
MAX_SUBJECT_BYTES = 64
MAX_PEM_BYTES = 16_384


def thumbprint_of(certificate: x509.Certificate) -> str:
    """`sha256:<64 hex>` of the DER (SECURITY.md "The signed message": `kite-key`)."""
    return "sha256:" + hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def issue(*, team, subject: str, validity_days: int = DEFAULT_VALIDITY_DAYS, actor: str = "",
          replaces: IdentityCertificate | None = None) -> IdentityCertificate:  # fmt: skip
    """`replaces`: an automatic renewal (federation.renewal) of that certificate."""
    subject = (subject or "").strip()
    # The subject is the certificate's common name: X.509 allows 64 bytes of UTF-8 (RFC 5280 ub-common-name).
    if not subject or len(subject.encode()) > MAX_SUBJECT_BYTES:
        raise ApiError(f"subject must be 1-{MAX_SUBJECT_BYTES} bytes (UTF-8).", Code.INVALID)
    if not 1 <= validity_days <= MAX_VALIDITY_DAYS:
        raise ApiError(f"validity_days must be between 1 and {MAX_VALIDITY_DAYS}.", Code.INVALID)
    key = ed25519.Ed25519PrivateKey.generate()
    now = timezone.now()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(key, None)  # Ed25519 signs without a separate hash
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    with transaction.atomic():
        row = IdentityCertificate.objects.create(
            team=team,
            subject=subject,
            thumbprint=thumbprint_of(certificate),
            pem=pem,
            private_key_encrypted=crypto.encrypt(private_pem),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            replaces=replaces,
        )
        audit.record(audit.CERTIFICATE_ISSUED, team=team, actor=actor, data=audit_data(row))
    return row


def revoke(*, certificate: IdentityCertificate, actor: str = "") -> None:
    """Delete it: it signs no more (peers that pinned it refuse what a newer one signs until they
    are given the newer PEM)."""
    certificate_id = certificate.pk
    with transaction.atomic():
        audit.record(audit.CERTIFICATE_REVOKED, team_id=certificate.team_id, actor=actor, data=audit_data(certificate))
        certificate.delete()
    forget(certificate_id)


def audit_data(row: IdentityCertificate) -> dict:
    data = {"id": row.pk, "subject": row.subject, "thumbprint": row.thumbprint, "not_after": row.not_after.isoformat()}
    if row.replaces_id:
        data["replaces"] = row.replaces_id
    return data


def parse_peer_pem(pem: str) -> tuple[str, str]:
    """A pasted certificate of the other side → (normalised PEM, thumbprint). Ed25519 only."""
    pem = (pem or "").strip()
    if len(pem) > MAX_PEM_BYTES:
        raise ApiError("certificate_pem is too long.", Code.INVALID)
    try:
        certificate = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise ApiError("certificate_pem is not a PEM X.509 certificate.", Code.INVALID) from None
    if not isinstance(certificate.public_key(), ed25519.Ed25519PublicKey):
        raise ApiError("certificate_pem must hold an Ed25519 key (a Kite identity certificate).", Code.INVALID)
    return certificate.public_bytes(serialization.Encoding.PEM).decode(), thumbprint_of(certificate)


def verifier_for(pem: str):
    """`verify(signature, message) -> bool` with the public key of a pinned certificate."""
    public_key = x509.load_pem_x509_certificate(pem.encode()).public_key()

    def verify(signature: bytes, message: bytes) -> bool:
        try:
            public_key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    return verify


@dataclass(frozen=True)
class Signer:
    """What an outbound call needs of the team's newest valid certificate."""

    thumbprint: str
    sign: object  # (message: bytes) -> bytes
    pinned_context: ssl.SSLContext  # presents it as the TLS client certificate; the peer is pinned
    # () -> ssl.SSLContext presenting it, the peer verified by the system CAs: built on first use,
    # since loading the CA bundle costs ~35 ms per process and pinned peers never need it.
    ca_context_of: object = None
    # (thumbprint, sign) of the team's other valid certificates, newest first: they sign too,
    # so a peer still pinned to an older one keeps verifying until it is deleted here.
    also_signed_by: tuple = ()
    certificates: tuple = ()  # the ids of the valid certificates it was built from (signing order)

    @property
    def ca_context(self) -> ssl.SSLContext:
        return self.ca_context_of()


_signers: dict[int, Signer] = {}
_signers_lock = threading.Lock()


_CERTIFICATE_FIELDS = tuple(IdentityCertificate._meta.concrete_fields)


@functools.cache
def valid_condition(alias: str) -> str:
    """SQL: the certificate row `alias` is one of team %(team)s's valid ones at %(now)s (`valid`)."""
    qn, meta = connection.ops.quote_name, IdentityCertificate._meta
    column = {name: f"{alias}.{qn(meta.get_field(name).column)}" for name in ("team", "not_before", "not_after")}
    return f"{column['team']} = %(team)s AND {column['not_before']} <= %(now)s AND {column['not_after']} > %(now)s"


def _valid_sql() -> str:
    qn, meta = connection.ops.quote_name, IdentityCertificate._meta
    column = {name: f"c.{qn(meta.get_field(name).column)}" for name in ("created_at", "id")}
    return (
        f"SELECT {', '.join(f'c.{qn(field.column)}' for field in _CERTIFICATE_FIELDS)} FROM {qn(meta.db_table)} c"
        f" WHERE {valid_condition('c')} ORDER BY {column['created_at']} DESC, {column['id']} DESC"
    )


def valid(team_id: str) -> list[IdentityCertificate]:
    """The team's valid certificates in signing order: newest first, except that a renewal still
    under way (it `replaces` a certificate that is still valid) comes after the one it replaces.
    The first is presented as the TLS client certificate and given in handshakes: until every
    peer acknowledged the renewal, that is the one they all know."""
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    with connection.cursor() as cursor:  # every drain of the outbox reads them: plain SQL (the ORM's query cost ~0.5 ms)
        cursor.execute(_valid_sql(), {"team": team_id, "now": now})
        rows = [fastsql.load(IdentityCertificate, _CERTIFICATE_FIELDS, row) for row in cursor.fetchall()]
    present = {row.pk for row in rows}
    return [row for row in rows if row.replaces_id not in present] + [row for row in rows if row.replaces_id in present]


def current(team_id: str) -> IdentityCertificate | None:
    rows = valid(team_id)
    return rows[0] if rows else None


def signer_for(team_id: str) -> Signer | None:
    """The first valid certificate (signing order) signs and is presented in TLS; the others sign too."""
    rows = valid(team_id)
    if not rows:
        return None
    key = tuple(row.pk for row in rows)
    with _signers_lock:
        signer = _signers.get(key)
    if signer is None:
        newest = _signer(rows[0])
        others = tuple((row.thumbprint, _private_key(row).sign) for row in rows[1:])
        signer = dataclasses.replace(newest, also_signed_by=others, certificates=key)
        with _signers_lock:
            _signers[key] = signer
    return signer


def _private_key(row: IdentityCertificate):
    return serialization.load_pem_private_key(crypto.decrypt(row.private_key_encrypted).encode(), password=None)


def _signer(row: IdentityCertificate) -> Signer:
    private_pem = crypto.decrypt(row.private_key_encrypted)
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    chain = row.pem + private_pem
    # Pinned peers are verified by their fingerprint (client._PeerAdapter), never by a CA: a bare
    # client context, without the ~30 ms of loading the system's CA store.
    pinned = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pinned.minimum_version = ssl.TLSVersion.TLSv1_2
    pinned.check_hostname, pinned.verify_mode = False, ssl.CERT_NONE
    _load_chain(pinned, chain)

    @functools.cache
    def ca_context() -> ssl.SSLContext:
        cas = client.SYSTEM_CAS  # read when first needed: a test points it at its own CA
        context = ssl.create_default_context(cafile=cas if isinstance(cas, str) else None)
        _load_chain(context, chain)
        return context

    return Signer(thumbprint=row.thumbprint, sign=key.sign, pinned_context=pinned, ca_context_of=ca_context)


def _load_chain(context: ssl.SSLContext, chain: str) -> None:
    """load_cert_chain reads files: a private directory, removed as soon as it is loaded, so the
    key is never left unencrypted on disk."""
    with tempfile.TemporaryDirectory(prefix="kite-identity-") as directory:
        path = os.path.join(directory, "identity.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(chain)
        context.load_cert_chain(path)


def forget(certificate_id: int) -> None:
    with _signers_lock:
        for key in [key for key in _signers if certificate_id in key]:
            del _signers[key]
