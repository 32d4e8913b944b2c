"""Run by bench/comparator.py with the comparator's venv (DJANGO_SETTINGS_MODULE=comparator.settings).

    python produce.py setup URL SECRET      # one webhook on orders.Order/create to URL
    python produce.py orders N TYPE FILE    # save N orders (FILE: JSON template; "<id>" and "<type>" replaced)

Each saved order is what the application does; django-webhook's post_save handler then queues
one `fire_webhook` task per active webhook (Celery, Redis).
"""

import json
import sys

import django

django.setup()

from django_webhook.models import Webhook, WebhookSecret, WebhookTopic  # noqa: E402
from orders.models import Order  # noqa: E402


def setup(url: str, secret: str) -> None:
    Webhook.objects.all().delete()
    webhook = Webhook.objects.create(url=url, active=True)
    webhook.topics.add(WebhookTopic.objects.get(name="orders.Order/create"))
    WebhookSecret.objects.create(webhook=webhook, token=secret)
    print(webhook.pk)


def orders(count: int, event_type: str, template_path: str, prefix: str) -> None:
    template = open(template_path).read()
    for i in range(count):
        body = template.replace("<id>", f"{prefix}-{i:07d}").replace("<type>", event_type)
        Order.objects.create(data=json.loads(body))
    print(count)


if __name__ == "__main__":
    if sys.argv[1] == "setup":
        setup(sys.argv[2], sys.argv[3])
    else:
        orders(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
