"""asyncio callers (CONTRACT section 13; docs/asyncio.md): ``await
task.adelay(...)``, ``await task.aapply_async(...)``, ``await
app.asend_task(...)``, ``await result.aget(timeout=...)``, ``aready``,
``aforget`` and ``GroupResult.aget`` go through the running loop's
:class:`AsyncClient` of the app (greenq/aio/client.py); ``aclose(app)``
closes it.  The pluggable parts: greenq/aio/base.py."""
from .client import AsyncClient, aclose, client_for

__all__ = ["AsyncClient", "aclose", "client_for"]
