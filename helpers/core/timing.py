"""Timing for every benchmark in the package: one synced median timer, the peak-RSS delta of a call, and a
single-thread context.

Benchmarks never live in tests (tests assert no timing); they report ratios against a baseline timed in the same
process with :func:`median_time`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import torch

__all__ = ["median_time", "time_quantiles", "peak_rss_delta", "single_thread"]


def _sync() -> None:
    # CUDA kernels are asynchronous: without a sync the host timer measures only the launch.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_quantiles(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1,
                   quantiles: Sequence[float] = (0.5, 0.2, 0.8)) -> list[float]:
    """Wall time of ``fn()`` in seconds at ``quantiles`` over ``repeats`` calls after ``warmup`` calls.

    Synchronizes CUDA before and after each call (when CUDA is in use), so GPU work is counted. A host-timer stand-in
    for ``triton.testing.do_bench`` where that is not available (CPU runs)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    ts = torch.tensor(times, dtype=torch.float64)
    return [float(torch.quantile(ts, q)) for q in quantiles]


def median_time(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` calls (CUDA-synced)."""
    return time_quantiles(fn, repeats=repeats, warmup=warmup, quantiles=(0.5,))[0]


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_delta(fn: Callable[[], object]) -> tuple[object, int | None]:
    """Run ``fn`` and return ``(result, bytes)``: how far the process's peak RSS rose above its RSS before the call
    (Linux: resets the high-water mark through ``/proc/self/clear_refs``). None where that is not available."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5 = reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        return fn(), None
    before = _read_status_kb("VmRSS")
    result = fn()
    peak = _read_status_kb("VmHWM")
    if before is None or peak is None:
        return result, None
    return result, max(0, peak - before) * 1024


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread inside the block, restoring the previous count after it.

    Many small ops (a [4, 3] log_softmax, a 64-wide MLP update) cost more in waking torch's thread pool than in the
    op itself on a 2-core machine (log_softmax of a [4, 3] table: ~7 ms with 2 threads vs ~0.05 ms with 1 when the
    other core is busy); one thread per process is also what a pool of worker processes wants."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
