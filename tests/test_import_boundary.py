"""The engine imports no domain or training library (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("rdkit", "ase", "pymatgen", "xarray", "torch_geometric", "e3nn", "pytorch_lightning",
             "lightning")

_SCRIPT = r"""
import importlib, importlib.util, json, sys
mods = ["sciddiff", "sciddiff.core", "sciddiff.samplers", "sciddiff.testing"]
if importlib.util.find_spec("sciddiff.likelihood") is not None:
    mods.append("sciddiff.likelihood")
for m in mods:
    importlib.import_module(m)
import sciddiff.core as core
print(json.dumps({
    "imported": mods,
    "core_file": core.__file__,
    "has_state": hasattr(core, "State"),
    "top_level": sorted({name.split(".")[0] for name in sys.modules}),
}))
"""


def _run() -> dict:
    res = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"importing the engine failed:\n{res.stderr}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_engine_imports_no_domain_or_training_library():
    info = _run()
    # the subprocess really imported the engine (not an empty or shadowing package)
    assert "sciddiff.core" in info["imported"] and info["has_state"]
    assert info["core_file"].endswith("__init__.py") and "sciddiff" in info["core_file"]
    assert "sciddiff" in info["top_level"] and "torch" in info["top_level"]
    leaked = sorted(set(FORBIDDEN) & set(info["top_level"]))
    assert not leaked, f"the engine imported {leaked}; these belong to domain/training packages"
