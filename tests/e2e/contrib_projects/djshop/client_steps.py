"""The web side of tests/e2e/test_contrib_django_e2e.py: migrate, then send
tasks inside transactions, printing what the broker holds after each step
as one JSON object."""
import json
import sys

import django
from django.core.management import call_command
from django.db import transaction

from djshop.greenq_app import app
from djshop.orders.models import Order
from djshop.orders.tasks import process
from greenq.contrib.django import apply_async_on_commit, delay_on_commit


def ready():
    return sum(s.ready for s in app.broker.queue_stats(["shop"]))


call_command("migrate", verbosity=0)
seen = {"django": django.get_version()}
with transaction.atomic():
    order = Order.objects.create(item="teapot")
    kept = delay_on_commit(process, order.id)
    seen["inside_atomic"] = ready()
seen["after_commit"] = ready()
try:
    with transaction.atomic():
        gone = Order.objects.create(item="ghost")
        dropped = apply_async_on_commit(process, (gone.id,), queue="shop")
        raise RuntimeError("rolled back")
except RuntimeError:
    pass
seen["after_rollback"] = ready()
outside = delay_on_commit(process, Order.objects.create(item="kettle").id)   # no transaction: at once
seen["outside_atomic"] = ready()
seen["ids"] = {"kept": kept.id, "dropped": dropped.id, "outside": outside.id}
print(json.dumps(seen))
sys.stdout.flush()
