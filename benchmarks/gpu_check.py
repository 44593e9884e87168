"""``make gpu-check``: the one command for a GPU machine (DESIGN.md, Tests), with no network needed.

Steps, each time-boxed so that the whole check ends inside the budget (default 480 s: under 9 minutes on an
H100/H200, the build included), each timed, the next one run whatever the last one did:

1. build: ``make .venv/.built`` (the CUDA kernels for sm_80/sm_90, with python3's CUDA PyTorch);
2. kernels: ``python -m benchmarks.kernel_pass`` on the cuda and triton backends, no sanitizer (a fault
   here is not a memory error);
3. ``pytest -m gpu`` (spread over several processes when pytest-xdist is installed);
4. compute-sanitizer memcheck over the kernel pass on the cuda backend (every launch checked, cuBLASLt's
   too, PyTorch's caching allocator off so that each tensor is its own allocation);
5. compute-sanitizer racecheck over the kernel pass, float32 and bfloat16, genfast's own kernels only;
6. the benchmark suite on cuda, quick, into ``benchmarks/results/<gpu>.json|.md|-<family>.png`` (it stops
   starting cases when its time box runs out and says so in the report);
7. compute-sanitizer memcheck over the kernel pass on the triton backend, float32 and bfloat16.

A step that cannot run (compute-sanitizer not found, no time left) counts as failed. The summary table
(step, status, seconds, detail) is printed, written to <logs>/summary.md and into the results' JSON and
Markdown; each step's output is in <logs>/<n>-<step>.log. Exit status 1 if any step failed.

``--dry`` (``make gpu-check DRY=1``; CI runs it in tests/test_gpu_check.py) builds every step's command as
on a GPU and runs a reduced form on the CPU: ``make -n`` for the build, the kernel pass on the cpu backend,
``pytest --collect-only -m gpu``, the sanitizer steps' own command line checked (``--help`` after its
arguments) without the sanitizer, and a quick CPU run of one benchmark family into a temporary folder.

This module imports neither torch nor genfast: the build step rewrites genfast's library in place.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
# 480 s for the steps; with `make`'s set-up before them, a last step stopped at its box (GRACE_S twice at
# most) and the report after them, the command ends inside 9 minutes. Each step's box (cap) and the least
# time it is started with (floor) are first guesses: tune them on the timings of a GPU run.
BUDGET_S = 480.0
GRACE_S = 10.0  # after SIGINT (pytest then prints what ran), before SIGKILL
_BENCH_REPORT_S = 45.0  # of the bench step's box: its last case (a torch.compile), the report and the plots
_TAIL_BYTES = 1 << 16


@dataclasses.dataclass
class Step:
    name: str
    command: list[str]
    cap: float  # seconds at most
    floor: float  # seconds it needs to be worth starting; kept free for it by the steps before
    summary: str | None = r".+"  # the output line, last match, that sums the step up (None: the note alone)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    missing: str | None = None  # why it cannot run: a failure
    note: str = ""  # said of a step that passed
    time_budget_flag: bool = False  # append --time-budget (the box less the report's time)
    gpu_command: list[str] | None = None  # dry: the command a GPU run would run


@dataclasses.dataclass
class Outcome:
    step: str
    status: str  # "passed" or "FAILED"
    seconds: float
    detail: str


def find_sanitizer() -> str | None:
    """compute-sanitizer: on PATH, in $CUDA_HOME, /usr/local/cuda*, or an nvidia-* pip package."""
    candidates = [shutil.which("compute-sanitizer")]
    roots = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        "/usr/local/cuda",
        *sorted(glob.glob("/usr/local/cuda-*"), reverse=True),
    ]
    for root in filter(None, roots):
        candidates += [f"{root}/bin/compute-sanitizer", f"{root}/compute-sanitizer/compute-sanitizer"]
    for site in sys.path:
        if site.endswith(("site-packages", "dist-packages")):
            candidates += sorted(glob.glob(f"{site}/nvidia/**/compute-sanitizer", recursive=True))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


SANITIZER_PLACES = "PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin, the nvidia-* pip packages"


def plan(dry: bool, out: Path, sanitizer: str | None) -> list[Step]:
    """The steps, with their commands as on a GPU, or (`dry`) their reduced forms on the CPU."""
    py = sys.executable
    kernel_pass = [py, "-m", "benchmarks.kernel_pass", "--device", "cuda"]
    pytest = [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    workers = min(8, (os.cpu_count() or 1) // 2)
    xdist = ["-n", str(workers)] if importlib.util.find_spec("xdist") and workers > 1 else []
    bench = [py, "-m", "benchmarks", "--quick", "--out", str(out)]
    steps = [
        Step("build", ["make", "--no-print-directory", ".venv/.built"], 240, 60),
        Step("kernels", [*kernel_pass, "--backend", "cuda", "triton"], 45, 15, _KERNEL_PASS),
        # Several processes share the GPU when pytest-xdist is there: Triton's compiles take most of the time.
        Step("pytest -m gpu", [*pytest, *xdist], 150, 60, _PYTEST),
        *(_sanitized(name, sanitizer, kernel_pass + args) for name, args in _SANITIZER_PASSES[:2]),
        Step("bench", [*bench, "--device", "cuda"], 150, 60, r"wrote .*", time_budget_flag=True),
        *(_sanitized(name, sanitizer, kernel_pass + args) for name, args in _SANITIZER_PASSES[2:]),
    ]
    if not dry:
        return steps
    reduced = {
        "build": (["make", "-n", *steps[0].command[1:]], "make -n"),
        "kernels": ([*kernel_pass[:3], "--device", "cpu", "--backend", "cpu"], "the cpu backend"),
        "pytest -m gpu": ([*pytest, "--collect-only"], "collected, not run"),
        "bench": ([*bench, "--device", "cpu", "--cases", "losses"], "cpu, losses only"),
    }
    found = (
        f"compute-sanitizer: {sanitizer}"
        if sanitizer
        else "compute-sanitizer not found (a GPU run fails this step)"
    )
    dry_steps = []
    for step in steps:
        if step.name in reduced:
            command, note = reduced[step.name]
            dry_steps.append(
                dataclasses.replace(step, command=command, gpu_command=step.command, note=f"dry: {note}")
            )
        else:  # a sanitizer step: the kernel pass's own parser checks its arguments, as on the GPU
            inner = step.command[step.command.index(py) :]
            dry_steps.append(
                dataclasses.replace(
                    step,
                    command=[*inner, "--help"],
                    gpu_command=step.command,
                    summary=None,
                    missing=None,
                    note=f"dry: arguments checked, not run; {found}",
                )
            )
    return dry_steps


_KERNEL_PASS = r"kernel pass: \d+ calls.*"
_PYTEST = r"(\d+ \w+.* in [\d.]+s.*)|(\d+.* tests? collected.*)"
# (step, the kernel pass's arguments): racecheck is slow, and only genfast's kernels share memory in ways it
# can judge; memcheck checks every launch (cuBLASLt's reads and writes of genfast's buffers too).
_SANITIZER_PASSES = (
    ("memcheck (cuda)", ["--backend", "cuda"]),
    ("racecheck (cuda)", ["--backend", "cuda", "--light"]),
    ("memcheck (triton)", ["--backend", "triton", "--light"]),
)


def _sanitized(name: str, sanitizer: str | None, kernel_pass: list[str]) -> Step:
    """The kernel pass under compute-sanitizer: error exit on any error, API errors left out (PyTorch and
    Triton probe with calls meant to fail; genfast checks each of its launches and raises)."""
    tool = name.split()[0]
    filters = ["--kernel-name", "kns=genfast"] if tool == "racecheck" else []
    # memcheck: PyTorch's caching allocator off, so that every tensor is an allocation of its own
    env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if tool == "memcheck" else {}
    command = [
        sanitizer or "compute-sanitizer",
        "--tool",
        tool,
        "--error-exitcode",
        "1",
        "--report-api-errors",
        "no",
        *filters,
        *kernel_pass,
    ]
    return Step(
        name,
        command,
        75 if name == "memcheck (cuda)" else 60,
        30,
        r"(=+ (ERROR|RACECHECK) SUMMARY: .*)|(" + _KERNEL_PASS + ")",
        env,
        None if sanitizer else f"compute-sanitizer not found ({SANITIZER_PLACES}): skipped",
    )


def run_step(step: Step, timeout: float, log: Path) -> Outcome:
    """Run `step` for at most `timeout` seconds, its output to the console and `log`; how it went."""
    command = step.command + (
        ["--time-budget", f"{max(timeout - _BENCH_REPORT_S, 1):.0f}"] if step.time_budget_flag else []
    )
    print(f"\n=== gpu-check: {step.name} (at most {timeout:.0f} s): {' '.join(command)}", flush=True)
    if step.gpu_command:
        print(f"=== (dry; on a GPU: {' '.join(step.gpu_command)})", flush=True)
    start = time.monotonic()
    tail = bytearray()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.env}
    with open(log, "wb") as sink:
        try:
            proc = subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # its own process group: a timeout ends all of it
        except OSError as error:
            return Outcome(step.name, "FAILED", 0.0, f"could not start: {error}")
        reader = threading.Thread(target=_copy, args=(proc.stdout, sink, tail), daemon=True)
        reader.start()
        timed_out = False
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            code = _stop(proc)
        reader.join(GRACE_S)
    seconds = time.monotonic() - start
    detail = _summary_line(tail.decode(errors="replace"), step.summary) if step.summary else ""
    if timed_out:
        return Outcome(step.name, "FAILED", seconds, f"timed out after {timeout:.0f} s; {detail}")
    if code != 0:
        return Outcome(step.name, "FAILED", seconds, f"exit status {code}; {detail}")
    return Outcome(step.name, "passed", seconds, "; ".join(filter(None, (step.note, detail))))


def _copy(stream, sink, tail: bytearray) -> None:
    """The child's output, as it comes (tqdm's carriage returns included), to the console and the log."""
    while chunk := os.read(stream.fileno(), 1 << 14):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        sink.write(chunk)
        tail.extend(chunk)
        del tail[:-_TAIL_BYTES]


def _stop(proc: subprocess.Popen) -> int:
    """SIGINT to the step's process group (pytest reports what ran), SIGKILL after a grace period; then
    SIGKILL to whatever is left of the group (pytest-xdist's workers), so that none holds the GPU."""
    code = None
    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            code = proc.wait(GRACE_S)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.wait() if code is None else code


def _summary_line(output: str, pattern: str) -> str:
    lines = [line.strip(" =") for line in re.split(r"[\r\n]+", output) if line.strip()]
    matches = [line for line in lines if re.search(pattern, line)]
    line = (matches or lines or ["no output"])[-1]
    return line if len(line) <= 160 else line[:157] + "..."


def check(dry: bool, budget: float, out: Path, logs: Path) -> tuple[list[Outcome], float]:
    """Run every step inside `budget` seconds; their outcomes and the seconds taken."""
    start = time.monotonic()
    logs.mkdir(parents=True, exist_ok=True)
    steps = plan(dry, out, find_sanitizer())
    outcomes = []
    for i, step in enumerate(steps):
        runnable = [s for s in steps[i + 1 :] if s.missing is None]
        room = budget - (time.monotonic() - start) - sum(s.floor for s in runnable)
        if step.missing:
            outcome = Outcome(step.name, "FAILED", 0.0, step.missing)
        elif room < step.floor:
            outcome = Outcome(
                step.name,
                "FAILED",
                0.0,
                f"not run: {max(room, 0):.0f} s of the {budget:.0f} s budget left for it, "
                f"it needs {step.floor:.0f} s",
            )
        else:
            slug = re.sub(r"[^a-z0-9]+", "-", step.name.lower()).strip("-")
            outcome = run_step(step, min(step.cap, room), logs / f"{i + 1}-{slug}.log")
        print(
            f"=== gpu-check: {outcome.step}: {outcome.status} in {outcome.seconds:.1f} s: {outcome.detail}",
            flush=True,
        )
        outcomes.append(outcome)
    return outcomes, time.monotonic() - start


def summary_lines(record: dict) -> list[str]:
    """The run's summary as Markdown: a sentence, then a table of steps (also in the results' report)."""
    steps = record["steps"]
    passed = sum(step["status"] == "passed" for step in steps)
    lines = [
        f"`make gpu-check{' DRY=1' if record['dry'] else ''}` at {record['commit']} on {record['device']}: "
        f"{passed} of {len(steps)} steps passed, {record['total_s']:.0f} s of a {record['budget_s']:.0f} s "
        "budget.",
        "",
        "| step | status | seconds | detail |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {s['step']} | {s['status']} | {s['seconds']:.1f} | {s['detail'].replace('|', '/')} |"
        for s in steps
    ]
    return lines


def _describe() -> tuple[str, str]:
    """The commit (-dirty if the tree differs from it) and the GPU, asked of git and nvidia-smi."""

    def ask(*command: str) -> str | None:
        try:
            return (
                subprocess.run(
                    command, cwd=REPO, capture_output=True, text=True, timeout=30, check=True
                ).stdout.strip()
                or None
            )
        except (OSError, subprocess.SubprocessError):
            return None

    gpu = ask("nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader")
    commit = ask("git", "describe", "--always", "--dirty", "--abbrev=12") or "unknown commit"
    return f"commit {commit}", gpu.splitlines()[0].replace(", ", " (driver ") + ")" if gpu else "no GPU seen"


def _record_in_results(record: dict, out: Path, since: float) -> str | None:
    """Add the summary to the results this run wrote and re-render their report; None, or what went wrong."""
    written = [p for p in out.glob("*.json") if p.stat().st_mtime >= since]
    if not written:
        return f"no results written into {out}: the summary is in the logs only"
    path = max(written, key=lambda p: p.stat().st_mtime)
    result = json.loads(path.read_text())
    result["header"]["gpu_check"] = record
    path.write_text(json.dumps(result, indent=1) + "\n")
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--render", str(path)], cwd=REPO, timeout=120)
    return f"rendering {path} failed" if done.returncode else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dry", action="store_true", help="the reduced form of each step, on the CPU")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")
    parser.add_argument(
        "--out", type=Path, help="results folder (default benchmarks/results; dry: a new temporary folder)"
    )
    parser.add_argument("--logs", type=Path, default=REPO / "build" / "gpu-check", help="each step's output")
    args = parser.parse_args(argv)
    out = (
        args.out
        or (
            Path(tempfile.mkdtemp(prefix="genfast-gpu-check-"))
            if args.dry
            else REPO / "benchmarks" / "results"
        )
    ).resolve()
    commit, device = _describe()
    started = time.time()
    outcomes, seconds = check(args.dry, args.budget, out, args.logs)
    record = {
        "dry": args.dry,
        "commit": commit,
        "device": "the CPU (dry run)" if args.dry else device,
        "budget_s": args.budget,
        "total_s": seconds,
        "steps": [dataclasses.asdict(o) for o in outcomes],
    }
    problem = _record_in_results(record, out, started)
    lines = summary_lines(record)
    (args.logs / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n=== gpu-check summary (also in " + str(args.logs / "summary.md") + ")\n" + "\n".join(lines))
    print(f"results: {out}" + (f" ({problem})" if problem else ""))
    return 1 if problem or any(o.status != "passed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
