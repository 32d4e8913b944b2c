"""README.md works word for word: its "First webhook in one minute" blocks run as written against a
live `make run`-style instance, and what it lists (audit actions, commands) matches the code."""

import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.harness import wait_for

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
APPS = ("kite", "ingest", "federation", "fleet")


def section(title: str, text: str = README) -> str:
    """The text under a `## ` or `### ` heading, up to the next heading of the same or a higher level
    (a `# comment` inside a code block is no heading)."""
    lines, inside, fenced = [], None, False
    for line in text.splitlines(keepends=True):
        heading = re.match(r"(#+) (.*)", line) if not fenced else None
        if inside is None:
            if heading and heading.group(2).strip() == title:
                inside = len(heading.group(1))
        elif heading and len(heading.group(1)) <= inside:
            break
        else:
            lines.append(line)
        if line.startswith("```"):
            fenced = not fenced
    assert inside is not None, f"README has no section {title!r}"
    return "".join(lines)


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


# --- what the README lists matches the code ---------------------------------------------------


def audit_actions_the_code_writes() -> set[str]:
    """Every `Federation.<Name>` string constant in the apps' code (migrations aside): whatever
    module a new action is named in, it is found here."""
    found = set()
    for app in APPS:
        for path in (REPO / app).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    if re.fullmatch(r"Federation\.[A-Z][A-Za-z]+", node.value):
                        found.add(node.value)
    return found


def test_the_action_scan_finds_the_known_actions():
    actions = audit_actions_the_code_writes()
    assert {"Federation.PeerCalled", "Federation.AuthFailed", "Federation.RemoteGrantStored"} <= actions


def test_every_audit_action_the_code_writes_is_in_the_readme_table():
    table = [line for line in section("Audit log and metrics").splitlines() if line.startswith("| `Federation.")]
    cells = " ".join(line.split(" | ")[0] for line in table)  # the action column
    named = set(re.findall(r"`(?:Federation\.)?([A-Z][A-Za-z]+)`", cells))

    missing = sorted(action for action in audit_actions_the_code_writes() if action.split(".", 1)[1] not in named)
    assert not missing, f"README's audit action table lacks {missing}"


@pytest.mark.django_db
def test_every_audit_action_the_code_writes_is_in_the_audit_screen_filter():
    from federation.forms import AuditFilterForm

    offered = {value for value, _ in AuditFilterForm().fields["action"].choices if value}

    assert not sorted(audit_actions_the_code_writes() - offered)


def test_kitefedchain_is_described_as_a_json_array_encoded_as_a_string():
    for path in [REPO / "README.md", *(REPO / "docs").rglob("*.md")]:
        text = " ".join(path.read_text().split())
        for mention in re.finditer(r"kitefedchain", text):
            nearby = text[mention.start() : mention.start() + 200]
            if "JSON array" in nearby:
                assert "JSON array encoded as a string" in nearby, f"{path.name}: {nearby}"


def test_commands_run_from_the_virtualenv():
    """`python manage.py` and `celery` fail on a fresh clone outside the venv: the README uses its own."""
    assert not re.findall(r"(?<![/\w.])python manage\.py", README)
    for block in shell_blocks(README):
        for line in block.splitlines():
            assert not re.match(r"\s*(celery|kite) ", line), line


def test_the_manage_py_commands_the_readme_names_exist():
    from django.core.management import get_commands

    named = set(re.findall(r"python manage\.py (?:--data-dir \S+ )?([a-z_]+)", README))
    assert named and not sorted(named - set(get_commands()))


# --- First webhook in one minute, run as written ----------------------------------------------


@pytest.fixture(scope="module")
def kite_at_home(tmp_path_factory):
    """An embedded instance (as `make run` starts it) and a directory laid out as the checkout the
    README's commands run in: `var` is the instance's data dir, `.venv` this virtualenv."""
    from tests.e2e.conftest import Instances

    started = Instances(tmp_path_factory)
    try:
        kite = started.start("readme", embedded=True)
        home = tmp_path_factory.mktemp("checkout")
        (home / "var").symlink_to(kite.data_dir)
        (home / ".venv").symlink_to(Path(sys.executable).parent.parent)
        yield kite, home
    finally:
        started.close()


def _shell_env() -> dict:
    return {key: value for key, value in os.environ.items() if not key.startswith("KITE_")}


def _as_written(block: str, kite) -> str:
    return block.replace("https://127.0.0.1:8443", kite.url)  # the one thing the test chooses: the port


@pytest.mark.e2e
def test_first_webhook_in_one_minute_word_for_word(kite_at_home):
    kite, home = kite_at_home
    create, listen, send = (_as_written(block, kite) for block in shell_blocks(section("First webhook in one minute")))
    created, listening = home / "source-created", home / "listening"
    # The second terminal: create the source, wait for the listener (third terminal), send.
    second = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c",
         f"{create}\ntouch {created}\nwhile [ ! -e {listening} ]; do sleep 0.1; done\n{send}"],
        cwd=home, env=_shell_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    third = None
    try:
        wait_for(lambda: created.exists() or second.poll() is not None, 60, "the source to be created")
        assert created.exists(), second.communicate()
        third = subprocess.Popen(["bash", "-eu", "-c", listen], cwd=home, env=_shell_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)  # fmt: skip
        said = third.stderr.readline()
        assert said.startswith(f"kite: listening on {kite.url} (source stripe)"), said
        listening.touch()
        out, err = second.communicate(timeout=60)
        assert second.returncode == 0, (out, err)
        assert '"duplicate": false' in out and '"id": "evt_test_1"' in out, out
        printed = json.loads(third.stdout.readline())
        assert (printed["id"], printed["type"]) == ("evt_test_1", "com.stripe.payment_intent.succeeded")
        assert printed["data"]["data"]["object"] == {"id": "pi_1", "amount": 4200}  # `data` is the provider's JSON
    finally:
        for process in (second, third):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=10)


@pytest.mark.e2e
def test_kite_listen_with_a_source_the_team_does_not_have_stops_with_one_line(kite_at_home):
    kite, home = kite_at_home
    started = time.monotonic()
    result = subprocess.run(
        [".venv/bin/kite", "listen", "--instance", kite.url, "--source", "no-such-source", "--ca-file",
         "var/tls/cert.pem"],
        cwd=home, env={**_shell_env(), "KITE_API_KEY": kite.admin_key}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert result.returncode == 2 and time.monotonic() - started < 30
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "HTTP 404" in lines[0] and "unknown_source" in lines[0], result.stderr
    assert "no-such-source" in lines[0] and result.stdout == ""


@pytest.mark.e2e
def test_the_placeholder_secret_of_an_example_is_refused_by_a_live_instance(kite_at_home):
    kite, _ = kite_at_home
    answer = kite.api("POST", "/api/sources", json={"name": "stripe-2", "kind": "stripe", "secret": "whsec_..."})

    assert answer.status_code == 400 and answer.json()["code"] == "placeholder_secret"
    assert "stripe-2" not in {source["name"] for source in kite.api("GET", "/api/sources").json()["results"]}
