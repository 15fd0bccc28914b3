"""scripts/gpu_check.sh runs on a lent GPU machine that has torch, pytest and transformers but neither
xgrammar, jsonschema, mistral-common nor grpc: every test module it runs must still be collected there
(a module that fails to import silently drops its cuda tests from the check)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABSENT_THERE = ("xgrammar", "jsonschema", "mistral_common", "grpc", "grpc_tools", "grpc_status", "grpc_health")

# Runs pytest's collection with those packages made unimportable, as they are on that machine.
PROBE = f"""
import importlib.abc, importlib.machinery, sys
class Absent(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {ABSENT_THERE!r}:
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {{spec.name!r}} (absent on the GPU machine)")
sys.meta_path.insert(0, Absent())
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
"""


def gpu_check_test_paths() -> list[str]:
    """The test paths scripts/gpu_check.sh hands pytest."""
    return re.findall(r"\btests/\S+", (ROOT / "scripts" / "gpu_check.sh").read_text())


def test_every_module_the_gpu_check_runs_is_collected_without_the_serving_packages() -> None:
    paths = gpu_check_test_paths()
    assert "tests/ops" in paths and "tests/engine/test_engine.py" in paths
    done = subprocess.run([sys.executable, "-c", PROBE, *paths], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]  # 2: a module failed to import
    assert re.search(r"\d+ tests collected", done.stdout), done.stdout[-3000:]
