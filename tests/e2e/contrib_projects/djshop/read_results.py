"""After the worker ran: the results and the rows, as JSON (argv[1]: the ids)."""
import json
import sys

from djshop.greenq_app import app
from djshop.orders.models import Order

ids = json.loads(sys.argv[1])
print(json.dumps({
    "kept": app.AsyncResult(ids["kept"]).get(timeout=10),
    "outside": app.AsyncResult(ids["outside"]).get(timeout=10),
    "dropped_state": app.AsyncResult(ids["dropped"]).state,
    "rows": sorted([o.item, o.processed] for o in Order.objects.all()),
}))
