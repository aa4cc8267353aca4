"""The in-process transport (``memory://``): for users' tests and eager
set-ups; every part lives in the one process, nothing survives it."""
from ..descriptor import Descriptor

TRANSPORT = Descriptor(
    name="memory",
    schemes=("memory",),
    broker="greenq.transports.memory.broker:MemoryBroker",
    results="greenq.transports.memory.results:MemoryBackend",
    control="greenq.transports.memory.control:MemoryTransport",
    leadership="greenq.transports.memory.leadership:MemoryLeadership",
    coordination="greenq.transports.memory.coordination:MemoryCoordination",
)
