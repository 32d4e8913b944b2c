from django.apps import AppConfig


class KiteConfig(AppConfig):
    name = "kite"
    verbose_name = "Kite"
    default_auto_field = "django.db.models.BigAutoField"
