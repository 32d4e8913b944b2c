from django.db import models


class Order(models.Model):
    """What the application saves; django-webhook sends it on (topic orders.Order/create)."""

    data = models.JSONField()
    created = models.DateTimeField(auto_now_add=True)
