"""The layer contract (pyproject.toml, [tool.importlinter]) holds, and it catches an import that points up."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(src: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT), "--no-logo", "--no-cache", "--config", str(ROOT / "pyproject.toml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def package_copy(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "ar2dlm", src / "ar2dlm", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    return src


def test_the_package_keeps_its_layers(package_copy, tmp_path):
    result = _lint(package_copy, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "KEPT" in result.stdout


@pytest.mark.parametrize("module, wrong", [
    ("core/files.py", "from ..model import lm"),          # core reaching up into the model
    ("nn/masks.py", "from ..decode import engine"),       # a network piece importing the engine
    ("train/data.py", "from .. import cli"),              # anything importing the CLI
    ("measure/plot.py", "from ..evaluate import tasks"),  # two independent siblings
])
def test_an_upward_import_breaks_the_contract(package_copy, tmp_path, module, wrong):
    path = package_copy / "ar2dlm" / module
    path.write_text(path.read_text() + f"\n{wrong}\n")
    result = _lint(package_copy, tmp_path)
    assert result.returncode != 0
    importer = "ar2dlm." + module.removesuffix(".py").replace("/", ".")
    assert importer in result.stdout, result.stdout


def test_no_import_cycle_between_modules():
    """No two modules reach each other by imports: a circle means neither can be read, tested or moved alone.

    Every import counts, those inside functions too (a deferred import hides a circle from Python's loader, not
    from a reader), and so do the packages' `__init__` re-exports (none is needed to keep this test green).
    """
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("ar2dlm")
    circles = [(a, b) for a in sorted(graph.modules) for b in sorted(graph.find_modules_directly_imported_by(a))
               if graph.chain_exists(importer=b, imported=a)]
    assert not circles, "import circles (a imports b, b reaches a): " + ", ".join(f"{a} <-> {b}" for a, b in circles)
