"""The fleet's control plane: names, heartbeats, remote inspect/control and
task events, carried over the broker itself (base.py has the transport
interface; one module per broker kind).  docs/operations.md describes it."""
