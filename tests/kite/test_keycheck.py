"""Keys that cannot decrypt what is stored: found at start from a sample of each encrypted column,
answered 503 `encryption_key_missing` (not a 500) by the API and the webhook endpoint, one error
(not a traceback) in a command."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.test import override_settings

from federation import services as federation_services
from federation.models import Peer
from ingest.models import Event, Source
from kite import crypto
from tests.factories import SourceFactory
from tests.federation.test_api import PEER_URL
from tests.signing import stripe_signature

OTHER_KEY = Fernet.generate_key().decode()
REPO = Path(__file__).resolve().parents[2]


def _under_other_key(plaintext: str) -> str:
    return Fernet(OTHER_KEY.encode()).encrypt(plaintext.encode()).decode()


def test_the_configured_keys_pass_the_check(team):
    SourceFactory(team=team, name="s1", kind="stripe")
    federation_services.peer_create(team=team, name="b", peer_hook_url=PEER_URL)

    assert crypto.undecryptable_columns() == []
    crypto.check_stored_secrets()  # no error


def test_keys_that_did_not_encrypt_the_stored_secrets_are_refused_naming_the_variable_file_and_columns(team, settings):
    SourceFactory(team=team, name="s1", kind="stripe")
    federation_services.peer_create(team=team, name="b", peer_hook_url=PEER_URL)
    settings.KITE_ENCRYPTION_KEYS = [OTHER_KEY]
    settings.KITE_ENCRYPTION_KEYS_FROM_ENV = False

    with pytest.raises(crypto.UndecryptableSecret) as refused:
        crypto.check_stored_secrets()

    message = str(refused.value)
    assert "KITE_ENCRYPTION_KEYS" in message and str(settings.KITE_ENCRYPTION_KEYS_FILE) in message
    assert "ingest.Source.secret_encrypted" in message and "federation.Peer.outbound_secret_encrypted" in message
    assert "\n" not in message and OTHER_KEY not in message


@pytest.mark.parametrize("which", ["oldest", "newest"])
def test_a_row_under_a_dropped_key_is_found_whether_it_is_the_oldest_or_the_newest(team, which):
    sources = [SourceFactory(team=team, name=f"s{n}", kind="github") for n in range(4)]
    odd = sources[0] if which == "oldest" else sources[-1]
    Source.objects.filter(pk=odd.pk).update(secret_encrypted=_under_other_key("whsec_x"))

    assert crypto.undecryptable_columns() == ["ingest.Source.secret_encrypted"]


def test_both_keys_during_a_rotation_pass_and_the_message_says_where_the_generated_key_is(team, settings):
    SourceFactory(team=team, name="s1", kind="stripe")
    old = settings.KITE_ENCRYPTION_KEYS[0]
    with override_settings(KITE_ENCRYPTION_KEYS=[OTHER_KEY, old], KITE_ENCRYPTION_KEYS_FROM_ENV=True):
        assert crypto.undecryptable_columns() == []
    with override_settings(KITE_ENCRYPTION_KEYS=[OTHER_KEY], KITE_ENCRYPTION_KEYS_FROM_ENV=True):
        with pytest.raises(crypto.UndecryptableSecret, match="add it after the first key"):
            crypto.check_stored_secrets()


def test_a_webhook_to_a_source_whose_secret_cannot_be_decrypted_is_503_and_stores_nothing(client, team):
    source = SourceFactory(team=team, name="stripe", kind="stripe")
    Source.objects.filter(pk=source.pk).update(secret_encrypted=_under_other_key("whsec_other"))
    body = b'{"id": "evt_1", "type": "payment_intent.succeeded", "data": {}}'

    answer = client.post(f"/hooks/{team.id}/stripe", body, content_type="application/json",
                         HTTP_STRIPE_SIGNATURE=stripe_signature("whsec_other", body))  # fmt: skip

    assert answer.status_code == 503, answer.content
    assert answer.json()["code"] == "encryption_key_missing"
    assert "KITE_ENCRYPTION_KEYS" in answer.json()["detail"] and "whsec" not in answer.json()["detail"]
    assert not Event.objects.filter(team=team).exists()


def test_pinging_a_peer_whose_secret_cannot_be_decrypted_is_503_not_server_error(api, team):
    peer = federation_services.peer_create(team=team, name="b", peer_hook_url=PEER_URL).row
    Peer.objects.filter(pk=peer.pk).update(outbound_secret_encrypted=_under_other_key("whsec_other"))
    before = Peer.objects.values().get(pk=peer.pk)

    answer = api.post(f"/api/federation/peers/{peer.pk}/ping")

    assert answer.status_code == 503, answer.content
    assert answer.json()["code"] == "encryption_key_missing"
    assert Peer.objects.values().get(pk=peer.pk) == before  # nothing recorded


def test_ping_peer_meets_an_undecryptable_secret_as_one_error_manage_py_prints_as_a_line(team):
    peer = federation_services.peer_create(team=team, name="b", peer_hook_url=PEER_URL).row
    Peer.objects.filter(pk=peer.pk).update(outbound_secret_encrypted=_under_other_key("whsec_other"))

    with pytest.raises(crypto.UndecryptableSecret) as refused:
        call_command("ping_peer", "b", "--team", team.name)

    assert "KITE_ENCRYPTION_KEYS" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "database_url",
    ["postgres://kite@127.0.0.1:1/unreachable", None],  # the server down; a database not migrated yet
)
def test_the_start_check_waits_for_a_database_it_cannot_read_instead_of_failing(tmp_path, database_url):
    """Every process survives a database outage at start: the check says nothing then (runkite's migrate,
    or the next start, meets the database)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("KITE_") and key != "DATABASE_URL"}
    env.update(DJANGO_SETTINGS_MODULE="kite.settings", KITE_DATA_DIR=str(tmp_path / "data"))
    if database_url:
        env["DATABASE_URL"] = database_url
    probe = "import django; django.setup(); from kite import crypto; crypto.check_stored_secrets(); print('started')"

    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip

    assert (result.returncode, result.stdout.strip()) == (0, "started"), result.stderr
