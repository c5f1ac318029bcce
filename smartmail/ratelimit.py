"""A thread-safe rate limiter shared by every worker, that learns the provider's limit.

Each `acquire()` reserves the next free send slot under a lock and then sleeps outside it, so
workers queue fairly. Two rules decide the slot:

- the generic cell rate algorithm: a theoretical arrival time advanced by 1/rate a send, with
  `burst - 1` sends of tolerance, which gives the long-run rate and the burst;
- a sliding log of the last sends: at most `rate + burst - 1` in any `1 + guard` seconds. The
  message of margin and the `guard` (5 ms, up to 50 ms when the burst leaves room) absorb
  that much jitter between our clock and the receiver's (a connection set up before the
  first message, a thread waiting for the GIL), so no one-second window *at the receiver*
  holds more than `rate + burst` messages. It costs at most 0.5 % of the rate, plus one
  guard each time the burst is spent (at --rate 100 --burst 5, 1,500 sends stay within
  0.4 % of the rate).

When the provider throttles us, `throttled()` learns its limit from what it accepted: the
sends of the last second less the throttled ones (providers count per second), times
`headroom`, and never less than a quarter or more than 0.9 of the rate that was throttled
(once per `cooldown`, so many workers throttled at once count once). With too few recent
sends to learn from, it halves the rate. After `hold` seconds without a throttle it probes
upwards gently (`probe`, 2 % a second; 10 % while below 0.9 of the accepted rate, as after a
stray throttle), up to the configured rate and never above it. `Unlimited` (no --rate)
sends as fast as it can until the first throttle, then does the same with no upper bound.

The clock and the sleep are injectable: tests drive the limiter with a fake clock and never
really sleep.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

Clock = Callable[[], float]
Sleep = Callable[[float], None]

LEARN_WINDOW = 1.0  # seconds of sends the limit is learned from (providers count per second)
MIN_GUARD = 0.005  # seconds; costs at most 0.5 % of the rate when the burst leaves no room
MAX_GUARD = 0.05
MIN_SAMPLE = 10  # sends in the last second below which a throttle just halves the rate
RECOVER = 0.10  # the climb a second while far below the rate last accepted


class RateStats(NamedTuple):
    """How the rate behaved over a run, for the summary and the report (a snapshot)."""

    configured: float | None
    current: float | None
    lowest: float | None
    throttles: int
    slowdowns: int
    waited_seconds: float


class TokenBucket:
    """Limits sends to `rate` per second with bursts of at most `burst` (rate None: no limit
    until the provider throttles)."""

    def __init__(
        self,
        rate: float | None,
        burst: int = 1,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
        min_rate: float | None = None,
        cooldown: float = 1.0,
        headroom: float = 0.95,
        hold: float = 2.0,
        probe: float = 0.02,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.configured = float(rate) if rate is not None else None
        self.target = self.configured if self.configured is not None else math.inf
        self.burst = burst
        self.min_rate = min_rate if min_rate is not None else min(self.target, 0.1)
        self._clock = clock
        self._sleep = sleep
        self._cooldown = cooldown
        self._headroom = headroom
        self._hold = hold
        self._probe = probe
        self._lock = threading.Lock()
        now = clock()
        self._tat = now  # GCRA: the theoretical arrival time of the next send
        self._log: collections.deque[float] = collections.deque()  # recent slots, in order
        self._throttled_at: collections.deque[float] = collections.deque()
        self._last_throttle = -math.inf
        self._ceiling = math.inf  # the accepted rate when last throttled
        self._last_adjust = now
        self.throttles = 0
        self.slowdowns = 0
        self.waited = 0.0
        self.rate = self.target
        self.lowest = self.target
        self._set_rate(self.target)

    def _set_rate(self, rate: float) -> None:
        """The spacing and the sliding-log rule for `rate` (called under the lock)."""
        self.rate = rate
        self.lowest = min(self.lowest, rate)
        if math.isinf(rate):
            self._interval = 0.0
            self._window_count = 0  # no sliding-log rule
            return
        self._interval = 1.0 / rate
        room = (self.burst - 1.5) / rate
        self._span = 1.0 + min(MAX_GUARD, max(MIN_GUARD, room))
        limit = math.floor(rate + self.burst + 1e-9)
        need = rate * self._span  # sends in one span at the steady rate
        if limit - 1 >= need * 0.995:  # a message of margin costs at most 0.5 % of the rate
            self._window_count = max(1, limit - 1)
        else:  # a low, fractional rate: no room for the margin without slowing down
            self._window_count = max(1, limit - 1, min(limit, math.ceil(need)))

    def acquire(self) -> float:
        """Block until a send may go; return the wait reserved for this call (`sleep` may end
        it early: the run's stop event), which `waited` counts only as far as it lasted."""
        with self._lock:
            now = self._clock()
            if self.rate < self.target:
                self._raise_rate(now)
            slot = now
            if self._interval:
                tat = max(self._tat, now)
                slot = max(now, tat - (self.burst - 1) * self._interval)
                count = self._window_count
                log = self._log
                if len(log) >= count:
                    slot = max(slot, log[-count] + self._span)
                self._tat = max(tat, slot) + self._interval
            self._remember(slot, now)
            wait = slot - now
        if wait > 0:
            self._sleep(wait)
            waited = min(wait, max(0.0, self._clock() - now))
            with self._lock:
                self.waited += waited
        return wait

    def _remember(self, slot: float, now: float) -> None:
        log = self._log
        log.append(slot)
        horizon = now - max(LEARN_WINDOW, self._span if self._interval else 0.0)
        keep = max(self._window_count, 1)
        while len(log) > keep and log[0] < horizon:
            log.popleft()

    def throttled(self) -> None:
        """The provider said 'too fast': slow to what it accepted, once per cooldown."""
        with self._lock:
            self.throttles += 1
            now = self._clock()
            times = self._throttled_at
            times.append(now)
            while times and times[0] < now - LEARN_WINDOW:
                times.popleft()
            if now - self._last_throttle < self._cooldown:
                return
            self._last_throttle = now
            self._last_adjust = now
            sent = sum(1 for t in self._log if now - LEARN_WINDOW <= t <= now)
            accepted = max(0, sent - len(times))
            current = self.rate
            if sent < MIN_SAMPLE:  # too few sends to learn from: halve, as AIMD would
                new_rate = current / 2 if not math.isinf(current) else float(max(sent, 1))
                self._ceiling = current
            else:
                learned = accepted * self._headroom
                self._ceiling = float(accepted)
                if math.isinf(current):
                    new_rate = max(learned, 1.0)
                else:
                    new_rate = min(max(learned, current / 4), current * 0.9)
            new_rate = max(self.min_rate, min(new_rate, self.target))
            if new_rate < current:
                self.slowdowns += 1
                # Keep the reservations already handed out; only the spacing changes.
                self._set_rate(new_rate)

    def _raise_rate(self, now: float) -> None:
        """Probe upwards after `hold` quiet seconds: `probe` a second, compounded."""
        if now - self._last_throttle < self._hold:
            return
        elapsed = now - self._last_adjust
        if elapsed >= 1.0:
            # Well below where the provider last pushed back: climb faster (a stray throttle).
            step = RECOVER if self.rate < 0.9 * self._ceiling else self._probe
            rate = min(self.target, self.rate * (1.0 + step) ** elapsed)
            self._last_adjust = now
            self._set_rate(rate)

    def stats(self) -> RateStats:
        with self._lock:
            return RateStats(
                configured=self.configured,
                current=None if math.isinf(self.rate) else self.rate,
                lowest=None if math.isinf(self.lowest) else self.lowest,
                throttles=self.throttles,
                slowdowns=self.slowdowns,
                waited_seconds=self.waited,
            )


class Unlimited(TokenBucket):
    """The limiter when no rate is set: never waits until the provider throttles, then
    sends at the rate it learned, probing upwards like any other."""

    def __init__(self, *, clock: Clock = time.monotonic, sleep: Sleep = time.sleep) -> None:
        super().__init__(None, 1, clock=clock, sleep=sleep)


Limiter = TokenBucket
