"""TTL timers: one loop timer per non-final execution, firing into a queue of due ids."""

from __future__ import annotations

import asyncio
import time


class TtlScheduler:
    """Tracks when each active execution expires.

    A timer only puts the id on :attr:`due`; the control plane's expiry loop
    does the (durable) TIMED_OUT transition. The number of scheduled
    executions is the number of active ones.
    """

    def __init__(self) -> None:
        self._handles: dict[str, asyncio.TimerHandle] = {}
        self.due: asyncio.Queue[str] = asyncio.Queue()

    def __len__(self) -> int:
        return len(self._handles)

    def __contains__(self, execution_id: object) -> bool:
        return execution_id in self._handles

    def schedule(self, execution_id: str, expires_at_ms: int) -> None:
        """Fire at ``expires_at_ms`` (wall clock, ms); at once when that has passed."""
        self.cancel(execution_id)
        delay = max(0.0, expires_at_ms / 1000 - time.time())
        loop = asyncio.get_running_loop()
        self._handles[execution_id] = loop.call_later(delay, self._fire, execution_id)

    def _fire(self, execution_id: str) -> None:
        self._handles.pop(execution_id, None)
        self.due.put_nowait(execution_id)

    def cancel(self, execution_id: str) -> None:
        """Forget ``execution_id`` (it became final)."""
        handle = self._handles.pop(execution_id, None)
        if handle is not None:
            handle.cancel()

    def close(self) -> None:
        """Cancel every timer."""
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()
