"""The token bucket against a fake clock: never above rate + burst in any second, never idle."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from smartmail import TokenBucket


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


@settings(max_examples=50, deadline=None)
@given(rate=st.floats(min_value=1, max_value=1000), burst=st.integers(min_value=1, max_value=50))
def test_a_backlog_runs_at_the_full_rate(rate: float, burst: int) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock=clock, sleep=clock.sleep)
    start = clock.now
    n = 500
    for _ in range(n):
        bucket.acquire()
    elapsed = clock.now - start
    # n sends: the first `burst` at once, then one every 1/rate: not slower, not faster.
    assert abs(elapsed - (n - burst) / rate) < 1e-6 * n


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
    # With the clock frozen, the 400 sends must have been given 400 distinct slots 10 ms apart.
    assert sorted(round(w, 6) for w in waits) == [round(i * 0.01, 6) for i in range(400)]


def test_throttling_halves_the_rate_once_per_cooldown_then_recovers() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, 1, clock=clock, sleep=clock.sleep, cooldown=1.0)
    for _ in range(5):  # five workers throttled at the same moment count once
        bucket.throttled()
    stats = bucket.stats()
    assert stats.current == 50 and stats.throttles == 5 and stats.slowdowns == 1
    clock.sleep(0.5)
    bucket.throttled()
    assert bucket.stats().current == 50
    clock.sleep(1.0)
    bucket.throttled()
    assert bucket.stats().current == 25
    for _ in range(200):  # ten seconds of quiet sending at 10 %/s recovery
        clock.sleep(0.05)
        bucket.acquire()
    final = bucket.stats()
    assert final.current == 100 and final.lowest == 25
