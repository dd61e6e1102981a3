"""Timing helpers shared by ``qattn check`` and the benchmark: warm-up, median, and
rotating input sets so repeated calls do not just measure the L2 cache."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

__all__ = ["median_ms"]


def median_ms(
    fn: Callable[..., object],
    inputs: Sequence[tuple],
    *,
    warmup: int = 3,
    repeats: int = 20,
) -> float:
    """Median wall time in milliseconds of ``fn(*inputs[i])``, cycling over ``inputs``.

    On CUDA each call is bracketed by CUDA events on the current stream; on the CPU
    by ``time.perf_counter``. The first ``warmup`` calls (compilation, caches) are
    not timed.
    """
    device = None
    for x in inputs[0]:
        if isinstance(x, torch.Tensor):
            device = x.device
            break
    cuda = device is not None and device.type == "cuda"
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    times = []
    if cuda:
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for i, (start, end) in enumerate(events):
            start.record()
            fn(*inputs[i % len(inputs)])
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for i in range(repeats):
            t0 = time.perf_counter()
            fn(*inputs[i % len(inputs)])
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
