"""The package finds its Metal sources wherever it runs: a wheel installed outside the source
tree, the source tree itself (editable), or a package folder copied into an app."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_gemma_mtp import kernels

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p.name for p in (ROOT / "metal_kernels").iterdir() if p.suffix in {".metal", ".h"})
PROBE = f"""
import json, mlx_gemma_mtp, mlx_gemma_mtp.kernels as k
sizes = {{name: len(k.source(name)) for name in {SOURCES!r}}}
print(json.dumps({{"package": mlx_gemma_mtp.__file__, "sources": sizes}}))
"""


def run(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_the_source_tree_reads_the_top_level_folder():
    assert kernels.source_folders()[1] == ROOT / "metal_kernels"
    assert (
        kernels.source("centroid_head.h")
        == (ROOT / "metal_kernels" / "centroid_head.h").read_text()
    )


def copy_package(app: Path, with_sources: bool) -> None:
    shutil.copytree(ROOT / "mlx_gemma_mtp", app / "mlx_gemma_mtp")
    if with_sources:  # where a wheel puts them
        shutil.copytree(ROOT / "metal_kernels", app / "mlx_gemma_mtp" / "metal_kernels")


def test_a_copied_package_folder_finds_its_sources(tmp_path):
    app = tmp_path / "app"
    copy_package(app, with_sources=True)
    out = run([sys.executable, "-c", PROBE], cwd=tmp_path, env={"PYTHONPATH": str(app)})
    found = json.loads(out.stdout)
    assert Path(found["package"]).parent == app / "mlx_gemma_mtp"
    assert all(size > 0 for size in found["sources"].values())


def test_a_copied_package_without_sources_imports_and_says_what_is_missing(tmp_path):
    app = tmp_path / "app"
    copy_package(app, with_sources=False)
    code = (
        "import mlx_gemma_mtp.kernels as k\n"
        "try:\n    k.source('centroid_head.h')\nexcept FileNotFoundError as e:\n    print(e)\n"
    )
    out = run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(app)})
    assert "Metal kernel source centroid_head.h not found in" in out.stdout
    assert str(app / "mlx_gemma_mtp" / "metal_kernels") in out.stdout


@pytest.mark.slow
def test_wheel_from_the_sdist_installs_and_passes_check_outside_the_source_tree(tmp_path):
    """``python -m build``: the sdist, then the wheel built from it; the wheel goes into a clean
    virtual environment, and ``check`` runs there (on a tiny random pair: no weights shipped)."""
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--outdir", dist, ROOT])
    (wheel,) = dist.glob("*.whl")
    assert len(list(dist.glob("*.tar.gz"))) == 1
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "-q", wheel])
    work = tmp_path / "elsewhere"
    work.mkdir()
    found = json.loads(run([python, "-c", PROBE], cwd=work).stdout)
    assert Path(found["package"]).is_relative_to(venv)
    assert all(size > 0 for size in found["sources"].values())
    run([python, "-m", "mlx_gemma_mtp.check", "--json", work / "check.json"], cwd=work)
    report = json.loads((work / "check.json").read_text())
    assert report["ok"] and "tiny random pair" in report["checks"][1]["detail"]
