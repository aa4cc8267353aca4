"""What a worker names: greenq-worker -A shop.worker"""
from shop import create_app, greenq

create_app()
app = greenq.app
