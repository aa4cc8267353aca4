"""Resource permits: concurrency limits per downstream (CONTRACT section 11, docs/resources.md).

A ``[resource:NAME]`` section declares a resource; a task names the permits it
holds while it runs (``resources={"pg": 1}``) and task code takes one around a
section with ``with app.resource("pg"):``.  A :class:`~greenq.resources.base.PermitPool`
counts one resource's permits in one scope (process, host, cluster); the
admission step (greenq.resources.step) decides when a task may take them.
"""
from .base import PermitPool, ResourceSettings, make_pool

__all__ = ["PermitPool", "ResourceSettings", "make_pool"]
