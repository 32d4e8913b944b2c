"""Encryption-key rotation as README's "Rotating secrets" says, on a live embedded instance (`make run`'s
`manage.py runkite`): both keys, `reencryptsecrets`, then the new key alone. The trap on the way —
a plain start while `$KITE_DATA_DIR/encryption-keys` still holds the old key — stops runkite, a
Celery worker and a command with one line each, naming the variable and the file; nothing starts.
Once the new key is where Kite reads it, webhooks and pings work as before."""

import subprocess
import sys

import pytest
from cryptography.fernet import Fernet

from tests.e2e.harness import REPO

pytestmark = pytest.mark.e2e


def manage(kite, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", *argv], cwd=REPO, env=kite.env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def refused_in_one_line(result: subprocess.CompletedProcess, key_file) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    ours = [line for line in result.stderr.splitlines() if line.startswith("kite: ")]
    assert len(ours) == 1, result.stderr
    assert "KITE_ENCRYPTION_KEYS" in ours[0] and str(key_file) in ours[0], ours[0]
    return ours[0]


def test_rotating_the_encryption_key_as_the_readme_says(instances):
    kite = instances.start("rotate", embedded=True)
    team = kite.team_id()
    source = kite.create_source("stripe", "stripe")
    token = "whsec_" + Fernet.generate_key().decode()[:40]
    peer = kite.api("POST", "/api/federation/peers", json={
        "name": "self", "peer_hook_url": f"{kite.url}/hooks/{team}/kite", "outbound_token": token,
        "inbound_token": token, "scopes": [], "tls_fingerprint": kite.api("GET", "/api/federation/identity")
        .json()["tls_fingerprint"]})  # fmt: skip
    assert peer.status_code == 201, peer.text
    peer_id = peer.json()["id"]
    assert kite.post_stripe(team, source, "evt_before").status_code == 202
    assert kite.api("POST", f"/api/federation/peers/{peer_id}/ping").json()["ok"]

    # OLD is the key Kite generated on first start (the data dir's file); NEW is made as the README shows.
    key_file = kite.data_dir / "encryption-keys"
    old, new = key_file.read_text().strip(), Fernet.generate_key().decode()
    assert kite.stop() == 0
    kite.extra_env["KITE_ENCRYPTION_KEYS"] = f"{new},{old}"
    kite.start()
    rotated = manage(kite, "reencryptsecrets")
    assert rotated.returncode == 0 and "Old keys can now be removed." in rotated.stdout, rotated.stderr
    assert kite.post_stripe(team, source, "evt_during").status_code == 202
    assert new not in (kite.data_dir / "instance.env").read_text()  # runkite's record never holds the keys
    assert kite.stop() == 0

    # The trap: a plain start, while the file still holds OLD, which decrypts nothing now.
    del kite.extra_env["KITE_ENCRYPTION_KEYS"]
    line = refused_in_one_line(manage(kite, "runkite"), key_file)
    assert "KITE_ENCRYPTION_KEYS is unset" in line and "ingest.Source.secret_encrypted" in line
    refused_in_one_line(manage(kite, "ping_peer", "self"), key_file)
    worker = subprocess.run([sys.executable, "-m", "celery", "-A", "kite", "worker", "--loglevel", "WARNING"],
                            cwd=REPO, env=kite.env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    refused_in_one_line(worker, key_file)

    # As the README ends it: the new key alone, in the file Kite reads when KITE_ENCRYPTION_KEYS is unset.
    key_file.write_text(new + "\n")
    kite.start()
    assert kite.post_stripe(team, source, "evt_after").status_code == 202
    assert kite.post_stripe(team, source, "evt_before").status_code == 200  # stored once, before the rotation
    pinged = kite.api("POST", f"/api/federation/peers/{peer_id}/ping").json()
    assert pinged["ok"], pinged
    by_command = manage(kite, "ping_peer", "self")
    assert by_command.returncode == 0 and by_command.stdout.startswith("self: ok"), by_command.stderr
    as_instance = manage(kite, "--data-dir", str(kite.data_dir), "peers")  # the recorded variables find it
    assert as_instance.returncode == 0 and "self" in as_instance.stdout, as_instance.stderr
