"""Where the fused dense kernel starts to beat PyTorch's own ops: the size behind EAGER_BELOW.

``python -m benchmarks.crossover --device cpu`` times forward+backward of the pinned kernel and of
eager ``F.linear`` + relu over a grid of (batch, in, out), prints a table and writes
``benchmarks/results/crossover-<device>.md/.json``. The threshold to put into
``genfast.backend.EAGER_BELOW`` is the smallest work (multiply-adds, batch x in x out) above which
every measured shape has the kernel within NOISE of eager (this 2-core VM's run-to-run spread is
about 5%). ``--from-json FILE`` rewrites the table and threshold of an earlier run without timing.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import genfast
from benchmarks import environment, timing
from benchmarks.cases.common import make_step

BATCHES = (16, 64, 256, 1024, 4096)
LAYERS = ((100, 128), (784, 600), (1024, 784))
ROUNDS = 3
NOISE = 0.97  # eager/kernel ratios at or above this count as level


def measure_grid(device: torch.device) -> list[dict]:
    rows = []
    for (n_in, n_out) in tqdm([(i, o) for i, o in LAYERS], desc="crossover"):
        for batch in BATCHES:
            x = torch.randn(batch, n_in, device=device, requires_grad=True)
            w = (torch.randn(n_out, n_in, device=device) / math.sqrt(n_in)).requires_grad_()
            b = torch.randn(n_out, device=device, requires_grad=True)
            g = torch.randn(batch, n_out, device=device)
            eager = make_step(lambda *t: torch.relu(F.linear(*t)), (x, w, b), g, "both")
            kernel_backend = genfast.backend.select(device) if device.type == "cuda" else "cpu"
            with genfast.use_backend(kernel_backend):
                fused = make_step(genfast.fused_dense, (x, w, b), g, "both")
            kernel_ms, eager_ms = math.inf, math.inf
            for _ in range(ROUNDS):  # alternate, keep each one's best median: drift hits both alike
                with genfast.use_backend(kernel_backend):
                    kernel_ms = min(kernel_ms, timing.measure(fused, device, timing.FULL).median_ms)
                eager_ms = min(eager_ms, timing.measure(eager, device, timing.FULL).median_ms)
            rows.append({"batch": batch, "in": n_in, "out": n_out, "outputs": batch * n_out,
                         "kernel_ms": kernel_ms, "eager_ms": eager_ms, "eager_over_kernel": eager_ms / kernel_ms})
    return rows


def threshold(rows: list[dict]) -> int:
    """Smallest work (multiply-adds) above which no measured shape has the kernel clearly slower."""
    losing = [r["batch"] * r["in"] * r["out"] for r in rows if r["eager_over_kernel"] < NOISE]
    return max(losing, default=0) + 1


def write(result: dict, out: Path) -> None:
    header = result["header"]
    name = f"crossover-{environment.slug(header['device'])}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# fused_dense kernel vs eager, forward+backward, relu fp32: {header['device']}", "",
             f"commit {header['git']['commit']}, {header['date']}, torch {header['torch']}", "",
             "| batch | in | out | multiply-adds | kernel ms | eager ms | eager/kernel |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['in']} | {r['out']} | {r['batch'] * r['in'] * r['out']:.3g} | "
              f"{r['kernel_ms']:.4g} | {r['eager_ms']:.4g} | {r['eager_over_kernel']:.2f} |" for r in result["rows"]]
    lines += ["", f"Kernel within {1 - NOISE:.0%} of eager (or faster) at every measured shape above "
              f"{result['threshold_work']:.3g} multiply-adds: genfast.backend.EAGER_BELOW."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.crossover", description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--from-json", help="an earlier run's JSON: recompute its threshold, time nothing")
    args = parser.parse_args()
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        result.pop("threshold_outputs", None)
    else:
        device = torch.device(args.device)
        rows = measure_grid(device)
        result = {"header": environment.header(device, {"mode": "both", "activation": "relu", "dtype": "float32"}),
                  "rows": rows}
    result["threshold_work"] = threshold(result["rows"])
    write(result, Path(args.out))


if __name__ == "__main__":
    main()
