import factory

from ingest.models import Source
from kite import crypto
from kite.models import Team


class TeamFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Team

    name = factory.Sequence(lambda n: f"team-{n}")


SOURCE_SECRET = "whsec_dGVzdC1zZWNyZXQtZm9yLWtpdGUtdGVzdHMtMzJieXRlcyE="


class SourceFactory(factory.django.DjangoModelFactory):
    """A source whose plaintext secret is SOURCE_SECRET (or `plain_secret=`)."""

    class Meta:
        model = Source

    class Params:
        plain_secret = SOURCE_SECRET

    team = factory.SubFactory(TeamFactory)
    name = factory.Sequence(lambda n: f"src-{n}")
    kind = Source.Kind.STRIPE
    secret_encrypted = factory.LazyAttribute(lambda o: crypto.encrypt(o.plain_secret) if o.kind != "none" else "")
    secret_fingerprint = factory.LazyAttribute(lambda o: crypto.fingerprint(o.plain_secret) if o.kind != "none" else "")
