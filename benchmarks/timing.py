"""Median time of a callable after warm-up, its peak memory, and the device's matmul rate and copy bandwidth.

CPU: ``time.perf_counter`` around each call. CUDA: a pair of device events around each call, read
after one ``torch.cuda.synchronize``, optionally with the L2 cache flushed (outside the events) first.
The number of calls adapts to the callable so they add up to ``min_time`` seconds, within
``[min_repeats, max_repeats]`` and, past ``min_repeats``, within ``max_time``. ``rounds`` is how many
times a runner should alternate its contenders, each keeping its best median (load drift, e.g. a
compiler running beside the benchmark, then hits every contender alike).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass(frozen=True)
class TimingConfig:
    warmup: int
    min_time: float
    max_time: float
    min_repeats: int
    max_repeats: int
    rounds: int


FULL = TimingConfig(warmup=3, min_time=0.2, max_time=2.0, min_repeats=5, max_repeats=2000, rounds=3)
QUICK = TimingConfig(warmup=1, min_time=0.02, max_time=0.2, min_repeats=3, max_repeats=100, rounds=1)


@dataclass(frozen=True)
class Measurement:
    median_ms: float
    repeats: int
    peak_bytes: int | None
    """CUDA: bytes allocated above what was allocated before the call; None on the CPU."""


def measure(
    fn: Callable[[], object], device: torch.device, config: TimingConfig, flush_l2: bool = False
) -> Measurement:
    """Warm `fn` up, then time it `repeats` times and measure its peak memory once."""
    for _ in range(config.warmup):
        fn()
    estimate = statistics.median(_times(fn, device, 3, flush_l2))
    repeats = math.ceil(config.min_time / max(estimate, 1e-9))
    repeats = min(repeats, config.max_repeats, max(1, int(config.max_time / max(estimate, 1e-9))))
    repeats = max(repeats, config.min_repeats)
    times = _times(fn, device, repeats, flush_l2)
    return Measurement(statistics.median(times) * 1e3, repeats, peak_memory(fn, device))


def _times(fn: Callable[[], object], device: torch.device, repeats: int, flush_l2: bool) -> list[float]:
    """Seconds per call, one entry per call."""
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times
    scratch = _l2_scratch(device) if flush_l2 else None
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)
    ]
    torch.cuda.synchronize(device)
    for start, end in events:
        if scratch is not None:
            scratch.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def _l2_scratch(device: torch.device) -> torch.Tensor:
    """A buffer twice the L2 cache: writing it evicts whatever the last call left there."""
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 128 * 2**20
    return torch.empty(2 * l2_bytes, dtype=torch.uint8, device=device)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """CUDA: peak bytes allocated while `fn` runs, above what was allocated before. CPU: None."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def matmul_rate(device: torch.device, dtype: torch.dtype, config: TimingConfig, n: int = 8192) -> float:
    """FLOP/s of one large square ``torch.mm`` in `dtype` on `device` (the yardstick for GEMMs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    result = measure(lambda: torch.mm(a, b), device, config)
    return 2 * n**3 / (result.median_ms / 1e3)


def copy_size(device: torch.device) -> int:
    """Bytes of the copy that measures `device`'s bandwidth: 1 GiB on a GPU; on the CPU at least 128 MiB and
    twice the last-level cache. A copy that fits the cache times the cache, not memory (the L3 of a
    server CPU reaches hundreds of MiB: 260 MiB on the Xeon this suite runs on in CI)."""
    if device.type == "cuda":
        return 1 << 30
    return max(128 << 20, 2 * last_level_cache_bytes())


def last_level_cache_bytes() -> int:
    """The largest data or unified cache of CPU 0 from Linux's sysfs; 0 where it cannot be read."""
    sizes = [0]
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip().upper()  # e.g. "266240K"
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        digits = size.rstrip("KMG")
        sizes.append(int(digits) * unit if digits.isdigit() else 0)
    return max(sizes)


def copy_bandwidth(device: torch.device, config: TimingConfig, n_bytes: int | None = None) -> float:
    """Bytes read + written per second by one large copy within `device` (the memory-bound yardstick), of
    ``copy_size(device)`` bytes unless `n_bytes` says otherwise."""
    n_bytes = n_bytes or copy_size(device)
    # Written, not just allocated: the CPU maps pages never written to one shared page of zeros, which a copy
    # then reads from the cache instead of memory.
    src = torch.ones(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    result = measure(lambda: dst.copy_(src), device, config)
    return 2 * n_bytes / (result.median_ms / 1e3)


def kernel_count(fn: Callable[[], object]) -> int:
    """CUDA kernels one call of `fn` launches (memsets and copies not counted), by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(
        1
        for e in prof.events()
        if e.device_type.name == "CUDA" and not e.name.lower().startswith(("memset", "memcpy"))
    )
