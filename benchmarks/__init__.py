"""genfast's benchmark suite: ``python -m benchmarks`` (``make bench``), or ``benchmarks.run(...)``."""

from benchmarks.runner import run

__all__ = ["run"]
