from cryptography import x509

from kite import tls


def _sans(cert_path):
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))


def test_generated_certificate_covers_loopback_and_kite_host(tmp_path):
    cert, key = tls.ensure_server_certificate(tmp_path, ["kite.internal"])
    assert {"localhost", "127.0.0.1", "::1", "kite.internal"} <= _sans(cert)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert tls.fingerprint_of_pem(cert.read_bytes()).startswith("sha256:")


def test_certificate_is_kept_while_it_covers_the_host_and_regenerated_when_kite_host_changes(tmp_path):
    cert, _ = tls.ensure_server_certificate(tmp_path, ["127.0.0.1"])
    first = cert.read_bytes()
    assert tls.ensure_server_certificate(tmp_path, ["127.0.0.1"])[0].read_bytes() == first
    cert, _ = tls.ensure_server_certificate(tmp_path, ["10.1.2.3"])
    assert cert.read_bytes() != first and "10.1.2.3" in _sans(cert)


def test_an_operators_own_certificate_is_never_replaced(tmp_path):
    cert, key = tls.ensure_server_certificate(tmp_path / "gen", ["127.0.0.1"])
    own = tmp_path / "own"
    own.mkdir()
    pem = cert.read_bytes()
    # Re-sign with another common name to stand for a certificate the operator installed.
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    private = serialization.load_pem_private_key(key.read_bytes(), None)
    original = x509.load_pem_x509_certificate(pem)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ops.example")])
    theirs = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(1).not_valid_before(original.not_valid_before_utc).not_valid_after(original.not_valid_after_utc)
        .add_extension(original.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, False)
        .sign(private, hashes.SHA256())
    )  # fmt: skip
    (own / "cert.pem").write_bytes(theirs.public_bytes(serialization.Encoding.PEM))
    (own / "key.pem").write_bytes(key.read_bytes())
    assert tls.ensure_server_certificate(own, ["10.9.9.9"])[0].read_bytes() == (own / "cert.pem").read_bytes()
