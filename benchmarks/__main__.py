"""Command line of the benchmark suite: ``python -m benchmarks --device cpu --quick``."""

from __future__ import annotations

import argparse

import torch

from benchmarks.cases import FAMILIES
from benchmarks.runner import run


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="+", choices=sorted(FAMILIES), default=sorted(FAMILIES),
                        help="op families to run")
    parser.add_argument("--quick", action="store_true", help="few shapes and repeats: a smoke run")
    parser.add_argument("--flush-l2", action="store_true", help="CUDA: flush the L2 cache before each call")
    parser.add_argument("--out", default="benchmarks/results", help="folder for <device>.json/.md/.png")
    args = parser.parse_args()
    path = run(device=args.device, cases=args.cases, quick=args.quick, out=args.out, flush_l2=args.flush_l2)
    print(f"wrote {path} and its .md and .png")


if __name__ == "__main__":
    main()
