"""The SQLite transport: greenq's embedded default (``sqlite:///path``), one
file shared by the processes of one machine; no server, no extra package."""
from ..descriptor import Descriptor

TRANSPORT = Descriptor(
    name="sqlite",
    schemes=("sqlite",),
    file_urls=True,
    broker="greenq.transports.sqlite.broker:SQLiteBroker",
    results="greenq.transports.sqlite.results:SQLiteBackend",
    control="greenq.transports.sqlite.control:SQLiteTransport",
    leadership="greenq.transports.sqlite.leadership:SQLiteLeadership",
    coordination="greenq.transports.sqlite.coordination:SQLiteCoordination",
    async_results="greenq.transports.sqlite.aio:SQLiteResults",
)
