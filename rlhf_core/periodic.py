"""One background loop for the workers' periodic chores (canary check, retention, due rounds).

Each chore is a function called every ``every_s`` seconds on a daemon thread, so a worker
that exits does not wait for it. An exception in one tick is logged and the next tick
tries again: a Redis blip or a bad record must not kill the loop, or the worker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Self

log = logging.getLogger(__name__)


class PeriodicLoop:
    """Calls ``fn()`` every ``every_s`` seconds on a daemon thread named ``name``, the first
    call one interval after :meth:`start`. ``what`` names the chore in the error log.
    An interval of 0 (or less) means off: :meth:`start` starts no thread.

    Subclasses pass a bound method (``super().__init__(self.tick, ...)``) and keep
    ``tick`` callable on its own, so tests run one pass without a thread or a wait."""

    def __init__(
        self, fn: Callable[[], Any], every_s: float, name: str, what: str | None = None
    ) -> None:
        self.fn = fn
        self.every_s = every_s
        self.name = name
        self.what = what or name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        # wait() returns True once stop() is called, so a stop never waits a full interval.
        while not self._stop.wait(self.every_s):
            try:
                self.fn()
            except Exception:  # the next tick tries again; a worker must not die of it
                log.exception("%s failed", self.what)

    def start(self) -> Self:
        # A zero interval would spin a core calling the chore back to back, not "check
        # constantly": every loop reads 0 as off (RLHF_ROUND_CHECK_S=0, RLHF_CANARY_CHECK_S=0).
        if self._thread is None and self.every_s > 0:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ends the loop; a tick that is running finishes first (waited for up to
        ``timeout_s``). A stopped loop does not start again."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
