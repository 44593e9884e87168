"""genfast's benchmark suite: ``python -m benchmarks`` (``make bench``), or ``benchmarks.run(...)``."""

__all__ = ["run"]


def __getattr__(name: str):
    # Lazy: ``python -m benchmarks.gpu_check`` must not import genfast (and map its _C library) before it
    # has rebuilt that library in place.
    if name == "run":
        from benchmarks.runner import run

        return run
    raise AttributeError(f"module 'benchmarks' has no attribute {name!r}")
