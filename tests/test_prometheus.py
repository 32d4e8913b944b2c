"""deploy/prometheus and deploy/grafana, checked by Prometheus' own tools (Debian's prometheus
package: `make test` installs it, see the Makefile's prometheus-deps):

- `promtool check rules` and `promtool test rules` on the alerting rules, and the rule tests shown
  to fail when an alert or its `for:` is taken away;
- the Grafana dashboard: valid JSON, every expression valid PromQL naming only series Kite exports;
- live: two federated instances with real traffic, their /metrics linted by `promtool check
  metrics`, scraped by a real Prometheus over HTTPS that evaluates alerts.yml: the alerts the
  traffic calls for go pending, naming the peer, team or source, and every dashboard panel's
  query answers."""

import importlib
import json
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import REPO, Database, RedisDatabase, free_port, wait_for
from tests.e2e.test_federation import FAST, Cluster, FedKite, federate
from tests.signing import stripe_signature

PROMTOOL = Path("/usr/bin/promtool")
PROMETHEUS = Path("/usr/bin/prometheus")
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = sorted((REPO / "deploy" / "prometheus").glob("*test*.yml"))
DASHBOARD = REPO / "deploy" / "grafana" / "kite.json"
SCRAPE_SECONDS = 2


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    assert PROMTOOL.exists(), "promtool is missing: `make test` installs Debian's prometheus package (prometheus-deps)"
    return subprocess.run([str(PROMTOOL), *args], input=stdin, capture_output=True, text=True, timeout=120)


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def rule_tests() -> list[dict]:
    return [case for path in RULE_TESTS for case in yaml.safe_load(path.read_text())["tests"]]


# --- the alerting rules --------------------------------------------------------


def test_promtool_accepts_the_rules():
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout


def test_the_rule_unit_tests_pass():
    assert [path.name for path in RULE_TESTS] == ["alerts_long_test.yml", "alerts_test.yml"]
    tested = promtool("test", "rules", *map(str, RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_rule_is_tested_firing_and_not_firing_and_says_what_it_is_about():
    fired, quiet = set(), set()
    for case in rule_tests():
        for check in case["alert_rule_test"]:
            if not check["exp_alerts"]:
                quiet.add(check["alertname"])
            for alert in check["exp_alerts"]:
                fired.add((check["alertname"], alert["exp_labels"]["severity"]))
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert (rule["alert"], rule["labels"]["severity"]) in fired, f"{rule['alert']} is never made to fire"
        assert rule["alert"] in quiet, f"{rule['alert']} is never shown not to fire"
        assert "for" in rule and {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]


def _mutant_fails(tmp_path: Path, alertname: str, mutate) -> subprocess.CompletedProcess:
    """The rule tests that mention `alertname`, run against alerts.yml with that alert's rules mutated."""
    document = yaml.safe_load(RULES.read_text())
    for group in document["groups"]:
        group["rules"] = [kept for rule in group["rules"] for kept in mutate(rule)]
    mutant = tmp_path / alertname
    mutant.mkdir(parents=True)
    (mutant / "alerts.yml").write_text(yaml.safe_dump(document))
    written = []
    for path in RULE_TESTS:
        tests = yaml.safe_load(path.read_text())
        tests["tests"] = [case for case in tests["tests"]
                          if any(check["alertname"] == alertname for check in case["alert_rule_test"])]  # fmt: skip
        if tests["tests"]:
            written.append(mutant / path.name)
            written[-1].write_text(yaml.safe_dump(tests))
    assert written, alertname
    return promtool("test", "rules", *map(str, written))


@pytest.mark.parametrize("alertname", sorted({rule["alert"] for rule in rules()}))
def test_the_rule_tests_fail_without_the_alert_or_its_wait(tmp_path, alertname):
    without = _mutant_fails(tmp_path / "gone", alertname, lambda rule: [] if rule["alert"] == alertname else [rule])
    assert without.returncode != 0 and f"alertname: {alertname}," in without.stderr, without.stdout + without.stderr

    def at_once(rule):
        return [{**rule, "for": "0s"} if rule["alert"] == alertname else rule]

    hasty = _mutant_fails(tmp_path / "hasty", alertname, at_once)
    assert hasty.returncode != 0 and f"alertname: {alertname}," in hasty.stderr, hasty.stdout + hasty.stderr


# --- what Kite exports, and the dashboard ----------------------------------------

SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "gauge": ("",)}


def exported_series() -> set[str]:
    """Every kite_* series name Kite can serve: the counters and histograms its modules declare,
    and the gauges its scrape-time collectors describe (whether or not they have samples yet)."""
    from kite import metrics

    importlib.import_module("federation.metrics")  # declares its counters

    families = list(REGISTRY.collect()) + [family for collector in metrics.SCRAPE_COLLECTORS
                                           for family in collector.describe()]  # fmt: skip
    return {family.name + suffix for family in families if family.name.startswith("kite_")
            for suffix in SUFFIXES[family.type]}  # fmt: skip


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def as_promql(expr: str, rate_interval: str = "5m") -> str:
    """A panel's query as Prometheus gets it from Grafana (all instances selected)."""
    return expr.replace("$__rate_interval", rate_interval).replace("$instance", ".*")


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_SELECTORS = re.compile(r"\{[^}]*\}|\[[^\]]*\]")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}


def series_named(expr: str) -> set[str]:
    """The series names a PromQL expression reads: identifiers that are not functions, keywords,
    label names in groupings or matchers, strings, durations or numbers."""
    bare = _SELECTORS.sub(" ", _GROUPING.sub(" ", _STRINGS.sub('""', expr)))
    return {name for name in re.findall(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", bare)
            if name not in _KEYWORDS and not re.fullmatch(r"\d+[smhdwy]|e\d*|Inf|NaN", name)}  # fmt: skip


def test_series_named_finds_the_series_and_nothing_else():
    assert series_named('sum by (peer, le) (rate(kite_a_total{x="y z", le=~"1|2"}[5m])) / on (peer) kite_b > 0.5') == {
        "kite_a_total", "kite_b"}  # fmt: skip
    assert series_named("histogram_quantile(0.95, sum by (le) (rate(up[1m]))) - time() < 7 * 86400") == {"up"}


def test_the_dashboard_is_valid_json_with_a_datasource_variable_and_every_panel_uses_it():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert series_named(variables["instance"]["query"]["query"].replace("label_values(", "(")) <= {"instance"}
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    cells = [(panel["title"], x, y) for panel in dashboard["panels"] for grid in [panel["gridPos"]]
             for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])]
    assert all(0 <= x < 24 for _, x, _ in cells) and len({cell[1:] for cell in cells}) == len(cells)  # no overlap
    titles = " ".join(panel["title"].lower() for panel in panels)
    for subject in ("webhooks received", "refused", "ingest latency", "delivered", "delivery latency", "outbox depth",
                    "oldest pending", "reachability", "paused", "certificates"):  # fmt: skip
        assert subject in titles, subject


def test_every_dashboard_query_is_valid_promql_naming_only_series_kite_exports(tmp_path):
    exported = exported_series()
    assert {"kite_outbox_oldest_pending_age_seconds", "kite_peer_reachability", "kite_federation_calls_total",
            "kite_certificate_expiry_timestamp_seconds", "kite_ingest_seconds_bucket"} <= exported  # fmt: skip
    queries = panel_queries()
    for title, expr in queries:
        assert series_named(expr) and series_named(expr) <= exported, (title, series_named(expr) - exported)
    for rule in rules():  # the alerts too, but for Prometheus' own `up`
        assert series_named(rule["expr"]) <= exported | {"up"}, rule["alert"]
    recorded = {"groups": [{"name": "dashboard", "rules": [{"record": f"panel:{n}", "expr": as_promql(expr)}
                                                           for n, (_, expr) in enumerate(queries)]}]}  # fmt: skip
    (tmp_path / "panels.yml").write_text(yaml.safe_dump(recorded))
    checked = promtool("check", "rules", str(tmp_path / "panels.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_oldest_pending_age_and_reachability_are_read_from_the_database_at_scrape_time(client, team, other_team):
    from datetime import timedelta

    from django.utils import timezone

    from federation import services
    from federation.models import OutboxEntry, Peer, PeerHealth
    from tests.federation.test_api import PEER_URL
    from tests.federation.test_delivery import make_event
    from tests.federation.test_metrics import scrape

    def peer(team, name):
        return services.peer_create(team=team, name=name, peer_hook_url=PEER_URL, scopes=["*"]).row

    b, idle, stuck, gone = peer(team, "b"), peer(team, "idle"), peer(team, "stuck"), peer(team, "gone")
    twin = peer(other_team, "b")  # another team's peer of the same name: one label set, the oldest of both
    for n in range(4):
        make_event(team, f"e{n}")
    make_event(other_team, "t1")
    now = timezone.now()

    def entries(peer, status, seconds_ago, event_ids):
        OutboxEntry.objects.filter(peer=peer, event__ce_id__in=event_ids).update(
            status=status, created_at=now - timedelta(seconds=seconds_ago))

    entries(b, "pending", 600, ["e0"])
    entries(b, "delivered", 5000, ["e1"])  # neither delivered nor dead entries are owed
    entries(b, "dead", 5000, ["e2"])
    entries(twin, "pending", 1200, ["t1"])
    entries(stuck, "in_flight", 3000, ["e3"])
    OutboxEntry.objects.filter(peer__in=[idle, gone]).delete()
    OutboxEntry.objects.filter(peer=stuck).exclude(event__ce_id="e3").delete()
    Peer.objects.filter(pk=gone.pk).update(status=Peer.Status.REVOKED)
    PeerHealth.record(b, last_attempt_at=now, last_success_at=now, last_latency_ms=20)
    PeerHealth.record(stuck, last_attempt_at=now, last_success_at=now - timedelta(minutes=10))
    scraped = scrape(client)

    def age(name):
        return scraped.get(("kite_outbox_oldest_pending_age_seconds", (("peer", name),)))

    assert 1200 <= age("b") < 1260 and 3000 <= age("stuck") < 3060
    assert age("idle") == 0 and age("gone") is None

    def states(name, team_id):
        found = {dict(labels)["state"]: value for (metric, labels), value in scraped.items()
                 if metric == "kite_peer_reachability" and {("peer", name), ("team", team_id)} <= set(labels)}
        assert sorted(found) == ["reachable", "slow", "stale", "unknown", "unreachable"] and sum(found.values()) == 1
        return next(state for state, value in found.items() if value == 1)

    assert (states("b", team.id), states("b", other_team.id)) == ("reachable", "unknown")
    assert (states("stuck", team.id), states("idle", team.id)) == ("unreachable", "unknown")
    reachability = [dict(labels) for metric, labels in scraped if metric == "kite_peer_reachability"]
    assert len(reachability) == 4 * 5 and not [labels for labels in reachability if labels["peer"] == "gone"]


# --- live: real instances, real traffic, a real Prometheus ------------------------


def _start(cluster: Cluster, label: str, **env: str) -> FedKite:
    """As Cluster.start, with variables of the test's own."""
    database, redis_db = Database(label), RedisDatabase()
    kite = FedKite(data_dir=cluster.tmp.mktemp(label) / "data", instance_id=f"prom-{label}-{secrets.token_hex(3)}",
                   database_url=database.url, redis_url=redis_db.url, extra_env={**FAST, **env})  # fmt: skip
    cluster.started.append((kite, database, redis_db))
    kite.start()
    kite.create_source("plain", "none")
    return kite


def metrics_text(kite: FedKite) -> str:
    response = requests.get(f"{kite.url}/metrics", verify=str(kite.cert), timeout=10)  # loopback: no token needed
    assert response.status_code == 200, response.text
    return response.text


def samples(text: str) -> dict[tuple, float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}  # fmt: skip


class Prometheus:
    """/usr/bin/prometheus scraping Kite instances over HTTPS and evaluating alerts.yml."""

    def __init__(self, workdir: Path, targets: list[FedKite]):
        self.port = free_port()
        ca = workdir / "kite-cas.pem"
        ca.write_text("".join(kite.cert.read_text() for kite in targets))
        config = {
            "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "scrape_timeout": f"{SCRAPE_SECONDS}s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "kite", "scheme": "https", "tls_config": {"ca_file": str(ca)},
                                "static_configs": [{"targets": [f"127.0.0.1:{kite.port}" for kite in targets]}]}],
        }  # fmt: skip
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        assert PROMETHEUS.exists(), "prometheus is missing: `make test` installs Debian's package (prometheus-deps)"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [str(PROMETHEUS), f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def api(self, path: str, **params) -> dict:
        assert self.process.poll() is None, self.log.read_text()[-3000:]
        answer = requests.get(f"http://127.0.0.1:{self.port}/api/v1/{path}", params=params, timeout=10).json()
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def ready(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]


@pytest.fixture
def cluster(tmp_path_factory):
    started = Cluster(tmp_path_factory)
    yield started
    started.close()


@pytest.fixture
def prometheus(tmp_path):
    started: list[Prometheus] = []
    yield lambda targets: started.append(Prometheus(tmp_path, targets)) or started[-1]
    for server in started:
        server.stop()


def post_plain(kite: FedKite, event_type: str) -> None:
    kite.post_event("plain", f"evt_{secrets.token_hex(4)}", event_type=event_type)


def post_stripe(kite: FedKite, team_id: str, secret: str) -> requests.Response:
    body = json.dumps({"id": f"evt_{secrets.token_hex(4)}", "type": "charge.succeeded", "created": int(time.time())})
    headers = {"Stripe-Signature": stripe_signature(secret, body.encode()), "Content-Type": "application/json"}
    return requests.post(f"{kite.url}/hooks/{team_id}/stripe", data=body, headers=headers, verify=str(kite.cert),
                         timeout=10)  # fmt: skip


def forge_delivery(kite: FedKite, team_id: str) -> requests.Response:
    """A POST to the team's kite hook that no peer signed."""
    return requests.post(f"{kite.url}/hooks/{team_id}/kite", json={"specversion": "1.0", "id": secrets.token_hex(4)},
                         verify=str(kite.cert), timeout=10)  # fmt: skip


def alerts_named(server: Prometheus, alertname: str, kite: FedKite) -> list[dict]:
    """The labels of each alert of that name about `kite`, with its summary as the label `summary`."""
    return [{**alert["labels"], "summary": alert["annotations"]["summary"]} for alert in server.alerts()
            if alert["labels"]["alertname"] == alertname and alert["labels"]["instance"] == f"127.0.0.1:{kite.port}"]


@pytest.mark.e2e
def test_live_metrics_pass_promtool_and_prometheus_raises_the_alerts_the_traffic_calls_for(cluster, prometheus):
    # A sends to B: a good peer, one whose hook is wrong (404: dead letters), one with a secret B does
    # not know (401: paused auth_failed). Renewal off on A: its 3-day certificate is left to expire.
    a = _start(cluster, "a", KITE_CERTIFICATE_RENEW_DAYS="0")
    b = _start(cluster, "b")
    team_a, team_b = a.team_id(), b.team_id()
    good = federate(a, b, "b", scopes=["com.good.*"])
    dead = federate(a, b, "b-dead", scopes=["com.dead.*"],
                    peer_hook_url=b.identity()["hook_url"].replace(team_b, "tm_nobody"))  # fmt: skip
    wrong = a.add_peer(b, "b-wrong", outbound_token="fedtok_" + "x" * 40, scopes=["com.wrong.*"])
    stripe = a.create_source("stripe", "stripe")
    certificate = a.api("POST", "/api/federation/certificates", json={"subject": "CN=kite-a", "validity_days": 3})
    assert certificate.status_code == 201, certificate.text

    server = prometheus([a, b])
    wait_for(server.ready, 30, lambda: f"Prometheus to be ready; log:\n{server.log.read_text()[-3000:]}")
    wait_for(lambda: len(server.query('up{job="kite"} == 1')) == 2, 30,
             lambda: f"Prometheus to scrape both instances: {server.api('targets')['activeTargets']}")

    for event_type in ("com.good.x", "com.good.y", "com.dead.x", "com.wrong.x"):
        post_plain(a, event_type)
    assert post_stripe(a, team_a, stripe["secret"]).status_code == 202
    assert post_stripe(a, team_a, "whsec_forged").status_code == 401
    assert forge_delivery(b, team_b).status_code in (400, 401)
    # A counter's first sample is no increase: the burst comes once Prometheus holds one sample of each.
    wait_for(lambda: server.query('kite_events_ingested_total{outcome="bad_signature"}')
             and server.query('kite_federation_calls_total{direction="inbound", outcome!="ok"}'), 30,
             "Prometheus to have scraped the first refusals")  # fmt: skip
    for _ in range(40):
        assert post_stripe(a, team_a, "whsec_forged").status_code == 401
        assert forge_delivery(b, team_b).status_code in (400, 401)
    wait_for(lambda: a.outbox(dead["id"], "dead") and a.peer(wrong["id"])["paused"] == "auth_failed"
             and not a.outbox(good["id"], "pending"), 30, a.state)  # fmt: skip

    # /metrics of both, after that traffic: promtool lints them clean, and the new series say what happened.
    for kite in (a, b):
        text = metrics_text(kite)
        linted = promtool("check", "metrics", stdin=text)
        assert linted.returncode == 0 and not (linted.stdout + linted.stderr).strip(), linted.stdout + linted.stderr
    scraped = samples(metrics_text(a))
    assert {name for name, _ in scraped if name.startswith("kite_")} <= exported_series()

    def at_a(name: str, **labels) -> float | None:
        return scraped.get((name, tuple(sorted(labels.items()))))

    assert at_a("kite_outbox_entries", peer="b-dead", status="dead") == 1
    assert at_a("kite_outbox_oldest_pending_age_seconds", peer="b") == 0
    assert at_a("kite_outbox_oldest_pending_age_seconds", peer="b-wrong") > 0  # its event waits while paused
    assert at_a("kite_peer_paused", peer="b-wrong", team=team_a, reason="auth_failed") == 1
    assert at_a("kite_peer_reachability", peer="b", team=team_a, state="reachable") == 1
    assert at_a("kite_peer_reachability", peer="b", team=team_a, state="unreachable") == 0

    # Prometheus evaluates alerts.yml over what it scraped: each alert the traffic calls for is
    # pending (its `for:` running), naming the peer, team or source.
    expected = [
        ("KiteDeadLetters", a, {"peer": "b-dead", "status": "dead"}),
        ("KitePeerAuthFailed", a, {"peer": "b-wrong", "team": team_a}),
        ("KiteCertificateExpiring", a, {"team": team_a, "severity": "warning"}),
        ("KiteIngestRefusalsSpiking", a, {"source": "stripe"}),
        ("KiteInboundAuthFailures", b, {"peer": "unknown"}),
    ]

    def missing():
        return [(name, labels) for name, kite, labels in expected
                if not any(labels.items() <= alert.items() for alert in alerts_named(server, name, kite))]  # fmt: skip

    def named_in_summary(alert: dict) -> bool:
        return all(alert[label] in alert["summary"] for label in ("peer", "team", "source") if label in alert)

    wait_for(lambda: not missing(), 60, lambda: f"alerts {missing()}; Prometheus has {server.alerts()}")
    for quiet in ("KiteDown", "KiteOutboxStalled", "KiteDeliveryLatencyHigh"):
        assert not [alert for alert in server.alerts() if alert["labels"]["alertname"] == quiet], quiet
    assert not alerts_named(server, "KitePeerAuthFailed", a)[0].keys() - {
        "alertname", "severity", "job", "instance", "peer", "team", "reason", "summary"}  # fmt: skip
    for name, kite, _ in expected:
        raised = alerts_named(server, name, kite)
        assert all(named_in_summary(alert) for alert in raised), raised

    # The dashboard's instance variable, asked as Grafana asks it, finds both instances.
    variable = {each["name"]: each for each in json.loads(DASHBOARD.read_text())["templating"]["list"]}["instance"]
    selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"]).groups()
    found = server.api(f"label/{label}/values", **{"match[]": selector})
    assert sorted(found) == sorted(f"127.0.0.1:{kite.port}" for kite in (a, b))

    # Every dashboard query answers with data, but for what this traffic may not cause (an event
    # dropped by a filter, a refusal left out of the audit trail).
    maybe_empty = {"kite_federation_dropped_total", "kite_audit_refusals_suppressed_total"}
    empty = [(title, expr) for title, expr in panel_queries()
             if not series_named(expr) <= maybe_empty and not server.query(as_promql(expr, rate_interval="1m"))]
    assert not empty, empty
