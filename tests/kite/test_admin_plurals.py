"""The admin names every model in proper English: "Deliveries", not "Deliverys"."""

import re

from django.apps import apps

# Django's default plural is the singular + "s": right for these endings, wrong for a consonant + y,
# s, x, z, ch and sh.
NAIVE = re.compile(r"([^aeiou]ys|ss|xs|zs|chs|shs)$")


def _plurals() -> dict[str, str]:
    return {model._meta.label: str(model._meta.verbose_name_plural) for model in apps.get_models()}


def test_no_model_has_a_naive_plural():
    wrong = {label: plural for label, plural in _plurals().items() if NAIVE.search(plural)}
    assert not wrong, f"set verbose_name_plural in their Meta: {wrong}"


def test_the_admin_lists_deliveries_and_outbox_entries():
    plurals = _plurals()
    assert plurals["federation.Delivery"] == "deliveries"
    assert plurals["federation.OutboxEntry"] == "outbox entries"
    assert plurals["federation.InboundReceipt"] == "inbound receipts"


def test_the_admin_index_reads_deliveries_and_outbox_entries(admin_client):
    page = admin_client.get("/admin/").content.decode()
    assert "Deliveries" in page and "Outbox entries" in page
    assert "Deliverys" not in page and "entrys" not in page
    assert not re.search(r"[^aeiou]ys<", page), "a naive plural in the admin's model list"
