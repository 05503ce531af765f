"""The import-linter contracts in setup.cfg (run by .ci/run) fail on a violation, not only pass on today's
tree: a copy of the packages with one upward or forbidden import must be refused, naming the contract."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("core", "indexer", "trainer", "cluster")


def lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", "setup.cfg", "--no-cache"], cwd=tree, capture_output=True,
                          text=True, env={"PATH": str(LINT.parent), "PYTHONPATH": str(tree)}, timeout=300)


@pytest.fixture
def tree(tmp_path):
    for p in PACKAGES:
        shutil.copytree(ROOT / p, tmp_path / p, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    return tmp_path


def append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is installed by scripts/setup.sh")
def test_contracts_hold_on_the_tree_and_fail_on_a_violation(tree):
    ok = lint(tree)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "BROKEN" not in ok.stdout

    append(tree / "trainer" / "data.py", "import cluster.config  # an upward import")
    up = lint(tree)
    assert up.returncode != 0
    assert "Dependencies point one way" in up.stdout and "BROKEN" in up.stdout
    assert "trainer.data -> cluster.config" in up.stdout


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is installed by scripts/setup.sh")
def test_ray_inside_the_indexer_is_refused(tree):
    append(tree / "indexer" / "shards.py", "import ray  # Ray belongs in cluster/")
    r = lint(tree)
    assert r.returncode != 0
    assert "Ray lives in cluster only" in r.stdout and "indexer.shards -> ray" in r.stdout
