"""One timer for the library, the command line and the benchmarks: milliseconds of calls of fn().

Every timed region starts after a synchronize of the device. On CUDA the region is bracketed by CUDA
events, and ends when the end event has completed; on CPU by time.perf_counter. The callers keep
their own statistic: the format choice takes the median of batched samples
(sparse_ops.sparse.choice.time_forward), the command line and the benchmarks the median with the
20th and 80th percentiles.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on `device` (CUDA); nothing elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_ms(fn: Callable[[], object], device: torch.device | str, calls: int = 1) -> float:
    """Milliseconds per call of `calls` back-to-back fn() calls on `device`, timed as the module
    docstring says."""
    synchronize(device)
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3 / calls


def sample_ms(fn: Callable[[], object], device: torch.device | str, *, repeats: int, warmup: int = 0,
              calls: int = 1, setup: Callable[[], object] | None = None) -> list[float]:
    """`warmup` untimed samples, then `repeats` timed ones: each call_ms(fn, device, calls), with
    setup() (if given) run before every sample, outside the timed region."""
    samples = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        elapsed = call_ms(fn, device, calls)
        if i >= warmup:
            samples.append(elapsed)
    return samples
