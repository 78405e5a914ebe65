"""VisibilityKeeper: the messages this process holds, and the thread that keeps them hidden.

SQS hides a received message for the queue's visibility timeout. A batch that takes longer (a slow
or unreachable database) would reappear and be processed twice in parallel, so a message still in
hand at half the timeout has its visibility extended. The rules, each a past bug:

- a deadline moves only when SQS accepted the extension; after a failure the next tick tries again
  (it does not wait for the message to reappear);
- an entry SQS refuses (its receipt handle is stale: the message reappeared or was deleted) is no
  longer tracked and is not counted as extended; refusals are matched by receipt handle, since two
  copies of one message (SQS delivers at least once) may be in one call, and only one is stale;
- each call covers at most 10 entries, and one failing call does not skip the others;
- no error ends the extender thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aws.limits import chunks
from models import ReceivedMessage

logger = logging.getLogger(__name__)


# extend(messages, timeout_seconds) -> the receipt handles SQS refused; raises on a failed call.
Extend = Callable[[Sequence[ReceivedMessage], int], list[str]]


@dataclass(frozen=True, slots=True)
class ExtendResult:
    """One pass of the keeper: how many entries were extended, refused, or left for the next tick."""

    extended: int = 0
    refused: int = 0
    failed: int = 0


class VisibilityKeeper:
    """Tracks received-not-deleted messages by receipt handle; extends those due, on its own thread."""

    def __init__(
        self,
        extend: Extend,
        timeout_seconds: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_pass: Callable[[ExtendResult], None] = lambda result: None,
    ) -> None:
        self.timeout = max(1, timeout_seconds)
        self._extend = extend
        self._clock = clock
        self._on_pass = on_pass
        self._deadlines: dict[str, tuple[ReceivedMessage, float]] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    # -- tracking -------------------------------------------------------------------------------

    def track(self, messages: Sequence[ReceivedMessage]) -> None:
        """Start tracking messages just received: SQS hides them for one timeout from now."""
        deadline = self._clock() + self.timeout
        with self._lock:
            for message in messages:
                self._deadlines[message.receipt_handle] = (message, deadline)

    def untrack(self, messages: Sequence[ReceivedMessage]) -> None:
        """Stop tracking (deleted, or left to reappear on purpose)."""
        with self._lock:
            for message in messages:
                self._deadlines.pop(message.receipt_handle, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._deadlines)

    def held(self) -> list[ReceivedMessage]:
        """The messages tracked now."""
        with self._lock:
            return [message for message, _ in self._deadlines.values()]

    # -- extending ------------------------------------------------------------------------------

    def due(self) -> list[ReceivedMessage]:
        """Messages within half a timeout of reappearing, the most urgent first (nothing is changed).

        Most urgent first: when a pass is slow (many messages, a loaded machine), the messages
        closest to reappearing are extended before the others.
        """
        now = self._clock()
        with self._lock:
            due = [(deadline, m) for m, deadline in self._deadlines.values() if deadline - now < self.timeout / 2]
        return [m for _, m in sorted(due, key=lambda pair: pair[0])]

    def extend_due(self) -> ExtendResult:
        """Extend every message due, 10 per call; one pass of the extender thread."""
        due = self.due()
        extended = refused = failed = 0
        for chunk in chunks(due):
            called_at = self._clock()  # SQS counts the new timeout from the call
            try:
                refused_handles = set(self._extend(chunk, self.timeout))
            except Exception as exc:  # noqa: BLE001 - any failure: try again at the next tick
                failed += len(chunk)
                logger.warning("could not extend the visibility of %d messages: %s", len(chunk), _short(exc))
                continue
            with self._lock:
                for message in chunk:
                    if message.receipt_handle not in self._deadlines:
                        continue  # deleted meanwhile
                    if message.receipt_handle in refused_handles:
                        del self._deadlines[message.receipt_handle]
                        refused += 1
                    else:
                        self._deadlines[message.receipt_handle] = (message, called_at + self.timeout)
                        extended += 1
            if refused_handles:
                logger.warning(
                    "SQS refused to extend %d of %d messages (stale receipt: they reappear and are stored once)",
                    len(refused_handles),
                    len(chunk),
                )
        if extended:
            logger.info("extended the visibility of %d messages still in hand", extended)
        return ExtendResult(extended=extended, refused=refused, failed=failed)

    # -- the thread -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the extender thread (a daemon: it never holds up the process's exit)."""
        self._thread = threading.Thread(target=self._loop, name="visibility", daemon=True)
        self._thread.start()

    def stop(self, wait_seconds: float = 5.0) -> None:
        """Stop the extender thread and wait for it, at most `wait_seconds` (a call may hang)."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=wait_seconds)

    def _loop(self) -> None:
        tick = min(1.0, self.timeout / 4)
        while not self._done.wait(tick):
            try:
                result = self.extend_due()
                if result.extended or result.refused or result.failed:
                    self._on_pass(result)
            except Exception:  # noqa: BLE001 - the extender must outlive any bug in one pass
                logger.exception("visibility extender pass failed; trying again")


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
