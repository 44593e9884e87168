"""`make gpu-check` (benchmarks/gpu_check.py) on a machine without a GPU: its dry run passes every step and
records the summary in the results; a missing compute-sanitizer, a step past its time box and a step with
no time left fail visibly; the suite's time budget leaves cases out and says so."""

from __future__ import annotations

import dataclasses
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check
from tests.conftest import require_backend

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_passes_every_step_and_records_the_summary_in_the_results(tmp_path):
    require_backend("cpu", "cpu")
    pytest.importorskip("matplotlib", reason="the suite plots its results with matplotlib")
    out, logs = tmp_path / "results", tmp_path / "logs"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry", "--out", str(out), "--logs", str(logs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    table = [line for line in (logs / "summary.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0][2:] for line in table] == [
        "build",
        "kernels",
        "pytest -m gpu",
        "memcheck (cuda)",
        "racecheck (cuda)",
        "bench",
        "memcheck (triton)",
    ]
    assert all(line.split(" | ")[1] == "passed" for line in table), table
    assert "kernel pass: " in table[1] and " 0 mismatches" in table[1]
    assert "tests collected" in table[2] and "compute-sanitizer" in table[3]
    (results,) = out.glob("*.json")  # into --out, never into benchmarks/results
    record = json.loads(results.read_text())["header"]["gpu_check"]
    assert record["dry"] and len(record["steps"]) == 7 and record["total_s"] < record["budget_s"]
    assert "## gpu-check" in results.with_suffix(".md").read_text()
    assert {path.name for path in logs.glob("*.log")} >= {"1-build.log", "6-bench.log"}
    # What a GPU run would run is printed, sanitizer and all.
    assert "--tool racecheck --error-exitcode 1" in done.stdout and "--kernel-name kns=genfast" in done.stdout


def test_make_gpu_check_runs_the_script_and_dry_1_its_dry_run():
    # --no-print-directory: under `make test` (CI) this make is a sub-make, which would print "Leaving directory".
    commands = {
        dry: [
            line
            for line in subprocess.run(
                ["make", "--no-print-directory", "-n", "gpu-check", *dry],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.splitlines()
            if "benchmarks.gpu_check" in line
        ][-1]
        for dry in ((), ("DRY=1",))
    }
    assert commands[()].split()[1:] == ["-m", "benchmarks.gpu_check"]
    assert commands[("DRY=1",)].split()[1:] == ["-m", "benchmarks.gpu_check", "--dry"]


def test_compute_sanitizer_is_found_in_cuda_home(tmp_path, monkeypatch):
    sanitizer = tmp_path / "cuda" / "bin" / "compute-sanitizer"
    sanitizer.parent.mkdir(parents=True)
    sanitizer.write_text("#!/bin/sh\n")
    sanitizer.chmod(sanitizer.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert gpu_check.find_sanitizer() == str(sanitizer)


def test_without_compute_sanitizer_the_sanitizer_steps_fail_and_say_so(tmp_path):
    steps = {step.name: step for step in gpu_check.plan(dry=False, out=tmp_path, sanitizer=None)}
    sanitized = [name for name in steps if "check (" in name]
    assert sanitized == ["memcheck (cuda)", "racecheck (cuda)", "memcheck (triton)"]
    for name in sanitized:
        assert steps[name].missing.startswith("compute-sanitizer not found (PATH, $CUDA_HOME/bin")
        assert steps[name].missing.endswith(": skipped")
    assert not any(step.missing for name, step in steps.items() if name not in sanitized)


def _step(name: str, code: str, cap: float = 30, floor: float = 0.5, **kw) -> gpu_check.Step:
    return gpu_check.Step(name, [sys.executable, "-c", code], cap, floor, **kw)


def test_a_failing_step_a_missing_tool_and_a_step_past_its_time_box_fail_and_the_rest_go_on(
    tmp_path, monkeypatch
):
    steps = [
        _step("broken", "import sys; sys.exit(3)"),
        _step("missing", "", missing="compute-sanitizer not found: skipped"),
        _step("slow", "import time; print('started', flush=True); time.sleep(60)", cap=2),
        _step("fine", "print('all good')"),
    ]
    monkeypatch.setattr(gpu_check, "plan", lambda *args: steps)
    outcomes, seconds = gpu_check.check(dry=False, budget=100, out=tmp_path, logs=tmp_path / "logs")
    got = {o.step: (o.status, o.detail) for o in outcomes}
    assert got == {
        "broken": ("FAILED", "exit status 3; no output"),
        "missing": ("FAILED", "compute-sanitizer not found: skipped"),
        "slow": ("FAILED", got["slow"][1]),
        "fine": ("passed", "all good"),
    }
    assert got["slow"][1].startswith("timed out after 2 s; ")
    assert seconds < 30  # the sleeper was stopped at its time box
    assert (tmp_path / "logs" / "3-slow.log").read_text().startswith("started\n")


def test_steps_leave_later_steps_their_minimum_and_a_step_without_time_fails(tmp_path, monkeypatch):
    steps = [_step("early", "print('ran')", floor=1), _step("late", "print('ran')", floor=1000)]
    monkeypatch.setattr(gpu_check, "plan", lambda *args: steps)
    outcomes, _ = gpu_check.check(dry=False, budget=100, out=tmp_path, logs=tmp_path / "logs")
    assert [o.status for o in outcomes] == ["FAILED", "FAILED"]
    assert outcomes[0].detail == "not run: 0 s of the 100 s budget left for it, it needs 1 s"
    assert outcomes[1].detail.startswith("not run: 100 s of the 100 s budget left for it, it needs 1000 s")


@pytest.mark.filterwarnings("ignore:load average")  # the suite's warning of a busy machine: nothing is timed
def test_the_suite_stops_starting_cases_when_its_time_budget_runs_out(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="the suite plots its results with matplotlib")
    from benchmarks import runner

    clock = iter([0.0, 1.0, 100.0])  # the start, then before the first and the second case

    class FakeTime:
        @staticmethod
        def monotonic() -> float:
            return next(clock)

    def row(family, case, *args) -> dict:  # a measured row, without the minutes of measuring
        return {
            "family": "losses",
            "case": case.name,
            "params": dataclasses.asdict(case),
            "flops": 0,
            "results": {"genfast:cpu": {"median_ms": 1.0}, "eager": {"median_ms": 2.0}},
            "ratios": {"eager/genfast:cpu": 2.0},
        }

    monkeypatch.setattr(runner, "time", FakeTime)
    monkeypatch.setattr(runner, "_row", row)
    path = runner.run(device="cpu", cases=["losses"], quick=True, out=tmp_path, time_budget=50)
    result = json.loads(path.read_text())
    first, second = (case.name for case in runner.FAMILIES["losses"].QUICK_CASES["cpu"])
    assert [r["case"] for r in result["rows"]] == [first]
    assert result["header"]["settings"]["not_run"] == [second]
    assert "1 case(s) not run: the 50 s time budget ran out" in path.with_suffix(".md").read_text()

    clock = iter([0.0, 100.0, 100.0])
    with pytest.raises(RuntimeError, match="ran out before the first case"):
        runner.run(device="cpu", cases=["losses"], quick=True, out=tmp_path / "none", time_budget=50)
    assert not (tmp_path / "none").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
