"""manage.py createapikey and bootstrap."""

import stat
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import override_settings
from rest_framework.test import APIClient

from kite.crypto import sha256_hex
from kite.models import ApiKey, Membership, Team


def run(command: str, *args) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(command, *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def me(raw_key: str):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    return client.get("/api/me")


# --- createapikey ---------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["name", "id"])
def test_createapikey_prints_a_working_key_for_the_team_by_name_or_id(team, other_team, ref):
    out, err = run("createapikey", "--team", getattr(team, ref), "--label", "deploy bot")

    raw = out.strip()
    assert me(raw).json()["team"]["id"] == team.id
    assert "shown once" in err and raw not in err  # stdout carries only the key, for scripts
    stored = ApiKey.objects.get(digest=sha256_hex(raw))
    assert (stored.team_id, stored.label) == (team.id, "deploy bot")


def test_createapikey_makes_a_new_key_each_time(team):
    first, _ = run("createapikey", "--team", team.name)
    second, _ = run("createapikey", "--team", team.name)

    assert first != second
    assert me(first.strip()).status_code == me(second.strip()).status_code == 200


def test_createapikey_for_an_unknown_team_fails_and_creates_nothing(team):
    with pytest.raises(CommandError, match="no-such-team"):
        run("createapikey", "--team", "no-such-team")

    assert ApiKey.objects.count() == 0


def test_createapikey_requires_a_team(db):
    with pytest.raises(CommandError):
        run("createapikey")


# --- bootstrap ------------------------------------------------------------------------


def test_bootstrap_creates_team_admin_and_a_private_key_file(db, tmp_path):
    with override_settings(KITE_DATA_DIR=tmp_path):
        out, _ = run("bootstrap")

    key_file = tmp_path / "admin-api-key"
    raw = key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert raw in out
    assert me(raw).json()["team"]["name"] == "default"
    default = Team.objects.get(name="default")
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser
    assert Membership.objects.get(user=admin).team_id == default.id
    password = next(line.split(":", 1)[1].strip() for line in out.splitlines() if "password:" in line)
    assert admin.check_password(password)
    assert default.sources.filter(name="kite").exists()


def test_bootstrap_twice_creates_nothing_new_and_prints_no_secret(db, tmp_path):
    with override_settings(KITE_DATA_DIR=tmp_path):
        first_out, _ = run("bootstrap")
        raw = (tmp_path / "admin-api-key").read_text().strip()
        counts = (Team.objects.count(), get_user_model().objects.count(), ApiKey.objects.count())

        second_out, _ = run("bootstrap")

    assert (Team.objects.count(), get_user_model().objects.count(), ApiKey.objects.count()) == counts
    assert (tmp_path / "admin-api-key").read_text().strip() == raw
    assert raw not in second_out and "password" not in second_out
    assert "Already bootstrapped" in second_out
    assert me(raw).status_code == 200


def test_bootstrap_keeps_an_existing_superuser_and_still_issues_the_key(db, tmp_path):
    get_user_model().objects.create_superuser("ops", "", "ops-password")

    with override_settings(KITE_DATA_DIR=tmp_path):
        out, _ = run("bootstrap")

    assert not get_user_model().objects.filter(username="admin").exists()
    assert "password" not in out
    assert me((tmp_path / "admin-api-key").read_text().strip()).status_code == 200


def test_bootstrap_reuses_an_existing_default_team(db, tmp_path):
    from kite import services

    existing = services.team_create(name="default")

    with override_settings(KITE_DATA_DIR=tmp_path):
        run("bootstrap")

    assert Team.objects.get(name="default").id == existing.id
    assert me((tmp_path / "admin-api-key").read_text().strip()).json()["team"]["id"] == existing.id


def test_bootstrap_replaces_a_key_file_left_over_from_another_database(db, tmp_path):
    (tmp_path / "admin-api-key").write_text("kite_ak_from_a_database_that_is_gone\n")
    with override_settings(KITE_DATA_DIR=tmp_path):
        out, _ = run("bootstrap")
    raw = (tmp_path / "admin-api-key").read_text().strip()
    assert raw != "kite_ak_from_a_database_that_is_gone" and raw in out
    assert me(raw).status_code == 200


def test_api_key_use_is_recorded_at_most_once_a_minute(team, api_key):
    assert ApiKey.objects.get(team=team).last_used_at is None
    me(api_key)
    first = ApiKey.objects.get(team=team).last_used_at
    me(api_key)
    assert first is not None and ApiKey.objects.get(team=team).last_used_at == first


def test_createteam_prints_the_id_of_a_team_with_its_kite_source(db):
    out, _ = run("createteam", "payments")
    team = Team.objects.get(name="payments")
    assert out.strip() == team.id and team.sources.filter(name="kite").exists()
    with pytest.raises(CommandError, match="already exists"):
        run("createteam", "payments")
    assert Team.objects.filter(name="payments").count() == 1
