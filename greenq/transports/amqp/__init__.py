"""The RabbitMQ transport: ``amqp://``, ``pyamqp://`` (Celery's spelling) and
``amqps://`` (TLS) brokers, and the ``rpc://`` result backend that replies
over the same broker (the default result backend of an AMQP broker).
Needs ``greenq[amqp]`` (py-amqp)."""
from ..descriptor import Descriptor
from .settings import SETTINGS

_HERE = "greenq.transports.amqp."

TRANSPORT = Descriptor(
    name="amqp",
    schemes=("amqp", "pyamqp", "amqps"),
    extra="amqp",
    libraries=("amqp",),
    ini_section="amqp",
    settings=SETTINGS,
    default_ports={"amqp": 5672, "pyamqp": 5672, "amqps": 5671},
    result_schemes=("rpc",),
    derived_results="rpc://",
    celery_schemes=("amqp", "pyamqp", "amqps"),
    broker=_HERE + "broker:AMQPBroker",
    results={"rpc": _HERE + "celery_rpc:CeleryRPCBackend"},
    control=_HERE + "control:AMQPTransport",
    leadership=_HERE + "leadership:AMQPLeadership",
    coordination=_HERE + "coordination:AMQPCoordination",
    queue_listing=_HERE + "management:queue_stats",
    async_results={"rpc": _HERE + "aio:RPCResults"},
)
