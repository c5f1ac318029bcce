"""The token bucket against a fake clock: never above rate + burst in any second, never idle."""

from __future__ import annotations

import heapq
import itertools
import threading
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartmail import TokenBucket, Unlimited


class FakeClock:
    """Time that only moves when someone sleeps (or the test advances it)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.now += max(0.0, seconds)


def max_in_any_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window - 1e-9:
            start += 1
        best = max(best, end - start + 1)
    return best


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=500),
    burst=st.integers(min_value=1, max_value=20),
    gaps=st.lists(st.floats(min_value=0, max_value=2), min_size=1, max_size=300),
)
def test_no_window_carries_more_than_rate_plus_burst(
    rate: float, burst: int, gaps: list[float]
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock=clock, sleep=clock.sleep)
    sends = []
    for gap in gaps:
        clock.sleep(gap)  # callers arrive at arbitrary times
        bucket.acquire()
        sends.append(clock.now)
    assert max_in_any_window(sends) <= rate + burst


@settings(max_examples=100, deadline=None)
@given(
    rate=st.integers(min_value=1, max_value=400),
    burst=st.integers(min_value=1, max_value=20),
    delays=st.lists(st.floats(min_value=0, max_value=1), min_size=50, max_size=50),
)
def test_receiver_windows_hold_at_most_rate_plus_burst_despite_jitter(
    rate: int, burst: int, delays: list[float]
) -> None:
    """Each message reaches the receiver after a delay that varies by up to the limiter's guard
    (a connection set up first, a thread waiting for the GIL): no one-second window there may
    hold more than rate + burst."""
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock=clock, sleep=clock.sleep)
    jitter = bucket._span - 1.0
    arrivals = []
    for i in range(3 * rate + burst + 10):
        bucket.acquire()
        arrivals.append(clock.now + jitter * delays[i % len(delays)])
    assert max_in_any_window(arrivals) <= rate + burst


@settings(max_examples=50, deadline=None)
@given(rate=st.floats(min_value=1, max_value=1000), burst=st.integers(min_value=1, max_value=50))
def test_a_backlog_runs_at_the_rate_within_half_a_percent_and_one_guard(
    rate: float, burst: int
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock=clock, sleep=clock.sleep)
    start = clock.now
    n = 1500
    for _ in range(n):
        bucket.acquire()
    elapsed = clock.now - start
    # n sends: the first `burst` at once, then one every 1/rate. Never faster; slower by at
    # most 0.5 % (a burst of 1 leaves the guard no room) plus one guard (5-50 ms) after the
    # first burst: at --rate 100 --burst 5, 1,500 sends land within 1 % of the rate.
    ideal = (n - burst) / rate
    guard = bucket._span - 1.0
    assert ideal - 1e-9 * n <= elapsed <= ideal * 1.005 + guard + 1e-9 * n


def test_fifteen_hundred_sends_at_rate_100_burst_5_are_within_one_percent() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, 5, clock=clock, sleep=clock.sleep)
    start = clock.now
    for _ in range(1500):
        bucket.acquire()
    assert abs((1500 - 5) / (clock.now - start) / 100 - 1) <= 0.01


def test_a_wait_the_runs_stop_cuts_short_counts_only_the_time_waited() -> None:
    clock = FakeClock()
    stop = threading.Event()

    def pause(seconds: float) -> None:  # the run's stop event, set 0.25 s into a wait
        clock.sleep(min(seconds, 0.25) if stop.is_set() else seconds)

    bucket = TokenBucket(1, 1, clock=clock, sleep=pause)
    assert bucket.acquire() == 0
    first = bucket.acquire()  # waited in full
    stop.set()
    second = bucket.acquire()  # the slot stays reserved (the return says so); 0.25 s waited
    assert first >= 1.0 and second >= 1.0
    assert bucket.stats().waited_seconds == pytest.approx(first + 0.25)


def test_shared_by_threads_hands_out_distinct_slots() -> None:
    waits: list[float] = []
    lock = threading.Lock()
    clock = FakeClock()

    def no_sleep(_s: float) -> None:
        return None

    bucket = TokenBucket(100, 1, clock=clock, sleep=no_sleep)

    def worker() -> None:
        for _ in range(50):
            w = bucket.acquire()
            with lock:
                waits.append(w)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    # With the clock frozen, the 400 sends got 400 slots at least 10 ms apart, ~4 s in all.
    slots = sorted(waits)
    assert len(slots) == 400 and slots[0] == 0
    assert all(b - a >= 0.01 - 1e-9 for a, b in itertools.pairwise(slots))
    assert slots[-1] <= 3.99 * 1.01


# --- learning the provider's limit -------------------------------------------------------------


@dataclass
class Provider:
    """A provider that accepts at most `limit` messages in any one second, throttling the rest."""

    limit: int
    accepted: list[float] = field(default_factory=list)
    throttled: int = 0

    def send(self, now: float) -> bool:
        recent = sum(1 for t in self.accepted[-self.limit :] if t > now - 1.0)
        if recent >= self.limit:
            self.throttled += 1
            return False
        self.accepted.append(now)
        return True


def simulate(
    bucket: TokenBucket, clock: SimClock, provider: Provider, messages: int, workers: int = 8
) -> dict[int, int]:
    """Workers that send (20 ms a call), report throttles to the limiter and retry after
    1, 2, 4 s, in simulated time. Returns the attempts each message took."""
    attempts: dict[int, int] = {}
    events: list[tuple[float, int, str, int]] = []  # (time, seq, what, message)
    seq = 0
    next_message = 0
    for _ in range(workers):
        heapq.heappush(events, (clock.now, seq, "take", -1))
        seq += 1
    while events:
        when, _, what, msg = heapq.heappop(events)
        clock.now = max(clock.now, when)
        if what == "take":
            if next_message >= messages:
                continue
            msg, next_message = next_message, next_message + 1
            what = "try"
        if what == "try":
            slot = clock.now + bucket.acquire()
            heapq.heappush(events, (slot, seq, "arrive", msg))
        elif what == "arrive":
            attempts[msg] = attempts.get(msg, 0) + 1
            ok = provider.send(when)
            heapq.heappush(events, (when + 0.02, seq, "ok" if ok else "throttled", msg))
        elif what == "ok":
            heapq.heappush(events, (when, seq, "take", -1))
        else:
            bucket.throttled()
            backoff = 2.0 ** (attempts[msg] - 1)
            heapq.heappush(events, (when + backoff, seq, "try", msg))
        seq += 1
    return attempts


class SimClock:
    """Event time for the simulation: the limiter reads it and never sleeps for real."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        return None


@pytest.mark.parametrize("configured", [200.0, None], ids=["rate-above-limit", "no-rate"])
def test_learns_the_providers_limit_from_what_it_accepted(configured: float | None) -> None:
    clock = SimClock()
    bucket = TokenBucket(configured, clock=clock, sleep=clock.sleep)
    provider = Provider(limit=50)
    n = 1500
    attempts = simulate(bucket, clock, provider, n)

    assert len(provider.accepted) == n  # every message delivered exactly once
    assert max(attempts.values()) <= 4  # within the default 3 retries: no row would fail
    assert provider.throttled < 0.10 * n
    start = provider.accepted[0]
    late = [t for t in provider.accepted if t >= start + 5.0]
    goodput = len(late) / (provider.accepted[-1] - (start + 5.0))
    assert goodput >= 0.90 * provider.limit
    stats = bucket.stats()
    # Learned from the accepted rate (about 50), not by halving from 200 to 100, 50, 25...
    assert stats.current is not None and 0.8 * 50 <= stats.current <= 1.1 * 50
    assert stats.lowest is not None and stats.lowest >= 0.5 * 50


def test_never_above_the_configured_rate_while_probing_upwards() -> None:
    clock = SimClock()
    bucket = TokenBucket(40.0, clock=clock, sleep=clock.sleep)
    provider = Provider(limit=50)  # allows more than we may send
    bucket.throttled()  # one stray throttle early on slows us down...
    simulate(bucket, clock, provider, 1200)
    # ...then the rate climbs back to 40 and never past it.
    assert bucket.stats().current == 40.0
    assert max_in_any_window(provider.accepted) <= 40 + 1
    assert provider.throttled == 0


def test_unlimited_never_waits_until_throttled() -> None:
    clock = FakeClock()
    limiter = Unlimited(clock=clock, sleep=clock.sleep)
    for _ in range(1000):
        assert limiter.acquire() == 0.0
    assert limiter.stats().current is None
    limiter.throttled()
    stats = limiter.stats()
    assert stats.throttles == 1 and stats.slowdowns == 1
    # It learned from the 1,000 sends of the last second (all accepted but the throttled one).
    assert stats.current is not None and 900 <= stats.current <= 1000
    assert stats.configured is None


def test_throttles_from_many_workers_at_once_count_once_per_cooldown() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, 1, clock=clock, sleep=clock.sleep, cooldown=1.0)
    for _ in range(100):
        bucket.acquire()
    for _ in range(5):  # five workers throttled at the same moment count once
        bucket.throttled()
    stats = bucket.stats()
    assert stats.throttles == 5 and stats.slowdowns == 1
    first = stats.current
    assert first is not None and first <= 90
    clock.sleep(0.5)
    bucket.throttled()
    assert bucket.stats().current == first
