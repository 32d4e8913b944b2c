"""Event deliveries authenticated with this process's copy of the sender's rows (federation.inbound
._inbound_peers): the copy saves a query per delivery and never decides anything the database
would decide otherwise. Each attack asserts the refusal and that nothing was stored."""

import json
import time

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from federation import inbound, services, signing
from federation.models import Peer
from ingest.models import Event
from tests.federation.test_routing_inbound import OTHER, SECRET, make_ce, signed_batch, signed_post

# Each request commits on its own, as in production: a row's version (xmin) is its writer's transaction.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def sender(team):
    return services.trusted_sender_create(team=team, name="instance-a", inbound_token=SECRET).row


def _deliver(client, team, event_id, secret=SECRET, sender="kite-a", **kwargs):
    return signed_post(client, team, make_ce(event_id), secret=secret, sender=sender, msg_id=f"msg_{event_id}", **kwargs)


def _warm(client, team, secret=SECRET):
    """Deliveries until source and sender are copies: the first learns the sender's instance ID (a
    new version of its row and of the team's routes), the second reads both again and keeps them,
    the third uses the copies. Its statements."""
    assert _deliver(client, team, "warm1", secret=secret).status_code == 202
    assert _deliver(client, team, "warm2", secret=secret).status_code == 202
    with CaptureQueriesContext(connection) as queries:
        assert _deliver(client, team, "warm3", secret=secret).status_code == 202
    return [q["sql"] for q in queries.captured_queries]


def _stored(team) -> set[str]:
    return set(Event.objects.filter(team=team).values_list("ce_id", flat=True))


def test_a_warm_delivery_reads_no_peer_row_and_is_stored_by_one_guarded_statement(client, team, sender):
    sql = _warm(client, team)
    assert len(sql) == 1, sql  # the INSERT, which checks the source, the routes and the sender's row
    assert "xmin" in sql[0] and "federation_peer" in sql[0] and sql[0].count("xmin") == 2
    assert (team.id, "kite-a") in inbound._inbound_peers
    assert _stored(team) == {"warm1", "warm2", "warm3"}


def test_a_sender_revoked_behind_the_cache_is_refused_at_once(client, team, sender):
    """A write the cache is not told about (no routes version, no signal): the row's version alone decides."""
    _warm(client, team)
    Peer.objects.filter(pk=sender.pk).update(status=Peer.Status.REVOKED)
    response = _deliver(client, team, "after-revoke")
    assert response.status_code == 401 and response.json()["code"] == "unknown_peer", response.json()
    assert _stored(team) == {"warm1", "warm2", "warm3"}
    assert (team.id, "kite-a") not in inbound._inbound_peers


def _revoked_at_the_next_check(sender, monkeypatch) -> None:
    """The sender is revoked (by another process) right after the next request's check passed."""
    accepted = inbound._accepted

    def revoked_meanwhile(matched, request, control):
        Peer.objects.filter(pk=sender.pk).update(status=Peer.Status.REVOKED)  # another process, this moment
        return accepted(matched, request, control)

    monkeypatch.setattr(inbound, "_accepted", revoked_meanwhile)


def test_a_sender_revoked_between_its_check_and_its_insert_stores_nothing(client, team, sender, monkeypatch):
    _warm(client, team)
    _revoked_at_the_next_check(sender, monkeypatch)
    response = _deliver(client, team, "raced")
    assert response.status_code == 401 and response.json()["code"] == "unknown_peer", response.json()
    assert _stored(team) == {"warm1", "warm2", "warm3"}


def test_a_secret_rotated_out_at_once_is_refused_and_the_new_one_accepted_without_a_refusal(client, team, sender):
    _warm(client, team)
    services.rotate_secret(peer=Peer.objects.get(pk=sender.pk), direction="inbound", secret=OTHER, grace=False)
    refused = _deliver(client, team, "old-secret")
    assert refused.status_code == 401 and refused.json()["code"] == "bad_secret", refused.json()
    assert _deliver(client, team, "new-secret", secret=OTHER).status_code == 202
    assert _deliver(client, team, "new-again", secret=OTHER).status_code == 202  # from the copy again
    assert _stored(team) == {"warm1", "warm2", "warm3", "new-secret", "new-again"}


def test_a_pinned_certificate_added_behind_the_cache_is_required_at_once(client, team, sender):
    """Any edit of the row is a new version: here a certificate pinned by a plain UPDATE."""
    _warm(client, team)
    Peer.objects.filter(pk=sender.pk).update(certificate_thumbprint="sha256:" + "ab" * 32)
    response = _deliver(client, team, "no-v1a")
    assert response.status_code == 401 and response.json()["code"] == "missing_certificate", response.json()
    assert _stored(team) == {"warm1", "warm2", "warm3"}


def test_forged_and_wrong_team_deliveries_are_refused_and_do_not_grow_the_cache(client, team, other_team, sender):
    """The other team trusts the same instance (with its own secret), and its copy is warm too: a
    delivery to one team's hook, replayed to the other's, is refused."""
    services.trusted_sender_create(team=other_team, name="instance-a", inbound_token=OTHER)
    _warm(client, team)
    _warm(client, other_team, secret=OTHER)
    before = dict(inbound._inbound_peers)
    for n in range(50):  # unknown senders
        assert _deliver(client, team, f"forged{n}", secret=OTHER, sender=f"mallory-{n}").status_code == 401
    assert _deliver(client, team, "bad-secret", secret=OTHER).status_code == 401  # the other team's secret
    body = json.dumps(make_ce("cross")).encode()
    headers = signing.sign_headers(secret=SECRET, msg_id="msg_cross", timestamp=int(time.time()), body=body,
                                   sender_id="kite-a", binding=signing.delivery_binding(team.id))  # fmt: skip
    wsgi = {"HTTP_" + name.upper().replace("-", "_"): value for name, value in headers.items()}
    replayed = client.post(f"/hooks/{other_team.id}/kite", body, content_type="application/cloudevents+json", **wsgi)
    assert replayed.status_code == 401 and replayed.json()["code"] == "bad_secret", replayed.json()
    assert set(inbound._inbound_peers) <= set(before)  # refusals add nothing (a refused copy is dropped)
    assert _stored(team) == {"warm1", "warm2", "warm3"} == _stored(other_team)
    assert Peer.objects.get(pk=sender.pk).status == Peer.Status.ACCEPTED


def test_a_sender_that_is_still_accepted_is_not_rewritten_once_a_second(client, team, sender):
    """A trusted sender stays `accepted`: its row is written once (its instance ID learned), not on
    every second of traffic, which would end the cache's copy every second."""
    _warm(client, team)
    version = Peer.objects.extra(select={"v": "xmin::text"}).values_list("v", flat=True).get(pk=sender.pk)
    from federation.models import PeerHealth

    PeerHealth.objects.filter(peer_id=sender.pk).update(last_inbound_at=None)  # as if a second had passed
    inbound._inbound_peers.clear()
    assert _deliver(client, team, "later").status_code == 202
    assert Peer.objects.extra(select={"v": "xmin::text"}).values_list("v", flat=True).get(pk=sender.pk) == version


# --- batches: stored by one guarded statement too -------------------------------------------------


def _batch(client, team, events, secret=SECRET, sender="kite-a"):
    return signed_batch(client, team, events, secret=secret, sender=sender)


def _results(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [item["result"] for item in response.json()]


def test_a_warm_batch_reads_no_peer_row_and_is_stored_by_one_guarded_statement(client, team, sender):
    _warm(client, team)
    with CaptureQueriesContext(connection) as queries:
        response = _batch(client, team, [make_ce("b1"), make_ce("b2"), {"specversion": "0.3", "id": "x"}, make_ce("warm1")])
    assert _results(response) == ["accepted", "accepted", "rejected", "duplicate"]
    sql = [q["sql"] for q in queries.captured_queries]
    assert len(sql) == 1, sql  # one INSERT for the batch, which checks the source, the routes and the sender's row
    assert "unnest" in sql[0] and "federation_peer" in sql[0] and sql[0].count("xmin") == 2
    assert _stored(team) == {"warm1", "warm2", "warm3", "b1", "b2"}
    again = _batch(client, team, [make_ce("b1"), make_ce("b3")])  # the batch retried after a lost answer
    assert _results(again) == ["duplicate", "accepted"]
    assert Event.objects.filter(team=team, ce_id="b1").count() == 1


def test_a_batch_from_a_sender_revoked_behind_the_cache_is_refused_and_stores_nothing(client, team, sender):
    _warm(client, team)
    Peer.objects.filter(pk=sender.pk).update(status=Peer.Status.REVOKED)
    response = _batch(client, team, [make_ce("r1"), make_ce("r2")])
    assert response.status_code == 401 and response.json()["code"] == "unknown_peer", response.json()
    assert _stored(team) == {"warm1", "warm2", "warm3"}
    assert (team.id, "kite-a") not in inbound._inbound_peers


def test_a_batch_from_a_sender_revoked_between_its_check_and_its_insert_stores_nothing(client, team, sender,
                                                                                       monkeypatch):  # fmt: skip
    _warm(client, team)
    _revoked_at_the_next_check(sender, monkeypatch)
    response = _batch(client, team, [make_ce("raced1"), make_ce("raced2")])
    assert response.status_code == 401 and response.json()["code"] == "unknown_peer", response.json()
    assert _stored(team) == {"warm1", "warm2", "warm3"}


def test_a_batch_with_one_event_twice_stores_it_once(client, team, sender):
    _warm(client, team)
    response = _batch(client, team, [make_ce("twice"), make_ce("twice"), make_ce("once")])
    assert _results(response) == ["accepted", "duplicate", "accepted"]
    assert Event.objects.filter(team=team, ce_id="twice").count() == 1
    assert _stored(team) == {"warm1", "warm2", "warm3", "twice", "once"}


def test_a_forged_batch_is_refused_and_does_not_grow_the_cache(client, team, other_team, sender):
    services.trusted_sender_create(team=other_team, name="instance-a", inbound_token=OTHER)
    _warm(client, team)
    before = dict(inbound._inbound_peers)
    assert _batch(client, team, [make_ce("f1")], secret=OTHER).status_code == 401  # the other team's secret
    assert _batch(client, team, [make_ce("f2")], sender="mallory").status_code == 401
    assert _batch(client, other_team, [make_ce("f3")]).status_code == 401  # this team's secret, the other's hook
    assert set(inbound._inbound_peers) <= set(before)
    assert _stored(team) == {"warm1", "warm2", "warm3"} and _stored(other_team) == set()


def test_a_batch_over_the_one_statement_size_is_stored_in_a_transaction_after_fresh_reads(client, team, sender):
    from ingest import services as ingest_services

    _warm(client, team)
    ids = [f"big{n}" for n in range(ingest_services.ALONE_BATCH_MAX + 1)]
    with CaptureQueriesContext(connection) as queries:
        response = _batch(client, team, [make_ce(event_id) for event_id in ids])
    assert _results(response) == ["accepted"] * len(ids)
    sql = [q["sql"] for q in queries.captured_queries]
    assert not any("unnest" in statement for statement in sql), sql  # not the one guarded statement
    assert any(statement.lstrip().startswith("SELECT") and "federation_peer" in statement for statement in sql)  # read afresh
    assert _stored(team) == {"warm1", "warm2", "warm3", *ids}
