"""Writes a run's results: <stem>.json (everything), <stem>.md (a summary, then every case) and one
<stem>-<family>.png per op family (the ratios). ``render`` redoes the last two from the JSON alone."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import geometric_mean
from typing import NamedTuple

from benchmarks import gpu_check
from benchmarks.environment import slug
from benchmarks.plot import plot_family

_METHOD = (
    "Median of many calls after warm-up ({clock}); the contenders alternate for {rounds} round(s), "
    "each keeping its best median. Ratios are baseline time / genfast time: "
    "> 1 means genfast is faster. forward runs as in training (the inputs that take gradients require them); "
    "backward is timed alone on a retained graph; both is forward + backward; "
    "a train step is forward, backward and the optimizer step (steps/s from the same median); "
    "an overhead case is one call of the op, forward and backward, at a small shape (µs/call from the same "
    "median)."
)
_BANDWIDTH = (
    " % of bandwidth: the least bytes any implementation must read and write for the case, per second of "
    "the median, over the measured copy bandwidth (bytes read + written per second); a case whose data fits "
    "the last-level cache can exceed 100%."
)
# Figures some families give per contender besides its time: (result key, column unit).
_PER_CONTENDER = (("steps_per_s", "steps/s"), ("us_per_call", "µs/call"))


def write(
    out: Path, header: dict, rows: list[dict], suffix: str = "", thread_scaling: dict | None = None
) -> Path:
    """Write the JSON for `header`'s device (+ suffix) into `out`, then its Markdown and plots; return its path.
    `thread_scaling`: the section ``thread_scaling.scaling`` makes, if the run timed several thread counts."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / (slug(header["device"]) + suffix + ".json")
    result = {"header": header, "rows": rows}
    if thread_scaling is not None:
        result["thread_scaling"] = thread_scaling
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    render(json_path)
    return json_path


def render(json_path: Path) -> list[Path]:
    """Write <stem>.md and <stem>-<family>.png beside `json_path` from it alone (the JSON is left as it is);
    return their paths. Run it (``python -m benchmarks --render X.json``) after changing this module."""
    result = json.loads(Path(json_path).read_text())
    header, rows = result["header"], result["rows"]
    plots = {}
    for family, family_rows in _by_family(rows).items():
        plots[family] = json_path.with_name(f"{json_path.stem}-{family}.png")
        plot_family(
            family_rows,
            f"genfast {family}: baseline time / genfast time, log scale (> 1: genfast faster)\n"
            + _provenance(header),
            plots[family],
        )
    md = json_path.with_suffix(".md")
    md.write_text(
        markdown(
            header, rows, {family: path.name for family, path in plots.items()}, result.get("thread_scaling")
        )
    )
    return [md, *plots.values()]


def _by_family(rows: list[dict]) -> dict[str, list[dict]]:
    families: dict[str, list[dict]] = {}
    for row in rows:
        families.setdefault(row["family"], []).append(row)
    return families


def _ratio_keys(rows: list[dict]) -> list[str]:
    """Every ratio column (baseline/genfast:backend), in the order they first appear."""
    return list(dict.fromkeys(key for row in rows for key in row["ratios"]))


class Summary(NamedTuple):
    geomean: float
    low: float
    high: float
    cases: int


def summary(rows: list[dict]) -> dict[str, dict[str, Summary]]:
    """Per op family, per ratio column: the geometric mean of the cases' ratios, their min, max and count.
    Geometric, because ratios multiply: 2x faster and 2x slower average to parity."""
    table = {}
    for family, family_rows in _by_family(rows).items():
        values: dict[str, list[float]] = {}
        for row in family_rows:
            for key, ratio in row["ratios"].items():
                values.setdefault(key, []).append(ratio)
        table[family] = {key: Summary(geometric_mean(v), min(v), max(v), len(v)) for key, v in values.items()}
    return table


def _summary_table(rows: list[dict], plots: dict[str, str]) -> list[str]:
    keys = _ratio_keys(rows)
    lines = [
        "Geometric mean of the ratios (baseline time / genfast time, > 1: genfast faster) per op family, "
        "with their min–max and the number of cases; each family links to its plot.",
        "",
        "| family | " + " | ".join(keys) + " |",
        "|" + "---|" * (len(keys) + 1),
    ]
    for family, by_key in summary(rows).items():
        cells = [f"[{family}]({plots[family]})" if family in plots else family]
        cells += [
            f"**{s.geomean:.2f}** ({s.low:.2f}–{s.high:.2f}, {s.cases})" if (s := by_key.get(key)) else "—"
            for key in keys
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _provenance(header: dict) -> str:
    git = header["git"]
    commit = f"{(git['commit'] or 'unknown')[:12]}{' (dirty)' if git['dirty'] else ''}"
    build = header["genfast"]
    load = ", ".join(
        f"{when} {'/'.join(f'{v:.1f}' for v in values)}" for when, values in header["load_average"].items()
    )
    settings = header["settings"]
    copy = settings.get("copy_bytes_per_s")
    # The yardstick of the memory-bound cases' "% of bandwidth", where they ran.
    yardstick = f", copy bandwidth {copy / 1e9:.1f} GB/s{_copy_size(settings)}" if copy else ""
    # A quick or time-limited run says so wherever its numbers appear.
    scope = (", quick run (few shapes and repeats)" if settings.get("quick") else "") + (
        f", {len(settings['not_run'])} case(s) not run: the {settings['time_budget_s']:g} s time budget ran out"
        if settings.get("not_run")
        else ""
    )
    return (
        f"commit {commit}, {header['date']}, {header['device']}, driver {header['driver'] or 'n/a'}, "
        f"torch {header['torch']}, triton {header['triton'] or 'n/a'}, CUDA {header['cuda'] or 'n/a'}, "
        f"genfast {build['version']} (backends {', '.join(build['backends'])}), "
        f"{header['threads']} threads{yardstick}, load average (1/5/15 min) {load}{scope}"
    )


def _copy_size(settings: dict) -> str:
    size = settings.get("copy_size_bytes")
    return f" (one {size / 2**20:.0f} MiB copy_)" if size else ""


def _contenders(rows: list[dict]) -> list[str]:
    """Every contender that appears, in the order they first appear."""
    return list(dict.fromkeys(name for row in rows for name in row["results"]))


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _percent(result: dict | None, key: str) -> str:
    if not result or key not in result:
        return "—"
    percent = 100 * result[key]
    return f"{percent:.0f}%" if percent >= 10 else f"{percent:.2g}%"  # two digits: a tiny case's 0.37%


def markdown(
    header: dict, rows: list[dict], plots: dict[str, str] | None = None, thread_scaling: dict | None = None
) -> str:
    """The results as Markdown, headed by where they came from: the summary per family (linking to `plots`,
    family -> file name), then one line per case, then the speed-ups per thread count if `thread_scaling`."""
    on_gpu = header["device_type"] == "cuda"
    lines = [
        f"# genfast benchmarks: {header['device']}",
        "",
        _provenance(header),
        "",
        "## Summary",
        "",
        *_summary_table(rows, plots or {}),
        "",
        "## Every case",
        "",
        _METHOD.format(
            clock="CUDA events" if on_gpu else "time.perf_counter per call",
            rounds=header["settings"]["timing"]["rounds"],
        )
        + (_BANDWIDTH if header["settings"].get("copy_bytes_per_s") else ""),
        "",
        *_case_table(rows, on_gpu),
    ]
    if thread_scaling:
        lines += ["", "## Thread scaling", "", *_thread_table(thread_scaling)]
    if "gpu_check" in header:  # the `make gpu-check` run these results came from: did every step pass?
        lines += ["", "## gpu-check", "", *gpu_check.summary_lines(header["gpu_check"])]
    return "\n".join(lines) + "\n"


def _case_table(rows: list[dict], on_gpu: bool) -> list[str]:
    names = _contenders(rows)
    ratios = _ratio_keys(rows)
    genfast_names = [n for n in names if n.startswith("genfast:")]
    fractions = [
        (key, label)
        for key, label in (("matmul_fraction", "matmul rate"), ("bandwidth_fraction", "bandwidth"))
        if any(key in r for row in rows for r in row["results"].values())
    ]
    extras = [
        (key, unit)
        for key, unit in _PER_CONTENDER
        if any(key in r for row in rows for r in row["results"].values())
    ]
    columns = (
        ["case"]
        + [f"{n} ms" for n in names]
        + [f"{n} {unit}" for _, unit in extras for n in names]
        + ratios
        + [f"peak MB ({' / '.join(names)})" if on_gpu else "peak MB"]
        + [f"{n} % of {label}" for _, label in fractions for n in genfast_names]
        + ([f"kernels ({' / '.join(names)})"] if on_gpu else [])
    )
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        results = row["results"]
        cells = [row["case"]] + [_ms(results[n]["median_ms"]) if n in results else "—" for n in names]
        cells += [_ms(results[n].get(key)) if n in results else "—" for key, _ in extras for n in names]
        cells += [f"{row['ratios'][key]:.2f}" if key in row["ratios"] else "—" for key in ratios]
        if on_gpu:
            cells.append(
                " / ".join(f"{results[n]['peak_bytes'] / 2**20:.1f}" if n in results else "—" for n in names)
            )
        else:
            cells.append("n/a (CPU)")
        cells += [_percent(results.get(n), key) for key, _ in fractions for n in genfast_names]
        if on_gpu:
            cells.append(
                " / ".join(str(results[n].get("kernels", "—")) if n in results else "—" for n in names)
            )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _thread_table(scaling: dict) -> list[str]:
    """Per case, each contender's speed-up from the fewest threads to each other count, after the copy's."""
    base, counts = str(scaling["base_threads"]), [str(count) for count in scaling["threads"]]
    others = counts[1:]
    names = list(dict.fromkeys(name for case in scaling["cases"] for name in case["speedup"]))
    columns = ["case"] + [f"{name} {base}→{count}" for count in others for name in names]
    copy = scaling["copy_bytes_per_s"]
    copy_line = (
        "The copy bandwidth, the ceiling of a memory-bound case, "
        + ", ".join(f"{copy[count] / 1e9:.1f} GB/s at {count}" for count in counts)
        + " thread(s): "
        + ", ".join(f"{copy[count] / copy[base]:.2f}x from {base} to {count}" for count in others)
        + "."
        if all(copy.get(count) for count in counts)
        else ""
    )
    cells = [
        [case["case"]]
        + [
            f"{case['speedup'][name][count]:.2f}" if count in case["speedup"].get(name, {}) else "—"
            for count in others
            for name in names
        ]
        for case in scaling["cases"]
    ]
    return [
        f"Speed-up from {base} thread(s) to each other count: median time at {base} / median time at that "
        f"count ({others[-1]}/{base} is a perfect split). Each case ran at every count in turn, "
        f"torch.compile compiled again at each. {copy_line}".rstrip(),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(row) + " |" for row in cells),
    ]
