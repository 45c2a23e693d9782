"""Run the parts of one CPU computation on every core, each part's BLAS calls on one thread.

A multi-threaded BLAS parallelises each GEMM, but the passes between GEMMs (``exp``, row sums)
run on the calling thread alone, while the BLAS's own threads spin-wait for the next call
(OpenBLAS: about 2^28 cycles) and keep the other cores busy doing nothing. Splitting the
*latents* into one contiguous range per core, each range with its own GEMM -> exp -> sum loop
and the BLAS held to one thread meanwhile, keeps every core on useful work from the first GEMM
to the last sum. scikit-learn's KMeans runs its chunked distance GEMMs the same way (its own
parallel loop inside ``threadpool_limits(1, "blas")``).

:func:`split_ranges` says how to cut a pass, :func:`run_parts` runs the pieces. The BLAS
limit is process-wide (OpenBLAS has one thread pool), so computations split here take a
process-wide lock: one at a time, each on every core. How many parts to make is :func:`cores`:
the BLAS's own thread count (``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``, else the CPUs this
process may use), so an operator's BLAS setting still decides how many cores a process takes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from threadpoolctl import ThreadpoolController

T = TypeVar("T")

# Multiply-adds of a pass (query rows x latents x (d + 2)) from which it is split over the
# cores: below it a thread hand-off costs more than it saves (W1, N = 60,000: two queries).
SPLIT_MIN_PRODUCTS = 2**26


class _Cores:
    """The process's BLAS controller (found once: scanning the loaded libraries costs
    milliseconds) and the threads that run parts 2..n, rebuilt in a forked child."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.blas: ThreadpoolController | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.threads = 0

    def controller(self) -> ThreadpoolController:
        if self.blas is None:
            self.blas = ThreadpoolController().select(user_api="blas")
        return self.blas

    def pool(self, threads: int) -> ThreadPoolExecutor:
        """At least ``threads`` threads, kept for the process (called under ``lock``)."""
        if self.executor is None or self.threads < threads:
            if self.executor is not None:
                self.executor.shutdown(wait=False)
            self.executor = ThreadPoolExecutor(threads, thread_name_prefix="latentsieve-core")
            self.threads = threads
        return self.executor


_CORES = _Cores()


def _after_fork() -> None:
    global _CORES
    _CORES = _Cores()  # the parent's threads and lock state do not exist here


os.register_at_fork(after_in_child=_after_fork)


def cores() -> int:
    """Parts worth making now: the largest thread count among the loaded BLAS libraries
    (1: none loaded, or all limited to one thread)."""
    counts = [lib.get("num_threads") for lib in _CORES.controller().info()]
    return max([1, *[count for count in counts if isinstance(count, int)]])


def split_ranges(n: int, products: int, align: int = 1) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` ranges covering ``range(n)``, one per core (:func:`cores`) when
    a pass of ``products`` multiply-adds is worth splitting (``SPLIT_MIN_PRODUCTS``), else
    one; every boundary but ``n`` a multiple of ``align`` (a caller's block size, so that the
    blocks are those of one pass)."""
    parts = cores() if products >= SPLIT_MIN_PRODUCTS and n > align else 1
    step = -(-n // parts)
    step = -(-step // align) * align
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def _one_thread(state: _Cores, part: Callable[[], T]) -> T:
    """``part()`` with the BLAS held to one thread in this thread too: an OpenMP-threaded
    BLAS keeps its limit per thread (threadpoolctl leaves a process-wide OpenBLAS, already
    limited by the caller, to the caller)."""
    with state.controller().limit(limits=1):
        return part()


def run_parts(parts: Sequence[Callable[[], T]]) -> list[T]:
    """Each part's result, in order: ``(n,) callables -> (n,) results``.

    With more than one part and more than one BLAS thread, the parts run at once (the first
    on the calling thread, the others on this module's threads) with every BLAS library held
    to one thread in each; otherwise in turn on the calling thread, the BLAS as configured
    (also when another thread holds OpenBLAS's limit, which threadpoolctl then leaves alone).
    A part that raises re-raises here once every part has finished.
    """
    if len(parts) < 2:
        return [part() for part in parts]
    state = _CORES
    with state.lock:
        if cores() < 2:
            return [part() for part in parts]
        with state.controller().limit(limits=1):
            if cores() != 1:
                return [part() for part in parts]
            pool = state.pool(len(parts) - 1)
            rest: list[Future[T]] = [pool.submit(_one_thread, state, p) for p in parts[1:]]
            try:
                first = parts[0]()
            finally:
                for future in rest:  # no part may run on past the limit
                    future.exception()
            return [first, *[future.result() for future in rest]]
