"""Runs the selected families' cases and writes the results; ``run`` is the entry point."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm import tqdm

import genfast
from benchmarks import environment, report, thread_scaling, timing
from benchmarks.cases import FAMILIES


def run(
    device: str | None = None,
    cases: Sequence[str] = tuple(FAMILIES),
    quick: bool = False,
    out: str | os.PathLike = "benchmarks/results",
    flush_l2: bool = False,
    time_budget: float | None = None,
    threads: Sequence[int] | None = None,
) -> Path:
    """Benchmark the families `cases` on `device`; write <out>/<device>.json/.md/-<family>.png; return the JSON path.

    With `time_budget` (seconds), no case starts once that much time has passed since the call: the cases
    left out are listed in the results (``settings.not_run``), and if none ran nothing is written.

    With `threads` (CPU only), every case runs at each of these ``torch.set_num_threads`` counts: the results'
    rows are those at the largest, and ``thread_scaling`` holds the rest and each contender's speed-up from
    the fewest threads to each other count. Without, the cases run at the current count.

    Example: ``benchmarks.run(device="cpu", cases=["dense"], quick=True, out="/tmp/bench")``.
    """
    start = time.monotonic()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unknown = sorted(set(cases) - set(FAMILIES))
    if unknown:
        raise ValueError(f"cases: unknown families {unknown}; expected some of {sorted(FAMILIES)}")
    if threads and dev.type != "cpu":
        raise ValueError(f"threads: CPU thread counts, but the device is {dev.type}")
    counts = thread_scaling.counts(threads)
    config = timing.QUICK if quick else timing.FULL
    selected = [
        (FAMILIES[name], case)
        for name in cases
        for case in (FAMILIES[name].QUICK_CASES if quick else FAMILIES[name].CASES)[dev.type]
    ]
    _warn_if_busy()
    rates = _matmul_rates(dev, {case.dtype for _, case in selected if case.flops}, config)
    memory_bound = any(hasattr(case, "bytes") for _, case in selected)
    bandwidths = {}
    for count in counts:
        with thread_scaling.num_threads(count):
            bandwidths[count] = _bandwidth(dev, memory_bound, config)
    settings = {
        "quick": quick,
        "flush_l2": flush_l2,
        "timing": dataclasses.asdict(config),
        "matmul_flops_per_s": rates,
        "copy_bytes_per_s": bandwidths[counts[-1]],
        "copy_size_bytes": timing.copy_size(dev) if memory_bound else None,
        "time_budget_s": time_budget,
        "thread_counts": counts if threads else None,
    }
    with thread_scaling.num_threads(counts[-1]):
        header = environment.header(dev, settings)  # before the run: the commit and build that it timed
    rows_by_count: dict[int | None, list[dict]] = {count: [] for count in counts}
    not_run = []
    progress = tqdm(selected, desc=f"benchmarks ({dev.type})", unit="case")
    for family, case in progress:
        if time_budget is not None and time.monotonic() - start > time_budget:
            not_run.append(case.name)  # `make gpu-check` must end in time: a shorter, honest report
            continue
        progress.set_postfix_str(case.name)
        for count in counts:
            with thread_scaling.num_threads(count):
                if len(counts) > 1:
                    # Inductor's C++ kernels fix their thread count when compiled, and Dynamo does not guard
                    # on it: torch.compile's contender is compiled again at each count.
                    torch._dynamo.reset()
                row = _row(family, case, dev, config, flush_l2, rates, bandwidths[count])
                rows_by_count[count].append({**row, "threads": torch.get_num_threads()})
    rows = rows_by_count[counts[-1]]
    if not_run and not rows:
        raise RuntimeError(f"time_budget: {time_budget} s ran out before the first case; nothing written")
    settings["not_run"] = not_run
    header["load_average"] = {"start": header["load_average"], "end": os.getloadavg()}
    scaling = thread_scaling.scaling(rows_by_count, bandwidths) if len(counts) > 1 else None
    # A run of some families only gets its own files, leaving the whole suite's results in place.
    suffix = "" if set(cases) == set(FAMILIES) else "-" + "-".join(sorted(set(cases)))
    return report.write(Path(out), header, rows, suffix, scaling)


def _warn_if_busy() -> None:
    """Other work on the machine skews timings (CPU threads wait for each other): say so up front."""
    load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    if load > 0.5 * cores:
        warnings.warn(
            f"load average {load:.1f} on {cores} cores before the run: timings may be skewed "
            "(the header records the load average)",
            stacklevel=3,
        )


def _matmul_rates(device: torch.device, dtypes: set[str], config: timing.TimingConfig) -> dict[str, float]:
    """GPU only: the measured torch.mm FLOP/s per dtype, the yardstick of the GEMM cases."""
    if device.type != "cuda":
        return {}
    return {dtype: timing.matmul_rate(device, getattr(torch, dtype), config) for dtype in sorted(dtypes)}


def _bandwidth(device: torch.device, wanted: bool, config: timing.TimingConfig) -> float | None:
    """The measured copy bandwidth (bytes read + written per second), the yardstick of the memory-bound
    cases (those with a ``bytes`` figure); None if no case needs it."""
    return timing.copy_bandwidth(device, config) if wanted else None


def _row(
    family,
    case,
    device: torch.device,
    config: timing.TimingConfig,
    flush_l2: bool,
    rates: dict[str, float],
    bandwidth: float | None,
) -> dict:
    """Every contender of `case`, alternated for `config.rounds` rounds, each keeping its best median."""
    contenders = family.contenders(case, device)
    callables = {}
    for name, contender in contenders.items():
        with _pinned(contender.backend):
            callables[name] = contender.make()
    best: dict[str, timing.Measurement] = {}
    for _ in range(config.rounds):
        for name, fn in callables.items():
            with _pinned(contenders[name].backend):
                measured = timing.measure(fn, device, config, flush_l2)
            if name not in best or measured.median_ms < best[name].median_ms:
                best[name] = measured
    results = {name: dataclasses.asdict(measured) for name, measured in best.items()}
    for name, result in results.items():
        seconds = result["median_ms"] / 1e3
        if getattr(case, "steps", 0):  # training cases: optimizer steps per timed call
            result["steps_per_s"] = case.steps / seconds
        if getattr(case, "calls", 0):  # overhead cases: op calls per timed call
            result["us_per_call"] = seconds * 1e6 / case.calls
        if case.flops and case.dtype in rates:
            result["matmul_fraction"] = case.flops / seconds / rates[case.dtype]
        if bandwidth and hasattr(case, "bytes"):
            result["bandwidth_fraction"] = case.bytes / seconds / bandwidth
        if device.type == "cuda":
            with _pinned(contenders[name].backend):
                result["kernels"] = timing.kernel_count(callables[name])
    genfast_names = [n for n in results if n.startswith("genfast:")]
    ratios = {
        f"{base}/{g}": results[base]["median_ms"] / results[g]["median_ms"]
        for base in results
        if base not in genfast_names
        for g in genfast_names
    }
    return {
        "family": family.__name__.rsplit(".", 1)[-1],
        "case": case.name,
        "params": dataclasses.asdict(case),
        "flops": case.flops,
        "results": results,
        "ratios": ratios,
    }


@contextlib.contextmanager
def _pinned(backend: str | None) -> Iterator[None]:
    """Pin genfast's backend; None leaves the choice to genfast, as a user gets it."""
    if backend is None:
        yield
        return
    with genfast.use_backend(backend):
        yield
