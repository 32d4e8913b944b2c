from django.db import migrations, models


class Migration(migrations.Migration):
    """/api/audit pages a team's events newest first by id: index (team, -id), not (team, -at)."""

    dependencies = [
        ("federation", "0006_audit"),
    ]

    operations = [
        migrations.RemoveIndex(model_name="auditevent", name="audit_team_at"),
        migrations.AddIndex(
            model_name="auditevent",
            index=models.Index(fields=["team", "-id"], name="audit_team_newest"),
        ),
        migrations.AlterField(
            model_name="auditevent",
            name="action",
            field=models.CharField(
                help_text="e.g. Federation.PeerCalled, Federation.PeerCreated, Federation.AuthFailed", max_length=60
            ),
        ),
    ]
