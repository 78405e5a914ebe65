"""What the Kubernetes probes ask (`/livez`, `/readyz`), answered from memory."""

from __future__ import annotations

import time
from collections.abc import Callable

from config import LIVENESS_STALL_SECONDS


class Health:
    """What the Kubernetes probes ask, answered from memory: never a call to PostgreSQL or SQS.

    Live: still starting, or the consume loop moved in the last `stall_seconds`: the writer went
    round its loop (at least every 0.5 s while idle) or a call failed and is being retried. An
    outage of PostgreSQL or SQS therefore counts as alive (a restart would not bring the service
    back, and would only add connection storms); only a loop stuck in one call that long is not.
    Ready: the consume loop runs and is not stopping.
    """

    def __init__(
        self, stall_seconds: float = LIVENESS_STALL_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stall_seconds = stall_seconds
        self._clock = clock
        self._last_beat = clock()
        self._stopping: Callable[[], bool] | None = None

    def beat(self) -> None:
        """The loop moved (a turn of the writer, or a retried call)."""
        self._last_beat = self._clock()

    def running(self, stopping: Callable[[], bool]) -> None:
        """The consume loop starts now; `stopping` says when it has been told to stop."""
        self.beat()
        self._stopping = stopping

    def live(self) -> tuple[bool, str]:
        if self._stopping is None:
            return True, "starting"
        idle = self._clock() - self._last_beat
        if idle > self._stall_seconds:
            return False, f"stalled: the consume loop has not moved for {idle:.0f} s"
        return True, f"ok: the consume loop moved {idle:.1f} s ago"

    def ready(self) -> tuple[bool, str]:
        if self._stopping is None:
            return False, "starting"
        if self._stopping():
            return False, "stopping: finishing the batch in hand"
        return True, "ready"
