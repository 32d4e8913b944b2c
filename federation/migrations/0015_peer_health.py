"""A peer's health (failures in a row, last error, last attempt, success, latency, heartbeat and
inbound request) moves to its own row, so a delivery's outcome no longer rewrites the peer's
configuration row. The values are copied over, then the columns dropped."""

import django.db.models.deletion
from django.db import migrations, models

HEALTH = ("consecutive_failures", "last_error", "last_attempt_at", "last_success_at", "last_latency_ms",
          "last_heartbeat_at", "last_inbound_at")  # fmt: skip


def copy_forward(apps, schema_editor):
    Peer, PeerHealth = apps.get_model("federation", "Peer"), apps.get_model("federation", "PeerHealth")
    rows = Peer.objects.order_by("pk").values_list("pk", *HEALTH)
    batch = []
    for pk, *values in rows.iterator(chunk_size=2000):
        batch.append(PeerHealth(peer_id=pk, **dict(zip(HEALTH, values, strict=True))))
        if len(batch) == 2000:
            PeerHealth.objects.bulk_create(batch)
            batch = []
    PeerHealth.objects.bulk_create(batch)


def copy_back(apps, schema_editor):
    Peer, PeerHealth = apps.get_model("federation", "Peer"), apps.get_model("federation", "PeerHealth")
    for health in PeerHealth.objects.iterator(chunk_size=2000):
        Peer.objects.filter(pk=health.peer_id).update(**{name: getattr(health, name) for name in HEALTH})


class Migration(migrations.Migration):
    dependencies = [("federation", "0014_scale_indexes")]

    operations = [
        migrations.CreateModel(
            name="PeerHealth",
            fields=[
                ("peer", models.OneToOneField(on_delete=django.db.models.deletion.CASCADE, primary_key=True,
                                              related_name="health", serialize=False, to="federation.peer")),
                ("consecutive_failures", models.PositiveIntegerField(default=0)),
                ("last_error", models.TextField(blank=True)),
                ("last_attempt_at", models.DateTimeField(blank=True, null=True)),
                ("last_success_at", models.DateTimeField(blank=True, null=True)),
                ("last_latency_ms", models.PositiveIntegerField(blank=True, null=True)),
                ("last_heartbeat_at", models.DateTimeField(blank=True, null=True)),
                ("last_inbound_at", models.DateTimeField(blank=True, null=True)),
            ],
            options={"verbose_name_plural": "peer health"},
        ),
        migrations.RunPython(copy_forward, copy_back),
        *[migrations.RemoveField(model_name="peer", name=name) for name in HEALTH],
    ]
