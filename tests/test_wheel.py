"""The built wheel works outside the checkout: templates ship as package data, the replay server is in it.

The wheel is built from a copy of the sources (nothing is written into the checkout), installed with
--no-deps into a fresh venv that sees the project venv's site-packages through a `.pth` line (so the heavy
dependencies are not downloaded again, and the checkout's editable install is *not* what gets imported:
a `.pth` path line does not run the editable finder), then `curate build dfar` runs from a temp folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO, shared

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _setuptools_at_least(major: int) -> bool:
    from importlib import metadata

    try:
        return int(metadata.version("setuptools").split(".")[0]) >= major
    except metadata.PackageNotFoundError:
        return False


def test_wheel_installs_and_builds_outside_the_checkout(tmp_path: Path) -> None:
    dfar = shared("dfar")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"

    # 1. build the wheel from a copy of the sources
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for part in ("curate", "builders", "train"):
        shutil.copytree(REPO / part, src / part, ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / f, src / f)
    dist = tmp_path / "dist"
    # The venv's own setuptools when it can build this pyproject (SPDX `license` needs >= 77); otherwise pip's
    # isolated build fetches one (a fresh Python 3.11 venv may carry an older setuptools from ensurepip).
    isolation = ["--no-build-isolation"] if _setuptools_at_least(77) else []
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(dist), str(src)],
         tmp_path, env)
    (wheel,) = dist.glob("ethics_curate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"curate/templates/dataset_card.md.j2", "curate/templates/model_card.md.j2",
            "curate/replay/__main__.py", "curate/replay/app.py", "curate/py.typed"} <= names
    assert not any(n.startswith("tests/") for n in names)

    # 2. a fresh venv that borrows the project venv's installed dependencies, and the wheel installed into it
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    py = venv / "bin" / "python"
    new_site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         tmp_path, env).stdout.strip())
    (new_site / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)], tmp_path, env)

    # 3. from another folder: the installed package (not the checkout) is imported, with its templates
    work = tmp_path / "elsewhere"
    work.mkdir()
    probe = ("import curate, curate.cards, curate.replay.server, curate.replay.app, builders.dfar; "
             "print(curate.__file__); print(curate.cards.CARDS_DIR); print(curate.replay.server.__file__)")
    lines = _run([str(py), "-c", probe], work, env).stdout.splitlines()
    for line in lines:
        assert Path(line).resolve().is_relative_to(venv.resolve()), f"{line} is not inside the new venv"
    assert (Path(lines[1]) / "dataset_card.md.j2").is_file()
    assert "--port" in _run([str(py), "-m", "curate.replay", "--help"], work, env).stdout

    store = tmp_path / "store"
    res = _run([str(venv / "bin" / "curate"), "build", "dfar", "--source", str(dfar), "--store", str(store)],
               work, env)
    assert "built dfar@v1" in res.stdout
    (version,) = (store / "datasets" / "dfar" / "versions").iterdir()
    card = (version / "README.md").read_text()
    assert card.startswith("---\n") and "configs:" in card and "## Sources" in card
    assert not list(work.iterdir()), "nothing written into the working folder"
