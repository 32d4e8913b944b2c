"""Identity certificates renewed by beat between two real instances peered by invitation
(federation.renewal): the renewal is announced over the signed channel, the old certificate is
retired only once the peer acknowledged the new one, a peer that is down keeps the old one in use
(and the API names it) until a later beat reaches it — events and pings flowing both ways.

A short-lived certificate stands in for one near its expiry: A issues a 1-day certificate and
deletes its first; later KITE_CERTIFICATE_RENEW_DAYS=100 makes a 90-day one due."""

import secrets

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import Database, RedisDatabase, wait_for
from tests.e2e.test_federation import FAST, Cluster, FedKite, invite, stored_ids

pytestmark = pytest.mark.e2e


class RenewalCluster(Cluster):
    def start(self, label: str, **env: str) -> FedKite:
        database, redis_db = Database(label), RedisDatabase()
        kite = FedKite(data_dir=self.tmp.mktemp(label) / "data", instance_id=f"renew-{label}-{secrets.token_hex(3)}",
                       database_url=database.url, redis_url=redis_db.url, extra_env={**FAST, **env})  # fmt: skip
        self.started.append((kite, database, redis_db))
        kite.start()
        assert kite.api("POST", "/api/sources", json={"name": "plain", "kind": "none"}).status_code == 201
        return kite


@pytest.fixture
def cluster(tmp_path_factory):
    started = RenewalCluster(tmp_path_factory)
    yield started
    started.close()


def restart(kite: FedKite, **env: str) -> None:
    kite.stop()
    kite.extra_env.update(env)
    kite.start()


def certificates(kite: FedKite) -> list[dict]:
    response = kite.api("GET", "/api/federation/certificates")
    assert response.status_code == 200, response.text
    return response.json()["results"]


def audit(kite: FedKite, action: str) -> list[dict]:
    return kite.api("GET", "/api/audit", params={"action": action}).json()["results"]


def expiry_series(kite: FedKite) -> dict[str, float]:
    response = requests.get(f"{kite.url}/metrics", verify=str(kite.cert), timeout=10)  # a loopback caller
    assert response.status_code == 200
    return {sample.labels["thumbprint"]: sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples
            if sample.name == "kite_certificate_expiry_timestamp_seconds"}  # fmt: skip


def flows_both_ways(a: FedKite, b: FedKite, a_side: int, b_side: int, label: str, already: list[str] = ()) -> None:
    """An event each way is stored on the other side (with `already`, queued earlier at A, too),
    and each side's ping passes every factor."""
    to_b, to_a = f"{label}_to_b_{secrets.token_hex(3)}", f"{label}_to_a_{secrets.token_hex(3)}"
    a.post_event("plain", to_b)
    b.post_event("plain", to_a)
    wait_for(lambda: {to_b, *already} <= set(stored_ids(b, source="kite")) and to_a in stored_ids(a, source="kite"),
             30, lambda: f"{label}: events both ways\n{a.state()}\n{b.state()}")  # fmt: skip
    for kite, side in ((a, a_side), (b, b_side)):
        pinged = kite.api("POST", f"/api/federation/peers/{side}/ping").json()
        assert pinged["ok"] and pinged["factors"] == {"tls": "ok", "certificate": "ok", "secret": "ok",
                                                      "clock": "ok"}, (label, kite.instance_id, pinged)  # fmt: skip
        assert kite.outbox(side, "dead") == []


def test_a_renewal_is_retired_only_once_acknowledged_and_waits_for_a_peer_that_is_down(cluster):
    a = cluster.start("a", KITE_CERTIFICATE_RENEW_DAYS="0")  # off while the stage is set
    b = cluster.start("b")
    a_side, b_side = invite(a, b)

    # A's certificate is about to expire: a 1-day one, which B pins, and the first one gone.
    (first,) = certificates(a)
    short = a.api("POST", "/api/federation/certificates", json={"subject": "kite a", "validity_days": 1})
    assert short.status_code == 201 and short.json()["announced"] == [{"peer": "b", "ok": True, "pinned": True}]
    short = short.json()
    assert a.api("DELETE", f"/api/federation/certificates/{first['id']}").status_code == 204
    assert b.peer(b_side)["certificate_thumbprint"] == short["thumbprint"]
    flows_both_ways(a, b, a_side, b_side, "before")

    # Renewal on, B up: the next beat renews, B acknowledges, the 1-day certificate is retired.
    restart(a, KITE_CERTIFICATE_RENEW_DAYS="14")
    wait_for(lambda: [c["id"] for c in certificates(a)] not in ([short["id"]], []) and len(certificates(a)) == 1, 30,
             lambda: f"the renewal to finish: {certificates(a)}\n{a.log_tail}")  # fmt: skip
    (renewed,) = certificates(a)
    assert renewed["subject"] == "kite a" and renewed["renewal"]["acknowledged_by"] == ["b"]
    assert b.peer(b_side)["certificate_thumbprint"] == renewed["thumbprint"]
    (expiring,) = audit(a, "Federation.CertificateExpiring")
    assert expiring["data"]["thumbprint"] == short["thumbprint"]
    (revoked,) = audit(a, "Federation.CertificateRevoked")[:1]
    assert revoked["data"]["thumbprint"] == short["thumbprint"] and revoked["actor"] == "system (certificate renewal)"
    flows_both_ways(a, b, a_side, b_side, "renewed")

    # B is down when the next renewal is due: the old certificate is kept and the API names B.
    b.stop()
    restart(a, KITE_CERTIFICATE_RENEW_DAYS="100")

    def pending() -> dict | None:
        rows = {row["id"]: row for row in certificates(a)}
        new = next((row for row in rows.values() if row["renewal"]["replaces"] == renewed["id"]), None)
        return new if new and new["renewal"]["waiting_for"] and "after" in new["renewal"]["waiting_for"][0]["reason"] \
            else None  # fmt: skip

    new = wait_for(pending, 30, lambda: f"a renewal waiting for b: {certificates(a)}\n{a.log_tail}")
    (waiting,) = new["renewal"]["waiting_for"]
    assert waiting["peer"] == "b" and waiting["peer_id"] == a_side and "not acknowledged after" in waiting["reason"]
    old = next(row for row in certificates(a) if row["id"] == renewed["id"])
    assert old["renewal"]["renewed_by"] == new["id"] and old["renewal"]["expiring"] is True
    assert set(expiry_series(a)) == {renewed["thumbprint"], new["thumbprint"]}
    queued = [f"while_down_{n}_{secrets.token_hex(2)}" for n in range(3)]
    for event_id in queued:
        a.post_event("plain", event_id)
    # Later beats retry and still keep it: B has not acknowledged.
    attempts = int(waiting["reason"].split("after ")[1].split(" ")[0])
    wait_for(lambda: int(pending()["renewal"]["waiting_for"][0]["reason"].split("after ")[1].split(" ")[0]) > attempts,
             30, "a later beat to retry B")  # fmt: skip
    assert renewed["id"] in [row["id"] for row in certificates(a)]

    # B is back: a later beat tells it, it acknowledges, and only then is the old one retired.
    b.start()
    wait_for(lambda: [row["id"] for row in certificates(a)] == [new["id"]], 40,
             lambda: f"the old certificate retired: {certificates(a)}\n{a.state()}\n{b.state()}")  # fmt: skip
    assert b.peer(b_side)["certificate_thumbprint"] == new["thumbprint"]
    (final,) = certificates(a)
    assert final["renewal"] == {"expiring": False, "replaces": None, "renewed_by": None, "acknowledged_by": ["b"],
                                "waiting_for": []}  # fmt: skip
    assert set(expiry_series(a)) == {new["thumbprint"]}
    flows_both_ways(a, b, a_side, b_side, "after", already=queued)
    revoked = [row["data"]["thumbprint"] for row in audit(a, "Federation.CertificateRevoked")]
    assert revoked[:2] == [renewed["thumbprint"], short["thumbprint"]]  # newest first
