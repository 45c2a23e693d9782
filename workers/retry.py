"""The wait between attempts of a loop that talks to Redis until its task is cancelled: the
gateway's reply reader (service/stream_compute.py) and each loop of a scoring worker
(workers/stream_worker.py). Neither loop gives up, so neither fits a retry decorator that
retries one call a bounded number of times: each keeps its own ``Backoff``.
"""

from __future__ import annotations

import asyncio

from latentsieve.workers.streams import stopping

# 2 ** this is the largest factor: past it the delay is at its cap anyway, and a float power
# of a long outage's failure count would overflow.
_MAX_DOUBLINGS = 32


class Backoff:
    """Delays of ``first_s`` seconds, doubled after each failure up to ``cap_s``; a success
    (``reset``) starts again from ``first_s``."""

    def __init__(self, first_s: float = 0.05, cap_s: float = 2.0) -> None:
        if not 0 < first_s <= cap_s:
            raise ValueError(f"need 0 < first_s <= cap_s, got {first_s} and {cap_s}")
        self.first_s = first_s
        self.cap_s = cap_s
        self.failures = 0

    @property
    def delay_s(self) -> float:
        """Seconds the next ``wait`` sleeps: first_s * 2^failures, at most cap_s."""
        return min(self.cap_s, self.first_s * 2.0 ** min(self.failures, _MAX_DOUBLINGS))

    def reset(self) -> None:
        """An attempt succeeded: the next failure waits ``first_s`` again."""
        self.failures = 0

    async def wait(self, error: BaseException) -> None:
        """After a failed attempt (``error``): sleep ``delay_s`` and double the next delay.
        Raises CancelledError instead when this task was asked to stop, even when the Redis
        call that failed swallowed the cancellation (``workers.streams.stopping``)."""
        stopping(error)
        delay = self.delay_s
        self.failures += 1
        await asyncio.sleep(delay)
