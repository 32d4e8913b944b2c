"""The Django admin is the ops console: federation rows are visible, secrets are not, and
nothing is written there (writes go through the services)."""

import pytest
from django.contrib.auth import get_user_model

from federation import certificates, grants, services
from tests.federation.test_api import PEER_URL, SECRET


@pytest.fixture
def staff_client(client, db):
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123456")
    client.force_login(user)
    return client


def test_federation_rows_are_listed_and_shown_without_their_secrets(staff_client, team):
    peer = services.peer_create(team=team, name="b", peer_hook_url=PEER_URL, outbound_token=SECRET).row
    certificate = certificates.issue(team=team, subject="ops view")
    grant, token = grants.create(peer=peer, resource_kind="fleet.agents")
    for model, pk in (("peer", peer.pk), ("identitycertificate", certificate.pk), ("grant", grant.pk)):
        listed = staff_client.get(f"/admin/federation/{model}/")
        assert listed.status_code == 200, model
        shown = staff_client.get(f"/admin/federation/{model}/{pk}/change/")
        assert shown.status_code == 200, model
        page = shown.content.decode()
        assert SECRET not in page and token not in page, model
        assert "encrypted" not in page and "PRIVATE KEY" not in page, model
        assert "Save" not in page  # read-only: no form to submit
    assert staff_client.get("/admin/federation/peer/add/").status_code == 403
    assert staff_client.post(f"/admin/federation/peer/{peer.pk}/delete/", {"post": "yes"}).status_code == 403
