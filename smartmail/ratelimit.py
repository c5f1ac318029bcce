"""A thread-safe token bucket shared by every worker, with adaptive slow-down on throttling.

Each `acquire()` reserves the next free send slot under a lock (the generic cell rate
algorithm: a theoretical arrival time advanced by 1/rate a send, with `burst - 1` sends of
tolerance) and then sleeps outside it, so workers queue fairly and no one-second window
carries more than `rate + burst` sends.
The clock and the sleep are injectable: tests drive the bucket with a fake clock and never
really sleep.

When the provider throttles us, `throttled()` halves the running rate (at most once per
`cooldown` seconds, so a burst of throttles from many workers counts once); the rate then
climbs back by a tenth of the configured rate per second without throttling, up to the
configured rate (additive increase, multiplicative decrease).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]
Sleep = Callable[[float], None]


@dataclass
class RateStats:
    """How the rate behaved over a run, for the summary and the report."""

    configured: float | None
    current: float | None
    lowest: float | None
    throttles: int
    slowdowns: int
    waited_seconds: float


class TokenBucket:
    """Limits sends to `rate` per second with bursts of at most `burst`."""

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
        min_rate: float | None = None,
        cooldown: float = 1.0,
        recovery: float = 0.1,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.target = float(rate)
        self.rate = float(rate)
        self.burst = burst
        self.min_rate = min_rate if min_rate is not None else min(rate, max(rate / 16, 0.1))
        self._clock = clock
        self._sleep = sleep
        self._cooldown = cooldown
        self._recovery = recovery
        self._lock = threading.Lock()
        now = clock()
        # GCRA: the theoretical arrival time of the next send at the steady rate.
        self._tat = now
        self._last_throttle = float("-inf")
        self._last_adjust = now
        self.throttles = 0
        self.slowdowns = 0
        self.lowest = self.rate
        self.waited = 0.0

    def acquire(self) -> float:
        """Block until a send may go; return how long this call waited."""
        with self._lock:
            now = self._clock()
            self._recover(now)
            interval = 1.0 / self.rate
            tat = max(self._tat, now)
            slot = max(now, tat - (self.burst - 1) * interval)
            self._tat = tat + interval
            wait = slot - now
            self.waited += wait
        if wait > 0:
            self._sleep(wait)
        return wait

    def throttled(self) -> None:
        """The provider said 'too fast': slow everyone down, once per cooldown."""
        with self._lock:
            self.throttles += 1
            now = self._clock()
            if now - self._last_throttle < self._cooldown:
                return
            self._last_throttle = now
            self._last_adjust = now
            new_rate = max(self.min_rate, self.rate / 2)
            if new_rate < self.rate:
                self.slowdowns += 1
                # Keep the reservations already handed out; only the spacing changes.
                self.rate = new_rate
                self.lowest = min(self.lowest, new_rate)

    def _recover(self, now: float) -> None:
        if self.rate >= self.target:
            return
        elapsed = now - self._last_adjust
        if elapsed >= 1.0 and now - self._last_throttle >= self._cooldown:
            self.rate = min(self.target, self.rate + self.target * self._recovery * elapsed)
            self._last_adjust = now

    def stats(self) -> RateStats:
        with self._lock:
            return RateStats(
                configured=self.target,
                current=self.rate,
                lowest=self.lowest,
                throttles=self.throttles,
                slowdowns=self.slowdowns,
                waited_seconds=self.waited,
            )


class Unlimited:
    """The limiter when no rate is set: never waits, still counts throttles."""

    def __init__(self) -> None:
        self.throttles = 0
        self._lock = threading.Lock()

    def acquire(self) -> float:
        return 0.0

    def throttled(self) -> None:
        with self._lock:
            self.throttles += 1

    def stats(self) -> RateStats:
        return RateStats(None, None, None, self.throttles, 0, 0.0)


Limiter = TokenBucket | Unlimited
