from cryptography.fernet import Fernet
from django.core.management import call_command
from django.test import override_settings

from ingest import services
from ingest.models import Source
from kite import crypto


def test_reencryptsecrets_moves_secrets_to_the_new_first_key(team, settings):
    old_key = settings.KITE_ENCRYPTION_KEYS[0]
    created = services.source_create(team=team, name="gh", kind="github", secret="s3cret")
    token_before = Source.objects.get(pk=created.source.pk).secret_encrypted
    new_key = Fernet.generate_key().decode()

    with override_settings(KITE_ENCRYPTION_KEYS=[new_key, old_key]):
        call_command("reencryptsecrets", stdout=open("/dev/null", "w"))
        token_after = Source.objects.get(pk=created.source.pk).secret_encrypted

    assert token_after != token_before
    assert Fernet(new_key.encode()).decrypt(token_after.encode()) == b"s3cret"
    with override_settings(KITE_ENCRYPTION_KEYS=[new_key]):  # the old key is no longer needed
        assert crypto.decrypt(token_after) == "s3cret"
