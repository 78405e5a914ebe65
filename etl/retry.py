"""How every retry in the process waits and when it gives up.

`Backoff` is the policy (capped exponential delay, full jitter; defined in models.py, because
`database/` uses it too). `Retrier` applies it to one call against one service: it counts attempts,
reports each failure, and decides between trying again, giving up after the retry budget (drain
mode), and giving up because the process is stopping. The clock and the sleep are injected, so that
a test can fail a call 100,000 times in a second. `StopState` holds the stop's two deadlines.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from models import Backoff

logger = logging.getLogger(__name__)
T = TypeVar("T")

# How long past the stop timeout a call still in flight may take to return before it is abandoned
# (a half-open connection that drops packets, a boto call inside its read timeout): the stop is then
# over, whatever the threads still do. So the process ends within the stop timeout plus this margin.
STOP_MARGIN_SECONDS = 2.0
# Log the first failure of a call and then every tenth: a long outage must not flood the log.
LOG_EVERY = 10


class RetryError(Exception):
    """Root of the errors raised here: a call was given up on. The text names service and operation."""


class BudgetExhausted(RetryError):
    """Raised when a call kept failing for longer than the retry budget (drain mode)."""


class StopDeadlinePassed(RetryError):
    """Raised when the process is stopping and the call still failed at the stop deadline."""


class Abandoned(RetryError):
    """Raised when the process is stopping and the call is one not worth finishing (a receive)."""


class Clock:
    """Monotonic time and an interruptible sleep; tests pass a fake that never really sleeps."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float, wake: threading.Event) -> None:
        """Sleep up to `seconds`, returning early once `wake` is set."""
        wake.wait(seconds)


@dataclass
class StopState:
    """Whether the process is stopping; until when a batch in hand may still be retried (`deadline`,
    on the clock); and when calls that have not returned are abandoned (`give_up_at`).

    `give_up_at` is `time.monotonic()` time, whatever the clock: a call that hangs does not move a
    test's fake clock, and a hang is what it bounds.
    """

    clock: Clock = field(default_factory=Clock)
    timeout_seconds: float = 20.0
    margin_seconds: float = STOP_MARGIN_SECONDS
    event: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None
    give_up_at: float | None = None
    # Reentrant: a signal handler calls stop() on the main thread, which may be inside stop() already.
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def stop(self) -> None:
        """Start stopping now (later calls keep the first deadlines)."""
        with self._lock:
            if self.deadline is None:
                self.deadline = self.clock.now() + self.timeout_seconds
                self.give_up_at = time.monotonic() + self.timeout_seconds + self.margin_seconds
        self.event.set()

    def past_give_up(self) -> bool:
        """True once stopping and `give_up_at` has passed."""
        return self.give_up_at is not None and time.monotonic() >= self.give_up_at

    @property
    def stopping(self) -> bool:
        return self.event.is_set()


class Retrier:
    """Retries calls under one Backoff, one retry budget and one stop state.

    `budget_seconds` None means retry for ever (`--follow`). Once stopping, a call made with
    `finish=True` (a commit, a delete of something committed) is still retried until the stop
    deadline; one made with `finish=False` (a receive) is abandoned at its next failure.
    """

    def __init__(
        self,
        backoff: Backoff,
        stop: StopState,
        *,
        budget_seconds: float | None,
        on_error: Callable[[str, str], None] = lambda service, operation: None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.backoff = backoff
        self._stop = stop
        self._budget = budget_seconds
        self._on_error = on_error
        self._rng = rng

    def call(
        self,
        service: str,
        operation: str,
        fn: Callable[[], T],
        transient: type[Exception] | tuple[type[Exception], ...],
        *,
        finish: bool = True,
    ) -> T:
        """Call `fn` until it succeeds; raise BudgetExhausted, StopDeadlinePassed or Abandoned."""
        clock = self._stop.clock
        budget_end = math.inf if self._budget is None else clock.now() + self._budget
        attempt = 0
        while True:
            try:
                return fn()
            except transient as exc:
                attempt += 1
                self._on_error(service, operation)
                what = f"{service} {operation}"
                now = clock.now()
                if now >= budget_end:
                    raise BudgetExhausted(f"{what} failed for {self._budget:.0f} s: {exc}") from None
                if self._stop.stopping:
                    if not finish:
                        raise Abandoned(f"{what} abandoned while stopping: {exc}") from None
                    assert self._stop.deadline is not None
                    if now >= self._stop.deadline:
                        raise StopDeadlinePassed(f"{what} still failing at the stop deadline: {exc}") from None
                if attempt == 1 or attempt % LOG_EVERY == 0:
                    logger.warning(
                        "%s failed (attempt %d): %s; retrying",
                        what,
                        attempt,
                        exc,
                        extra={"attempt": attempt, "service": service, "error": str(exc)},
                    )
                delay = self.backoff.delay(attempt, self._rng)
                if self._stop.deadline is not None:
                    delay = min(delay, max(0.0, self._stop.deadline - now))
                # Not woken by stop when already stopping: the event stays set, the wait must still wait.
                clock.sleep(delay, _NEVER if self._stop.stopping else self._stop.event)


_NEVER = threading.Event()
