"""Which failures are retried, and how: tenacity exponential backoff with jitter.

Only `TransientError` (and its `ThrottledError` and `ConnectionFailedError`) is retried;
`PermanentError`, `StopRunError` and `InDoubtError` go straight back to the engine. An
`InDoubtError` is deliberately outside the `TransientError` branch: the provider may already
hold that message, and a retry could deliver it twice. The first attempt runs outside tenacity so
the common case (success first time) costs nothing extra on the hot path.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from .errors import TransientError

if TYPE_CHECKING:
    from tenacity import RetryCallState

T = TypeVar("T")


@dataclass
class RetryPolicy:
    """`max_retries` retries after the first attempt, waits growing from `initial` to `maximum`."""

    max_retries: int = 3
    initial: float = 1.0
    maximum: float = 30.0
    jitter: float = 1.0
    sleep: Callable[[float], None] = time.sleep

    def call(
        self,
        attempt: Callable[[], T],
        *,
        before_retry: Callable[[TransientError, float], None] | None = None,
    ) -> tuple[T, int]:
        """Run `attempt` until it succeeds or fails for good; return (result, attempts)."""
        try:
            return attempt(), 1
        except TransientError as first:
            if self.max_retries <= 0:
                raise
            error = first

        # tenacity only once something failed: most runs never need it (nor its import time).
        from tenacity import (
            Retrying,
            retry_if_exception_type,
            stop_after_attempt,
            wait_exponential,
            wait_random,
        )

        attempts = 1

        def counted() -> T:
            nonlocal attempts
            attempts += 1
            return attempt()

        def before_sleep(state: RetryCallState) -> None:
            if before_retry is not None and state.outcome is not None and state.next_action:
                exc = state.outcome.exception()
                if isinstance(exc, TransientError):
                    before_retry(exc, state.next_action.sleep)

        first_wait = min(self.maximum, self.initial + random.uniform(0, self.jitter))
        if before_retry is not None:
            before_retry(error, first_wait)
        self.sleep(first_wait)
        retrying = Retrying(
            retry=retry_if_exception_type(TransientError),
            stop=stop_after_attempt(self.max_retries),
            # Doubling from where the first wait left off: initial, 2x, 4x ... up to maximum.
            wait=wait_exponential(multiplier=self.initial * 2, max=self.maximum)
            + wait_random(0, self.jitter),
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(counted), attempts
