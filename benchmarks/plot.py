"""One op family's ratios as a picture that fits a screen: a panel per mode (forward, backward, ...), a line
per case, a marker per ratio column (colour: baseline; shape: genfast backend), on a log axis."""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

DPI = 100
MAX_INCHES = (18.0, 12.0)  # 1800 x 1200 pixels at DPI: a screen
_ROW_INCHES, _FRAME_INCHES = 0.22, 1.6  # per line of cases; title, legend and axis label
_NICE = (1, 1.1, 1.2, 1.5, 2, 3, 4, 5, 6, 7, 8, 9)
_MARKERS = "osD^v<>"


def plot_family(rows: list[dict], title: str, path: Path) -> None:
    """Draw `rows` (one family's) into the PNG `path`, headed by `title` (its lines wrapped to the width)."""
    modes = list(dict.fromkeys(row["params"]["mode"] for row in rows))
    labels = list(dict.fromkeys(_label(row) for row in rows))
    styles = _styles(list(dict.fromkeys(key for row in rows for key in row["ratios"])))
    values = [ratio for row in rows for ratio in row["ratios"].values()]
    limits = (min(min(values), 1) / 1.15, max(max(values), 1) * 1.15)
    width = min(MAX_INCHES[0], 3 + 4 * len(modes))
    height = min(MAX_INCHES[1], _FRAME_INCHES + _ROW_INCHES * len(labels))
    # Many cases are squeezed into the height cap: the labels shrink with the lines rather than overlap.
    fontsize = min(8.0, 0.75 * 72 * (height - _FRAME_INCHES) / len(labels))
    fig, axes = plt.subplots(
        1, len(modes), sharex=True, sharey=True, squeeze=False, figsize=(width, height), layout="constrained"
    )
    for ax, mode in zip(axes[0], modes):
        _panel(ax, [row for row in rows if row["params"]["mode"] == mode], labels, styles, limits)
        ax.set_title(mode, fontsize=9)
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=fontsize)
    axes[0][0].set_ylim(len(labels) - 0.5, -0.5)  # the first case on top, as in the Markdown
    # About 14 characters of 8-point text to the inch.
    fig.suptitle("\n".join(textwrap.fill(line, int(14 * width)) for line in title.splitlines()), fontsize=8)
    handles = [Line2D([], [], linestyle="", label=key, **style) for key, style in styles.items()]
    # A legend entry takes about 2.4 inches: in as many rows as the width needs.
    fig.legend(
        handles=handles, loc="outside lower center", ncols=min(len(handles), int(width // 2.4)), fontsize=8
    )
    temporary = path.with_suffix(".png.tmp")
    fig.savefig(temporary, format="png", dpi=DPI)
    plt.close(fig)
    os.replace(temporary, path)


def _label(row: dict) -> str:
    """The case without its mode: the modes of one shape share a line across the panels."""
    return row["case"].removesuffix(" " + row["params"]["mode"])


def _styles(keys: list[str]) -> dict[str, dict]:
    """A colour per baseline (eager, compile) and a marker per genfast backend, for each baseline/genfast key."""
    baselines = list(dict.fromkeys(key.split("/")[0] for key in keys))
    backends = list(dict.fromkeys(key.split("/")[1] for key in keys))
    return {
        key: {
            "color": f"C{baselines.index(key.split('/')[0])}",
            "marker": _MARKERS[backends.index(key.split("/")[1]) % len(_MARKERS)],
        }
        for key in keys
    }


def _panel(
    ax, rows: list[dict], labels: list[str], styles: dict[str, dict], limits: tuple[float, float]
) -> None:
    ax.set_xscale("log")
    ax.set_xlim(*limits)
    ax.axvspan(limits[0], 1, color="tab:red", alpha=0.06, linewidth=0)
    ax.axvspan(1, limits[1], color="tab:green", alpha=0.06, linewidth=0)
    ax.axvline(1, color="black", linewidth=1)
    for line in range(1, len(labels), 2):  # bands guide the eye along a line across the panels
        ax.axhspan(line - 0.5, line + 0.5, color="0.92", zorder=0)
    ticks = _ticks(*limits)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=8)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.grid(axis="x", alpha=0.4)
    line_of = {label: i for i, label in enumerate(labels)}
    for i, (key, style) in enumerate(styles.items()):
        # Each key a little apart on its line, so that equal ratios do not hide each other.
        offset = (i - (len(styles) - 1) / 2) * 0.6 / len(styles)
        points = [(row["ratios"][key], line_of[_label(row)] + offset) for row in rows if key in row["ratios"]]
        if points:
            ax.scatter(*zip(*points), s=16, zorder=3, **style)


def _ticks(low: float, high: float, count: int = 12) -> list[float]:
    """About `count` round ratios evenly spread over [low, high] on the log axis, 1 among them (the axis'
    own ticks, powers of ten, say nothing of a family whose ratios all lie between 0.9 and 1.2)."""
    gap = math.log(high / low) / count
    candidates = sorted(m * 10.0**e for e in range(-3, 3) for m in _NICE)
    ticks = [1.0]
    for side in ([c for c in candidates if 1 < c <= high], [c for c in reversed(candidates) if low <= c < 1]):
        last = 1.0
        for candidate in side:
            if abs(math.log(candidate / last)) >= gap:
                ticks.append(candidate)
                last = candidate
    return sorted(ticks)
