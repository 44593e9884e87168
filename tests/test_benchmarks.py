"""The benchmark suite runs end to end (a quick CPU run) and writes what it promises."""

from __future__ import annotations

import json

import pytest

benchmarks = pytest.importorskip("benchmarks")
pytest.importorskip("matplotlib", reason="the suite plots its results with matplotlib")


@pytest.mark.parametrize("family", ["dense", "losses", "reparam", "training"])
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
    assert path.with_suffix(".png").stat().st_size > 1000
