"""Where results came from: device, commit, driver and library versions."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

import genfast

_REPO = Path(__file__).resolve().parents[1]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo and the cores this process may use."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    return f"{model} ({len(os.sched_getaffinity(0))} cores)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _command(*args: str) -> str | None:
    """stdout of a command, stripped; None if it is missing or fails."""
    try:
        done = subprocess.run(args, cwd=_REPO, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_commit() -> dict:
    """HEAD and whether the tree differs from it (results/ excluded: the run writes there)."""
    status = _command("git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    return {"commit": _command("git", "rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def header(device: torch.device, settings: dict) -> dict:
    """Everything a result needs to be reproduced and compared; `settings` are the run's own."""
    driver = _command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    return {
        "git": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "driver": driver.splitlines()[0] if driver else None,
        "torch": torch.__version__,
        "triton": genfast.backend.triton_version(),
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "genfast": genfast.build_info(),
        "settings": settings,
    }
