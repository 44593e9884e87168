"""Writes a run's results: <slug>.json (everything), <slug>.md (a table), <slug>.png (speed-ups)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from benchmarks.environment import slug  # noqa: E402

_METHOD = ("Median of many calls after warm-up ({clock}); the contenders alternate for {rounds} round(s), "
           "each keeping its best median. Ratios are baseline time / genfast time: "
           "> 1 means genfast is faster. forward runs as in training (the inputs that take gradients require them); "
           "backward is timed alone on a retained graph; both is forward + backward; "
           "a train step is forward, backward and the optimizer step (steps/s from the same median).")


def write(out: Path, header: dict, rows: list[dict], suffix: str = "") -> Path:
    """Write the three files for `header`'s device (+ suffix) into `out`; return the JSON's path."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (slug(header["device"]) + suffix)
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(header, rows))
    _plot(header, rows, stem.with_suffix(".png"))
    return json_path


def _provenance(header: dict) -> str:
    git = header["git"]
    commit = f"{(git['commit'] or 'unknown')[:12]}{' (dirty)' if git['dirty'] else ''}"
    build = header["genfast"]
    load = ", ".join(f"{when} {'/'.join(f'{v:.1f}' for v in values)}"
                     for when, values in header["load_average"].items())
    return (f"commit {commit}, {header['date']}, {header['device']}, driver {header['driver'] or 'n/a'}, "
            f"torch {header['torch']}, triton {header['triton'] or 'n/a'}, CUDA {header['cuda'] or 'n/a'}, "
            f"genfast {build['version']} (backends {', '.join(build['backends'])}), "
            f"{header['threads']} threads, load average (1/5/15 min) {load}")


def _contenders(rows: list[dict]) -> list[str]:
    """Every contender that appears, in the order they first appear."""
    return list(dict.fromkeys(name for row in rows for name in row["results"]))


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _percent(result: dict | None, key: str) -> str:
    return f"{100 * result[key]:.0f}%" if result and key in result else "—"


def markdown(header: dict, rows: list[dict]) -> str:
    """The results as a Markdown table, one line per case, headed by where they came from."""
    names = _contenders(rows)
    ratios = list(dict.fromkeys(key for row in rows for key in row["ratios"]))
    on_gpu = header["device_type"] == "cuda"
    genfast_names = [n for n in names if n.startswith("genfast:")]
    fractions = [(key, label) for key, label in (("matmul_fraction", "matmul rate"),
                                                 ("bandwidth_fraction", "bandwidth"))
                 if any(key in r for row in rows for r in row["results"].values())]
    steps = any("steps_per_s" in r for row in rows for r in row["results"].values())
    columns = (["case"] + [f"{n} ms" for n in names] + ([f"{n} steps/s" for n in names] if steps else []) + ratios
               + [f"peak MB ({' / '.join(names)})" if on_gpu else "peak MB"]
               + ([f"{n} % of {label}" for _, label in fractions for n in genfast_names]
                  + [f"kernels ({' / '.join(names)})"] if on_gpu else []))
    lines = [f"# genfast benchmarks: {header['device']}", "", _provenance(header), "",
             _METHOD.format(clock="CUDA events" if on_gpu else "time.perf_counter per call",
                          rounds=header["settings"]["timing"]["rounds"]), "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        results = row["results"]
        cells = [row["case"]] + [_ms(results[n]["median_ms"]) if n in results else "—" for n in names]
        if steps:
            cells += [_ms(results[n].get("steps_per_s")) if n in results else "—" for n in names]
        cells += [f"{row['ratios'][key]:.2f}" if key in row["ratios"] else "—" for key in ratios]
        if on_gpu:
            cells.append(" / ".join(f"{results[n]['peak_bytes'] / 2**20:.1f}" if n in results else "—"
                                    for n in names))
            cells += [_percent(results.get(n), key) for key, _ in fractions for n in genfast_names]
            cells.append(" / ".join(str(results[n].get("kernels", "—")) if n in results else "—" for n in names))
        else:
            cells.append("n/a (CPU)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(header: dict, rows: list[dict], path: Path) -> None:
    """Horizontal bars of every ratio per case, log2 axis, a line at 1.0 (parity)."""
    ratios = list(dict.fromkeys(key for row in rows for key in row["ratios"]))
    height = 0.8 / max(len(ratios), 1)
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.22 * len(ratios) * len(rows)))
    for i, key in enumerate(ratios):
        positions = [r - 0.4 + height * (i + 0.5) for r in range(len(rows))]
        bars = ax.barh(positions, [row["ratios"].get(key, 0) for row in rows], height=height, label=key)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=2)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.set_yticks(range(len(rows)), [row["case"] for row in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("baseline time / genfast time  (> 1: genfast faster)")
    ax.set_title(f"genfast speed-up\n{_provenance(header)}", fontsize=8, wrap=True)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    temporary = path.with_suffix(".png.tmp")
    fig.savefig(temporary, format="png", dpi=110)
    plt.close(fig)
    os.replace(temporary, path)
