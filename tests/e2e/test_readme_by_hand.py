"""README.md, "Two instances side by side" and "Federating two instances by hand", word for word.

The two `make run` lines of the first section give each instance's environment; the test starts
`manage.py runkite` (what `make run` runs, on the same embedded defaults) with exactly that
environment, only its ports and the directory the data lives in chosen here. Every other shell
block of both sections then runs, as written, in one bash, in that directory, with the README's
ports replaced by the chosen ones. Then the events the README posts must have crossed both ways,
exactly once each, and B's trusted sender must have become its peer. A wrong command, field or
variable in the README fails this test.
"""

import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field

import pytest
import requests

from tests.e2e.harness import REPO, Kite, free_port, wait_for

pytestmark = pytest.mark.e2e

README = REPO / "README.md"
SIDE_BY_SIDE = "Two instances side by side"
BY_HAND = "Federating two instances by hand"
README_PORTS = {"A": "8443", "B": "8444"}


def section(text: str, heading: str) -> str:
    match = re.search(rf"^### {re.escape(heading)}\n(.*?)(?=^##[# ] |\Z)", text, re.S | re.M)
    assert match, f"README.md has no section '### {heading}'"
    return match.group(1)


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M)


def make_run_environments(block: str) -> list[dict]:
    """The variables set before each `make run` of the block, in order."""
    runs = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[-2:] == ["make", "run"]:
            assert all("=" in word for word in words[:-2]), line
            runs.append(dict(word.split("=", 1) for word in words[:-2]))
    return runs


def with_ports(text: str, ports: dict) -> str:
    for name, readme_port in README_PORTS.items():
        text = text.replace(readme_port, str(ports[name]))
    return text


@dataclass
class MakeRun(Kite):
    """`make run` as the README says it: only the variables of its line (no DATABASE_URL, no
    REDIS_URL: SQLite and the embedded broker), from the directory the user works in."""

    readme_env: dict = field(default_factory=dict)

    def env(self) -> dict:
        inherited = {key: value for key, value in os.environ.items()
                     if not key.startswith(("KITE_", "CURL_")) and key not in ("DATABASE_URL", "REDIS_URL",
                                                                              "SECRET_KEY", "PROMETHEUS_MULTIPROC_DIR")}  # fmt: skip
        return {**inherited, **self.readme_env, "PYTHONUNBUFFERED": "1"}

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"runkite exited with {self.process.returncode}; log:\n{self.log_tail}")
        if not self.cert.exists():
            return False
        try:
            answer = requests.get(f"{self.url}/healthz", verify=str(self.cert), timeout=2)
        except requests.RequestException:
            return False
        if answer.status_code == 200:
            self.instance_id = answer.json()["instance_id"]  # generated into its data dir, as make run does
        return answer.status_code == 200


def _start(workdir, name: str, readme_env: dict, ports: dict) -> MakeRun:
    """One instance from its make run line; a path there is relative to the checkout (here: `workdir`)."""
    env = {key: with_ports(value, ports) for key, value in readme_env.items()}
    data_dir = (workdir / env.get("KITE_DATA_DIR", "var")).resolve()  # make run's default: ./var
    env["KITE_DATA_DIR"] = str(data_dir)
    env.setdefault("KITE_PORT", str(ports["A"]))  # make run's default port, 8443, is A's in the README
    assert env["KITE_PORT"] == str(ports[name]), f"{name}'s make run line serves another port than {name}'s URL"
    data_dir.mkdir(parents=True, exist_ok=True)
    return MakeRun(data_dir=data_dir, instance_id=f"readme-{name.lower()}", port=ports[name], readme_env=env).start()


def _events(kite: MakeRun, source: str) -> list[dict]:
    answer = kite.api("GET", "/api/events", params={"source": source, "limit": 100})
    assert answer.status_code == 200, answer.text
    return answer.json()["results"]


def test_the_readme_federates_two_make_run_instances_by_hand_both_ways(tmp_path):
    text = README.read_text()
    side, by_hand = section(text, SIDE_BY_SIDE), section(text, BY_HAND)
    starts = [block for block in sh_blocks(side) if make_run_environments(block)]
    assert len(starts) == 1, "the side-by-side section starts both instances in one block"
    runs = make_run_environments(starts[0])
    assert len(runs) == 2, runs
    ports = {"A": free_port(), "B": free_port()}
    script = "\n".join(with_ports(block, ports) for block in sh_blocks(side) + sh_blocks(by_hand)
                       if block not in starts)  # fmt: skip
    assert "$A" in script and "$KEY_B" in script and "PATCH" in script
    started = []
    try:
        for name, readme_env in zip(("A", "B"), runs):
            started.append(_start(tmp_path, name, readme_env, ports))
        a, b = started
        shell_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8"}
        ran = subprocess.run(["bash", "-c", "set -eo pipefail\n" + script], cwd=tmp_path, env=shell_env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert ran.returncode == 0, f"the README's commands failed ({ran.returncode}):\n{ran.stdout}\n{ran.stderr}"
        assert '"code"' not in ran.stdout, f"a README command was refused:\n{ran.stdout}"

        def crossed():
            return (any(e["id"] == "hello-from-a" for e in _events(b, "kite"))
                    and any(e["id"] == "hello-from-b" for e in _events(a, "kite")))  # fmt: skip

        wait_for(crossed, 30, lambda: f"both events to cross; the README's output:\n{ran.stdout}")
        for kite in (a, b):  # nothing left to deliver, so "once" is final
            wait_for(lambda kite=kite: all(sum(peer["outbox"].get(s, 0) for s in ("pending", "in_flight")) == 0
                                           for peer in kite.api("GET", "/api/federation/peers").json()["results"]),
                     20, "every outbox delivered")  # fmt: skip
        at_b, at_a = _events(b, "kite"), _events(a, "kite")
        assert [(e["id"], e["kitefedorigin"]) for e in at_b] == [("hello-from-a", a.instance_id)]
        assert [(e["id"], e["kitefedorigin"]) for e in at_a] == [("hello-from-b", b.instance_id)]
        assert [e["id"] for e in _events(a, "demo")] == ["hello-from-a"]  # not sent back to where it came from
        assert [e["id"] for e in _events(b, "demo")] == ["hello-from-b"]

        # B's trusted sender became its peer: one row for A, a peer now, audited.
        assert b.api("GET", "/api/federation/trusted-senders").json()["results"] == []
        (peer_a,) = b.api("GET", "/api/federation/peers").json()["results"]
        assert peer_a["name"] == "instance-a" and peer_a["role"] == "peer"
        assert peer_a["remote_instance_id"] == a.instance_id
        promoted = b.api("GET", "/api/audit", params={"action": "Federation.TrustedSenderPromoted"}).json()["results"]
        assert [event["peer_id"] for event in promoted] == [peer_a["id"]]
        (peer_b,) = a.api("GET", "/api/federation/peers").json()["results"]
        assert peer_b["inbound_fingerprint"] == peer_a["outbound_fingerprint"]
        assert peer_b["outbound_fingerprint"] == peer_a["inbound_fingerprint"]
    finally:
        for kite in reversed(started):  # how runkite stops is tests/e2e/test_instances.py's subject, not this one's
            kite.kill()
