from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("federation", "0011_plural_names"),
    ]

    operations = [
        migrations.AddField(
            model_name="peer",
            name="filters",
            field=models.JSONField(blank=True, default=list),
        ),
    ]
