"""A Flask app factory with the greenq extension (docs/frameworks.md).
SHOP_BROKER: the greenq broker URL; SHOP_LOG: a file each task appends to."""
import os

from flask import Flask, current_app, jsonify, request

from greenq.contrib.flask import GreenQ

greenq = GreenQ("flaskshop")


@greenq.task
def greet(word):
    # runs in the worker inside the Flask app's app_context()
    with open(current_app.config["SHOP_LOG"], "a") as log:
        log.write(f"{word} {current_app.name} {os.getpid()}\n")
    return f"{current_app.config['SHOP_GREETING']}, {word}"


def create_app():
    app = Flask("flaskshop")
    app.config.update(GREENQ_BROKER_URL=os.environ["SHOP_BROKER"], GREENQ_DEFAULT_QUEUE="web",
                      GREENQ_WORKER_QUEUES="web", SHOP_GREETING="hello",
                      SHOP_LOG=os.environ.get("SHOP_LOG", "shop.log"))
    greenq.init_app(app)

    @app.post("/greet/<word>")
    def send(word):
        return jsonify(id=greet.delay(word).id, pid=os.getpid())

    @app.get("/result/<task_id>")
    def result(task_id):
        return jsonify(result=greenq.app.AsyncResult(task_id).get(timeout=float(request.args.get("t", 10))))

    return app
