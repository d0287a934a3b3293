"""The database circuit breaker: fail fast while the database is down, recover by itself.

closed     every unit of work runs; ``threshold`` consecutive transient failures open it.
open       nothing touches the database: requests get ``DatabaseUnavailable`` (503 with
           ``Retry-After``) at once, for ``cooldown`` seconds.
half-open  after the cooldown, the first request to arrive runs one explicit probe
           (``SELECT 1``, bounded by the connect and statement timeouts) while every other
           request still fails fast; the probe's success closes the breaker, its failure opens
           it for another cooldown.

The probe is an explicit query rather than the next user's request, so a request that never
touches the database (or fails for its own reasons) cannot close the breaker by accident.
One breaker per process: replicas each learn the database's health on their own.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from .metrics import set_breaker_state
from .observability import log

State = Literal["closed", "open", "half-open"]


class DatabaseUnavailable(Exception):
    """The database cannot be used now; the request may be retried after ``retry_after`` s."""

    def __init__(self, reason: str, retry_after: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = max(1, retry_after)


class Breaker:
    def __init__(
        self,
        *,
        threshold: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        #: Monotonic seconds; tests replace it to let a cooldown pass without waiting.
        self.clock = clock
        self.state: State = "closed"
        self.failures = 0
        self._opened_at = 0.0
        self._probe: asyncio.Lock = asyncio.Lock()
        set_breaker_state("closed")

    def retry_after(self) -> int:
        """Whole seconds until the next probe may run (at least 1)."""
        remaining = self._opened_at + self.cooldown - self.clock()
        return max(1, math.ceil(remaining))

    async def admit(self, probe: Callable[[], Awaitable[None]]) -> None:
        """Let a unit of work through, or raise ``DatabaseUnavailable`` without any I/O."""
        if self.state == "closed":
            return
        if self.state == "open" and self.clock() - self._opened_at < self.cooldown:
            raise DatabaseUnavailable("circuit breaker open", self.retry_after())
        if self._probe.locked():  # another request is probing: do not pile onto the database
            raise DatabaseUnavailable("circuit breaker half-open, probing", 1)
        async with self._probe:
            self._move("half-open")
            try:
                await probe()
            except Exception as exc:
                self._open(type(exc).__name__)
                raise DatabaseUnavailable("database probe failed", self.retry_after()) from exc
            self.success()

    def success(self) -> None:
        self.failures = 0
        if self.state != "closed":
            self._move("closed")

    def failure(self, error: str) -> None:
        self.failures += 1
        if self.state == "closed" and self.failures >= self.threshold:
            self._open(error)

    def _open(self, error: str) -> None:
        self._opened_at = self.clock()
        self._move("open", error=error, failures=self.failures)

    def _move(self, state: State, **details: object) -> None:
        if state != self.state:
            log.warning("database.breaker", state=state, previous=self.state, **details)
        self.state = state
        set_breaker_state(state)
