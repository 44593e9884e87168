"""The benchmark suite runs end to end (a quick CPU run) and writes what it promises: a JSON, a Markdown
that opens with a summary per op family, and one plot per family that fits a screen."""

from __future__ import annotations

import copy
import itertools
import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch

benchmarks = pytest.importorskip("benchmarks")
pytest.importorskip("matplotlib", reason="the suite plots its results with matplotlib")
from benchmarks import report  # noqa: E402

COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "amd-epyc-2-cores.json"
SCREEN = (1800, 1200)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def family_plots(json_path: Path, families: set[str]) -> dict[str, Path]:
    return {family: json_path.with_name(f"{json_path.stem}-{family}.png") for family in families}


def summary_lines(markdown: str) -> list[str]:
    """The lines of the first table, which must come before any other."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    return list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))


@pytest.mark.parametrize("family", ["dense", "losses", "reparam", "training", "overhead"])
def test_quick_cpu_run_writes_json_markdown_and_plot(tmp_path, family):
    path = benchmarks.run(device="cpu", cases=[family], quick=True, out=tmp_path)
    result = json.loads(path.read_text())
    header = result["header"]
    for key in ("git", "date", "device", "torch", "triton", "cuda", "genfast"):
        assert key in header
    assert result["rows"], "no case ran"
    for row in result["rows"]:
        medians = {name: r["median_ms"] for name, r in row["results"].items()}
        assert {"eager", "compile"} <= set(medians) and any(n.startswith("genfast") for n in medians)
        assert all(m > 0 for m in medians.values()), medians
        for name, ratio in row["ratios"].items():
            baseline, ours = name.split("/")
            assert ratio == pytest.approx(medians[baseline] / medians[ours])
    assert path.with_suffix(".md").read_text().count("\n|") >= len(result["rows"])
    assert png_size(family_plots(path, {family})[family]) > (100, 100)
    assert_bandwidth_fractions(path, family)


def assert_bandwidth_fractions(path: Path, family: str) -> None:
    """A family with memory-bound cases (a ``bytes`` figure): the run measured the CPU's copy bandwidth, named
    it in the header line, and gave each contender of those cases its fraction of it, in the JSON and, for
    genfast, in the Markdown; any other family: none of it."""
    from benchmarks.cases import FAMILIES

    result = json.loads(path.read_text())
    settings, rows = result["header"]["settings"], result["rows"]
    memory_bound = hasattr(FAMILIES[family].QUICK_CASES["cpu"][0], "bytes")
    markdown = path.with_suffix(".md").read_text()
    columns = next(line for line in markdown.splitlines() if line.startswith("| case |"))
    if not memory_bound:
        assert settings["copy_bytes_per_s"] is None and "% of bandwidth" not in columns
        return
    bandwidth = settings["copy_bytes_per_s"]
    assert bandwidth > 0 and settings["copy_size_bytes"] >= 128 << 20
    assert f"copy bandwidth {bandwidth / 1e9:.1f} GB/s" in markdown.splitlines()[2]
    assert "| genfast:cpu % of bandwidth |" in columns
    cases = {case.name: case for case in FAMILIES[family].QUICK_CASES["cpu"]}
    for row in rows:
        for result in row["results"].values():
            expected = cases[row["case"]].bytes / (result["median_ms"] / 1e3) / bandwidth
            assert result["bandwidth_fraction"] == pytest.approx(expected)


def test_overhead_family_gives_each_op_per_call_in_microseconds_against_eager(tmp_path, monkeypatch):
    from benchmarks import runner, timing

    tiny = timing.TimingConfig(warmup=1, min_time=0.0, max_time=0.01, min_repeats=3, max_repeats=5, rounds=1)
    monkeypatch.setattr(timing, "QUICK", tiny)
    path = runner.run(device="cpu", cases=["overhead"], quick=True, out=tmp_path)
    rows = json.loads(path.read_text())["rows"]
    assert [row["case"] for row in rows] == [
        "fused_dense 64x100->128 relu fp32 both",
        "generator_loss nonsaturating 64x1 fp32 both",
        "reparameterize 64x20 fp32 both",
    ]
    for row in rows:
        assert {"genfast:auto", "eager", "compile"} < set(row["results"])  # and genfast on each backend
        for result in row["results"].values():
            assert (
                result["us_per_call"] == pytest.approx(1e3 * result["median_ms"]) and result["repeats"] <= 5
            )
        assert row["ratios"]["eager/genfast:auto"] == pytest.approx(
            row["results"]["eager"]["median_ms"] / row["results"]["genfast:auto"]["median_ms"]
        )
    columns = next(
        line for line in path.with_suffix(".md").read_text().splitlines() if line.startswith("| case |")
    )
    assert "| genfast:auto µs/call |" in columns and "| eager µs/call |" in columns


def test_thread_option_runs_each_case_at_each_count_and_reports_the_speed_up(tmp_path, monkeypatch):
    from benchmarks import runner, timing
    from benchmarks.cases import reparam

    tiny = timing.TimingConfig(warmup=1, min_time=0.0, max_time=0.01, min_repeats=3, max_repeats=5, rounds=1)
    monkeypatch.setattr(timing, "QUICK", tiny)
    monkeypatch.setitem(reparam.QUICK_CASES, "cpu", (reparam.ReparamCase("kl", 128, 20, "float32", "both"),))
    monkeypatch.setattr(
        timing, "copy_size", lambda device: 8 << 20
    )  # the yardstick's size is not tested here
    before = torch.get_num_threads()
    path = runner.run(device="cpu", cases=["reparam"], quick=True, out=tmp_path, threads=[2, 1])
    assert torch.get_num_threads() == before
    result = json.loads(path.read_text())
    header, rows, scaling = result["header"], result["rows"], result["thread_scaling"]
    assert header["threads"] == 2 and header["settings"]["thread_counts"] == [1, 2]
    assert [row["threads"] for row in rows] == [2] and [row["threads"] for row in scaling["rows"]] == [1]
    assert scaling["threads"] == [1, 2] and scaling["base_threads"] == 1
    assert all(scaling["copy_bytes_per_s"][count] > 0 for count in ("1", "2"))
    (case,) = scaling["cases"]
    assert case["case"] == rows[0]["case"] == "kl 128x20 fp32 both"
    one, two = scaling["rows"][0]["results"], rows[0]["results"]
    assert set(case["speedup"]) == set(two) and {"genfast:cpu", "eager", "compile"} <= set(two)
    for name, speedup in case["speedup"].items():
        assert speedup == {"2": pytest.approx(one[name]["median_ms"] / two[name]["median_ms"])}
    markdown = path.with_suffix(".md").read_text()
    section = markdown.split("\n## Thread scaling\n")[1].splitlines()
    columns = next(line for line in section if line.startswith("| case |"))
    assert columns == "| case | genfast:cpu 1→2 | eager 1→2 | compile 1→2 |"
    line = next(line for line in section if line.startswith("| kl 128x20 fp32 both |"))
    assert (
        line
        == "| kl 128x20 fp32 both | "
        + " | ".join(f"{case['speedup'][name]['2']:.2f}" for name in ("genfast:cpu", "eager", "compile"))
        + " |"
    )
    assert "GB/s at 1, " in next(line for line in section if line)  # the copy bandwidth per count


def test_thread_counts_are_for_the_cpu_and_at_least_one():
    from benchmarks import thread_scaling

    assert thread_scaling.counts(None) == [None] and thread_scaling.counts([4, 1, 2, 1]) == [1, 2, 4]
    with pytest.raises(ValueError, match="threads"):
        thread_scaling.counts([0, 1])
    with pytest.raises(ValueError, match="threads: CPU"):
        benchmarks.run(device="cuda", cases=["reparam"], quick=True, threads=[1, 2])


def _row(family: str, case: str, ratios: dict[str, float]) -> dict:
    return {"family": family, "case": case, "params": {"mode": "both"}, "results": {}, "ratios": ratios}


def test_summary_is_the_geometric_mean_min_max_and_count_per_family_and_ratio_column():
    rows = [
        _row("dense", "a", {"eager/genfast:cpu": 2.0, "compile/genfast:cpu": 0.5}),
        _row("dense", "b", {"eager/genfast:cpu": 8.0, "compile/genfast:cpu": 3.0}),
        _row("dense", "c", {"eager/genfast:cpu": 1.5}),
        _row("losses", "d", {"eager/genfast:cpu": 0.25}),
    ]
    table = report.summary(rows)
    assert set(table) == {"dense", "losses"} and set(table["losses"]) == {"eager/genfast:cpu"}
    eager = table["dense"]["eager/genfast:cpu"]
    assert eager.geomean == pytest.approx((2.0 * 8.0 * 1.5) ** (1 / 3))
    assert (eager.low, eager.high, eager.cases) == (1.5, 8.0, 3)
    assert table["dense"]["compile/genfast:cpu"].geomean == pytest.approx(math.sqrt(1.5))
    assert table["losses"]["eager/genfast:cpu"] == (pytest.approx(0.25), 0.25, 0.25, 1)


def test_rendering_the_committed_results_gives_a_summary_first_and_plots_that_fit_a_screen(tmp_path):
    json_path = tmp_path / COMMITTED.name
    shutil.copy(COMMITTED, json_path)
    rows = json.loads(COMMITTED.read_text())["rows"]
    families = {row["family"] for row in rows}
    written = report.render(json_path)
    assert json_path.read_bytes() == COMMITTED.read_bytes(), "rendering must leave the measurements alone"
    plots = family_plots(json_path, families)
    assert set(written) == {json_path.with_suffix(".md"), *plots.values()}
    for path in plots.values():
        width, height = png_size(path)
        assert 300 <= width <= SCREEN[0] and 300 <= height <= SCREEN[1], (path.name, width, height)
    markdown = json_path.with_suffix(".md").read_text()
    title, _, provenance, _, heading = markdown.splitlines()[:5]
    assert title.startswith("# genfast benchmarks: ") and provenance.startswith("commit 280a4d8534d3")
    assert heading == "## Summary" and markdown.index(heading) < markdown.index("| case |")
    summary = summary_lines(markdown)
    assert summary[0].startswith("| family | ") and len(summary) == 2 + len(families)
    dense = next(line for line in summary if line.startswith("| [dense](amd-epyc-2-cores-dense.png) |"))
    eager = [row["ratios"]["eager/genfast:cpu"] for row in rows if row["family"] == "dense"]
    expected = math.exp(sum(map(math.log, eager)) / len(eager))
    assert f"**{expected:.2f}** ({min(eager):.2f}–{max(eager):.2f}, {len(eager)})" in dense


def _gpu_results(shapes: int) -> tuple[dict, list[dict]]:
    """A GPU-like run, as the suite writes it: three genfast backends, peak bytes, bandwidth, kernel counts."""
    header = copy.deepcopy(json.loads(COMMITTED.read_text())["header"])
    header.update(device="NVIDIA H200", device_type="cuda", driver="580.1")
    names = ("genfast:auto", "genfast:cuda", "genfast:triton", "eager", "compile")
    rows = []
    for family, shape, mode in itertools.product(
        ("dense", "reparam"), range(shapes), ("forward", "backward", "both")
    ):
        results = {
            name: {
                "median_ms": 0.1 * (1 + (shape + i) % 7),
                "repeats": 100,
                "peak_bytes": 3 * 2**20,
                "bandwidth_fraction": 0.25 * (1 + i % 3),
                "kernels": 1 + i,
            }
            for i, name in enumerate(names)
        }
        ratios = {
            f"{base}/{ours}": results[base]["median_ms"] / results[ours]["median_ms"]
            for base in ("eager", "compile")
            for ours in names[:3]
        }
        rows.append(
            {
                "family": family,
                "case": f"{family} {64 * (shape + 1)}x784 bf16 {mode}",
                "params": {"batch": shape, "dtype": "bfloat16", "mode": mode},
                "flops": 0,
                "results": results,
                "ratios": ratios,
            }
        )
    return header, rows


def test_gpu_results_keep_their_columns_and_many_cases_still_fit_a_screen(tmp_path):
    header, rows = _gpu_results(shapes=70)  # more lines per plot than any family of the GPU suite
    json_path = report.write(tmp_path, header, rows)
    assert json_path.name == "nvidia-h200.json"
    for path in family_plots(json_path, {"dense", "reparam"}).values():
        width, height = png_size(path)
        assert width <= SCREEN[0] and height <= SCREEN[1], (path.name, width, height)
    markdown = json_path.with_suffix(".md").read_text()
    summary = summary_lines(markdown)
    assert summary[0] == "| family | " + " | ".join(rows[0]["ratios"]) + " |"
    assert len(summary) == 4 and all(line.count(", 210)") == 6 for line in summary[2:])
    columns = next(line for line in markdown.splitlines() if line.startswith("| case |")).split(" | ")
    assert "peak MB (genfast:auto / genfast:cuda / genfast:triton / eager / compile)" in columns
    assert "genfast:triton % of bandwidth" in columns
    first = next(line for line in markdown.splitlines() if line.startswith("| dense 64x784 bf16 forward |"))
    assert "| 3.0 / 3.0 / 3.0 / 3.0 / 3.0 |" in first and "| 25% | 50% | 75% |" in first
    assert first.endswith("| 1 / 2 / 3 / 4 / 5 |")
