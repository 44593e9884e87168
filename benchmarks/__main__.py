"""Command line of the benchmark suite: ``python -m benchmarks --device cpu --quick``; after a change to the
report, ``python -m benchmarks --render benchmarks/results/<device>.json`` redraws its Markdown and plots."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks import report
from benchmarks.cases import FAMILIES
from benchmarks.runner import run


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--cases", nargs="+", choices=sorted(FAMILIES), default=sorted(FAMILIES), help="op families to run"
    )
    parser.add_argument("--quick", action="store_true", help="few shapes and repeats: a smoke run")
    parser.add_argument("--flush-l2", action="store_true", help="CUDA: flush the L2 cache before each call")
    parser.add_argument(
        "--out", default="benchmarks/results", help="folder for <device>.json/.md/-<family>.png"
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="start no case after this many seconds; the report lists the cases left out",
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        metavar="N",
        help="CPU: run every case at each of these torch.set_num_threads counts (e.g. --threads 1 2) and "
        "report each contender's speed-up from the fewest to the others; default: the current count only",
    )
    parser.add_argument(
        "--render",
        metavar="JSON",
        type=Path,
        help="run nothing: rewrite the Markdown and plots of these results (the JSON is left as it is)",
    )
    args = parser.parse_args()
    if args.threads and (args.device != "cpu" or min(args.threads) < 1):
        parser.error("--threads: CPU thread counts >= 1, with --device cpu")
    if args.render and not args.render.is_file():
        parser.error(f"--render: no results file {args.render}")
    if args.render:
        print("wrote " + ", ".join(map(str, report.render(args.render))))
        return
    path = run(
        device=args.device,
        cases=args.cases,
        quick=args.quick,
        out=args.out,
        flush_l2=args.flush_l2,
        time_budget=args.time_budget,
        threads=args.threads,
    )
    print(f"wrote {path}, its .md and a .png per op family")


if __name__ == "__main__":
    main()
