"""The `genfast` command: `genfast train MODEL ...` trains a model, `genfast bench ...` runs the benchmark
suite of the source tree (its arguments go to `python -m benchmarks`)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from genfast.data import IMAGE_DATA
from genfast.train import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, LARGEST, MODEL_KINDS, OPTIMIZERS


def number(kind: type, low: float, strict: bool):
    """An argparse type: a `kind` greater than (strict) or at least `low`; floats finite, at most LARGEST."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= LARGEST or (strict and value == low):
            what = "an integer" if kind is int else f"a finite number (at most {LARGEST:.4g})"
            raise argparse.ArgumentTypeError(
                f"expected {what} {'>' if strict else '>='} {low:g}, got {text!r}"
            )
        return value

    return parse


class Parser(argparse.ArgumentParser):
    """User errors in one line on stderr (what is wrong, and where help is), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def train_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model (also under torchrun --nproc_per_node N)",
        description="Train a model; pictures, loss curves and checkpoint.pt go to --out.",
    )
    parser.add_argument("model", choices=MODEL_KINDS)
    parser.add_argument(
        "--data",
        default=None,
        help=f"images: {', '.join(IMAGE_DATA)} (default digits); lm: a UTF-8 text file "
        "(default: a bundled essay)",
    )
    parser.add_argument("--data-dir", default=None, help="folder of MNIST's IDX files (--data mnist)")
    parser.add_argument(
        "--subset", type=number(int, 1, False), default=None, help="train on the first N examples only"
    )
    parser.add_argument(
        "--epochs",
        type=number(int, 1, False),
        default=None,
        help="epochs in all, with --resume including those done (default: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items())
        + ")",
    )
    parser.add_argument(
        "--batch-size",
        type=number(int, 1, False),
        default=None,
        help=f"per process (default {DEFAULT_BATCH_SIZE}; with --resume the checkpoint's)",
    )
    parser.add_argument(
        "--lr",
        type=number(float, 0, True),
        default=None,
        help="learning rate (default: per model and data, see the README; with --resume the checkpoint's)",
    )
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=None,
        help="default adam; with --resume the checkpoint's (it cannot change)",
    )
    parser.add_argument(
        "--l1",
        type=number(float, 0, False),
        default=None,
        help="add l1 * sum |w| over weights to the loss (default 0; with --resume the checkpoint's)",
    )
    parser.add_argument(
        "--l2",
        type=number(float, 0, False),
        default=None,
        help="add l2 * sum w^2 over weights to the loss (default 0; with --resume the checkpoint's)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cuda when present)")
    parser.add_argument(
        "--seed",
        type=number(int, 0, False),
        default=None,
        help="default 0; with --resume the checkpoint's (it cannot change)",
    )
    parser.add_argument("--out", default=None, help="output folder (default runs/MODEL)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run even if OUT holds a checkpoint (replaced at the end of the first epoch)",
    )
    twin = parser.add_mutually_exclusive_group()
    twin.add_argument(
        "--fused",
        dest="fused",
        action="store_true",
        default=True,
        help="genfast's fused layers and ops (default)",
    )
    twin.add_argument(
        "--plain", dest="fused", action="store_false", help="the plain PyTorch twin, to compare"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_train(args: argparse.Namespace) -> int:
    from genfast.train import train

    out = args.out or f"runs/{args.model}"
    result = train(
        args.model,
        data=args.data,
        data_dir=args.data_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        l1=args.l1,
        l2=args.l2,
        device=args.device,
        seed=args.seed,
        fused=args.fused,
        out=out,
        resume=args.resume,
        overwrite=args.overwrite,
        subset=args.subset,
        progress=args.progress,
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun, process 0 speaks for all
        last = "".join(f", {name} {values[-1]:.4f}" for name, values in result.history.items() if values)
        print(
            f"{args.model}: {result.epochs} epochs{last}, {result.samples_per_second:.0f} samples/s; "
            f"wrote {result.out}/"
        )
        if result.quality_report:
            print(result.quality_report)
    return 0


# The folder that holds the genfast package: in a source checkout (or an editable install of one) the
# checkout, beside benchmarks/; in an installed wheel site-packages, where the suite is not.
SOURCE_TREE = Path(__file__).resolve().parent.parent


def run_bench(arguments: list[str]) -> int:
    """`python -m benchmarks` with these arguments, in a child process that finds the suite (and this same
    genfast) through PYTHONPATH; its exit status. The suite is not part of a wheel: without it, one line
    and exit status 2."""
    tree = SOURCE_TREE
    if not (tree / "benchmarks" / "__main__.py").is_file():
        print(
            f"genfast bench: error: the benchmark suite is not installed with genfast (no {tree / 'benchmarks'}); "
            "it needs a source checkout of genfast: run genfast bench there after pip install -e ., "
            "or python -m benchmarks ... from its root",
            file=sys.stderr,
        )
        return 2
    # The working directory stays the caller's: relative --out and --render paths mean what they typed.
    path = os.pathsep.join(filter(None, (str(tree), os.environ.get("PYTHONPATH"))))
    # -P (Python 3.11+): the caller's working directory is not put first on the path, so a benchmarks/ or
    # genfast/ folder there cannot shadow the checkout's.
    isolate = ["-P"] if sys.version_info >= (3, 11) else []
    return subprocess.run(
        [sys.executable, *isolate, "-m", "benchmarks", *arguments], env={**os.environ, "PYTHONPATH": path}
    ).returncode


# What a user can fix (arguments, device, data, output folder, checkpoint, missing packages, a diverging run):
# one line and exit status 2, no traceback. genfast.train raises these before writing anything where it can.
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="genfast", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    train_parser(subparsers)
    # No options of its own (not even --help): everything after `bench` is the suite's.
    subparsers.add_parser(
        "bench", help="run the benchmark suite (arguments of python -m benchmarks)", add_help=False
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return run_bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return run_train(args)
    except USER_ERRORS as error:
        print(f"genfast train: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
