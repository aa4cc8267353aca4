"""greenq: a task queue built for green threads.

Importing this package loads none of gevent, eventlet, ssl, redis or amqp: a
legacy app imports it unpatched, and the worker patches before they load.
"""
from .exceptions import (BrokerError, ConfigError, GreenQError, MessageError, Reject, Retry,
                         SoftTimeLimitExceeded, TaskError, TaskRevokedError, TimeLimitExceeded,
                         TimeoutError, WorkerLostError)

__version__ = "0.1.0"
