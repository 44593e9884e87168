"""`make wheel` builds a wheel that installs into a fresh virtual environment and works there, away from
the source tree: build_info(), fused_dense on the cpu backend, one Adam step of an Autoencoder.

Slow (it compiles the extension: minutes): ``pytest -m "not slow"`` leaves it out. The wheel is built in a
copy of the source tree, so the checkout's build/ and dist/ stay as they are, and CPU-only
(``GENFAST_CUDA=0``) unless GENFAST_CUDA is set. The fresh environment reuses this interpreter's PyTorch
through a .pth file; nothing is downloaded (``pip install --no-deps --no-index``).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("csrc", "genfast", "setup.py", "pyproject.toml", "README.md", "Makefile", "CMakeLists.txt")
BUILD_TIMEOUT_S = 3600  # a CUDA build (GENFAST_CUDA=1) takes ~10 minutes on a fast machine

CHECK = """
import sys
import torch
import genfast
from genfast.models import Autoencoder

site_packages, cuda = sys.argv[1], sys.argv[2] == "1"
assert genfast.__file__.startswith(site_packages), f"genfast imported from {genfast.__file__}"
info = genfast.build_info()
print(info)
assert info["built_for_torch"] == torch.__version__ and info["torch"] == torch.__version__, info
assert info["cuda"] is cuda and "cpu" in info["backends"], info
assert info["version"].endswith(".cu" + torch.version.cuda.replace(".", "") if cuda else ".cpu"), info

x, weight, bias = torch.randn(64, 100), torch.randn(128, 100) / 10, torch.randn(128)
with genfast.use_backend("cpu"):
    y = genfast.fused_dense(x, weight, bias, activation="relu")
torch.testing.assert_close(y, torch.relu(x @ weight.T + bias))

torch.manual_seed(0)
model, data = Autoencoder((64, 32, 16)), torch.rand(128, 64)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
with genfast.use_backend("cpu"):
    before = model.loss(data)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    after = model.loss(data)
assert torch.isfinite(after) and after < before, (float(before), float(after))
print("wheel works:", float(before), "->", float(after))
"""


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, timeout=timeout, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{output[-8000:]}"
    return output


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that could put the source tree on the import path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {
        **env,
        "PYTHONNOUSERSITE": "1",
        "PIP_NO_INDEX": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        **extra,
    }


@pytest.fixture(scope="module")
def cuda_build() -> bool:
    return os.environ.get("GENFAST_CUDA", "0") == "1"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, cuda_build) -> Path:
    """`make wheel` in a copy of the source tree (file times kept: make sees the .venv set up), with this
    interpreter's environment as the Makefile's .venv."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("make wheel sets up and uses a virtual environment; this interpreter is not in one")
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
            )
        else:
            shutil.copy2(REPO / name, source / name)
    env = clean_env(GENFAST_CUDA="1" if cuda_build else "0")
    output = run(["make", "wheel", f"VENV={sys.prefix}"], source, env, BUILD_TIMEOUT_S)
    wheels = sorted((source / "dist").glob("genfast-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in dist/, got {wheels}:\n{output[-4000:]}"
    return wheels[0]


def test_wheel_names_its_python_torch_and_cuda_and_holds_the_package(wheel, cuda_build):
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    variant = "cu" + torch.version.cuda.replace(".", "") if cuda_build else "cpu"
    python = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert wheel.name.startswith(f"genfast-0.1.0+torch{torch_mm}.{variant}-{python}-{python}-"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("genfast/_C.") and n.endswith(".so") for n in names), names
    for module in (
        "genfast/__init__.py",
        "genfast/models/vae.py",
        "genfast/nn/linear.py",
        "genfast/ops/dense.py",
    ):
        assert module in names
    assert not any(n.startswith(("csrc/", "tests/", "benchmarks/")) for n in names), names


def test_wheel_installs_into_a_fresh_venv_and_trains(wheel, cuda_build, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, clean_env(), 300)
    python = venv / "bin" / "python"
    purelib = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            tmp_path,
            clean_env(),
            60,
        ).strip()
    )
    # This interpreter's PyTorch (and pip), after the venv's own packages on sys.path. A bare path line:
    # the .pth files there (the checkout's editable install of genfast) are not run.
    reused = dict.fromkeys(
        [str(Path(torch.__file__).parents[1]), *site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    )
    (purelib / "reuse_torch.pth").write_text("\n".join(reused) + "\n")
    # --ignore-installed: pip sees the checkout's genfast through that path and must leave it alone.
    run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
        tmp_path,
        clean_env(),
        600,
    )
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    output = run(
        [str(python), "-c", CHECK, str(purelib), "1" if cuda_build else "0"], workdir, clean_env(), 600
    )
    assert "wheel works:" in output, output
