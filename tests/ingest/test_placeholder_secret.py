"""A secret copied from an example (`"secret": "whsec_..."`) is refused when a source is created:
every webhook to it would fail as bad_signature, far from the mistake."""

import pytest

from ingest.models import Source
from ingest.services import is_placeholder_secret
from tests.ingest.test_sources_api import assert_error

PLACEHOLDERS = ["whsec_...", "whsec_…", "whsec_", "<secret>", "whsec_<your secret>", "xxxxxxxx", "changeme",
                "${STRIPE_SECRET}", "sk_test_...", "...", "secret", "{{secret}}"]  # fmt: skip
REAL = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_provided", "s3cret", "whsec_" + "A" * 43]


@pytest.mark.parametrize("placeholder", PLACEHOLDERS)
@pytest.mark.parametrize("kind", ["stripe", "github", "standard"])
def test_a_placeholder_secret_is_refused_and_nothing_is_created(api, team, kind, placeholder):
    before = list(Source.objects.filter(team=team).values_list("name", flat=True))

    response = api.post("/api/sources", {"name": "stripe", "kind": kind, "secret": placeholder}, format="json")

    assert_error(response, 400, "placeholder_secret")
    assert "leave `secret` out" in response.json()["detail"]
    assert list(Source.objects.filter(team=team).values_list("name", flat=True)) == before


@pytest.mark.parametrize("secret", REAL)
def test_a_real_looking_secret_is_taken(api, team, secret):
    response = api.post("/api/sources", {"name": "stripe", "kind": "stripe", "secret": secret}, format="json")

    assert response.status_code == 201, response.content
    assert not is_placeholder_secret(secret)


def test_the_readme_example_of_a_placeholder_is_one(api):
    response = api.post("/api/sources", {"name": "stripe", "kind": "stripe", "secret": "whsec_..."}, format="json")

    assert_error(response, 400, "placeholder_secret")
