"""kite.once: what a form's redirect shows once (Post/Redirect/Get), with Django's test client."""

import time

from django.contrib.sessions.models import Session

from federation import peers, services
from federation.models import FederationToken, Peer
from kite import once
from tests.federation.test_api import PEER_URL, SECRET
from tests.screens import outsider, owner  # noqa: F401  (fixtures)

BASE = "/settings/federation"


def _generate_token(client, label: str = "t") -> tuple[str, str]:
    posted = client.post(BASE + "/tokens/", {"label": label})
    assert posted.status_code == 302
    return posted["Location"], FederationToken.objects.get(label=label).fingerprint


def _session_text() -> str:
    return " ".join(str(session.get_decoded()) for session in Session.objects.all())


def test_the_secret_is_read_once_by_the_page_redirected_to_and_never_travels_in_the_url(owner):  # noqa: F811
    location, _ = _generate_token(owner)
    assert location == BASE + "/tokens/"
    shown = owner.get(location)
    token = shown.context["shown_once"][0].value
    assert token.startswith("whsec_") and token not in location
    assert "Copy it now: it will not be shown again" in shown.content.decode()
    assert token not in owner.get(location).content.decode()  # the second read: gone
    assert FederationToken.objects.count() == 1


def test_the_session_keeps_it_encrypted_and_forgets_it_once_read(owner):  # noqa: F811
    location, _ = _generate_token(owner)
    kept = _session_text()
    assert once.KEY in kept and "whsec_" not in kept  # Fernet under KITE_ENCRYPTION_KEYS, not the plaintext
    owner.get(location)
    assert BASE + "/tokens/" not in str([s.get_decoded().get(once.KEY) for s in Session.objects.all()])


def test_another_page_or_a_refused_post_does_not_use_it_up(owner, team):  # noqa: F811
    location, _ = _generate_token(owner)
    owner.get(BASE + "/peers/")
    assert owner.post(BASE + "/tokens/", {"label": ""}).status_code == 400  # re-rendered where it was posted
    assert owner.get(location).context["shown_once"][0].value.startswith("whsec_")


def test_two_forms_in_two_tabs_each_show_their_own_secret(owner, team):  # noqa: F811
    peer = services.peer_create(team=team, name="b", peer_hook_url=PEER_URL, outbound_token=SECRET,
                                inbound_token=SECRET + "in").row  # fmt: skip
    location, _ = _generate_token(owner)
    rotated = owner.post(f"{BASE}/peers/{peer.pk}/rotate", {"inbound-direction": "inbound", "inbound-secret": ""})
    assert rotated.status_code == 302 and rotated["Location"] == f"{BASE}/peers/{peer.pk}/"
    secret = owner.get(rotated["Location"]).context["shown_once"][0].value
    peer.refresh_from_db()
    assert peers.secret_of(peer, "inbound") == secret
    assert owner.get(location).context["shown_once"][0].value.startswith("whsec_")


def test_what_is_not_read_within_the_ttl_is_not_shown(owner, monkeypatch):  # noqa: F811
    location, _ = _generate_token(owner)
    later = time.time() + once.TTL_SECONDS + 1
    monkeypatch.setattr(once.time, "time", lambda: later)
    page = owner.get(location)
    assert page.status_code == 200 and not page.context["shown_once"]


def test_another_user_never_sees_it(owner, outsider):  # noqa: F811
    location, _ = _generate_token(owner)
    assert not outsider.get(location).context["shown_once"]
    assert owner.get(location).context["shown_once"]
    assert Peer.objects.count() == 0
