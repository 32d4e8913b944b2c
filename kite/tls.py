"""The self-signed server certificate `make run` serves HTTPS with (KITE_TLS=on)."""

import datetime
import hashlib
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    entries, seen = [], set()
    for host in hosts:
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def ensure_server_certificate(directory: Path, hosts: list[str]) -> tuple[Path, Path]:
    """Create tls/cert.pem and tls/key.pem (ECDSA P-256) unless both exist."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if cert_path.exists() and key_path.exists() and not _self_signed_without(cert_path, hosts):
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SELF_SIGNED_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # A day back: a box whose clock runs ahead when it first starts still writes a certificate
        # that browsers, `kite listen` and peers verifying by CA accept as already valid.
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(_san_entries(["localhost", "127.0.0.1", "::1", *hosts])), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_path.touch(mode=0o600)
    key_path.write_bytes(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


SELF_SIGNED_NAME = "Kite self-signed"


def _self_signed_without(cert_path: Path, hosts: list[str]) -> bool:
    """True when our own generated certificate does not cover a host we now serve
    (KITE_HOST changed). A certificate the operator put there is never replaced."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != SELF_SIGNED_NAME:
        return False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    covered = {str(value) for value in san.get_values_for_type(x509.IPAddress)}
    covered |= set(san.get_values_for_type(x509.DNSName))
    wanted = {str(ipaddress.ip_address(h)) if _is_ip(h) else h for h in hosts if h and h not in ("0.0.0.0", "::")}
    return not wanted <= covered


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def fingerprint_of_pem(pem: bytes) -> str:
    """`sha256:<64 hex>` of the certificate's DER: what peers pin (SECURITY.md, attacker 5)."""
    cert = x509.load_pem_x509_certificate(pem)
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
