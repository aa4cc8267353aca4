from django.db import connection

from djshop.greenq_app import app
from djshop.orders.models import Order


@app.task
def process(order_id):
    order = Order.objects.get(id=order_id)   # committed by the client before the task was sent
    order.processed = True
    order.save()
    return order.item


@app.task
def backend_pid():
    """The database session this task ran in (PostgreSQL)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]
