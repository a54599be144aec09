"""The layering of .importlinter holds: runners and benchmarks over the engine's layers, each importing downward
only, no import cycle in any package, the synthetic benchmark imported by nothing else in the engine, the kernels
standing alone. lint-imports reads every import, those inside functions included."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_import_contracts_hold():
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--config", ".importlinter"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in done.stdout


def test_no_top_level_package_shadows_an_installed_one():
    """A package at the checkout's root comes first on sys.path for `python -m`, so one named like a dependency's
    hides it: a top-level `kernels/` once broke transformers, which imports Hugging Face's `kernels`."""
    ours = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    provided = importlib.metadata.packages_distributions()
    clashes = {name: provided[name] for name in ours if set(provided.get(name, [])) - {"prfl"}}
    assert "engine" in ours and not clashes, clashes
