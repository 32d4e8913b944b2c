from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("ingest", "0001_initial")]

    operations = [
        migrations.AlterField(
            model_name="source",
            name="kind",
            field=models.CharField(
                choices=[
                    ("stripe", "Stripe"),
                    ("github", "Github"),
                    ("standard", "Standard"),
                    ("cloudevents", "Cloudevents"),
                    ("none", "none (unverified)"),
                    ("kite", "kite (federation)"),
                ],
                max_length=20,
            ),
        ),
        migrations.AddField(
            model_name="source",
            name="token_sha256",
            field=models.CharField(
                blank=True,
                help_text="A cloudevents source with auth=token: SHA-256 of its bearer token",
                max_length=64,
            ),
        ),
    ]
