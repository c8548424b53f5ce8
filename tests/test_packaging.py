"""Packaging: `passes/` and `cli/` install inside the `rewriter` namespace only."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_passes_and_cli_into_rewriter(tmp_path):
    code = (
        "import importlib.util, rewriter.passes, rewriter.cli;"
        "print(importlib.util.find_spec('passes') is None, importlib.util.find_spec('cli') is None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr


def test_installed_passes_package_is_the_repository_passes_folder():
    spec = importlib.util.find_spec("rewriter.passes")
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).resolve() == ROOT / "passes" / "__init__.py"


@pytest.mark.slow
def test_plain_wheel_has_no_top_level_passes_or_cli(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), "-q"],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("rewriter-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "rewriter/passes/__init__.py" in names
    assert "rewriter/passes/masks.py" in names
    assert "rewriter/cli/__init__.py" in names
    tops = {n.split("/")[0] for n in names}
    assert "passes" not in tops and "cli" not in tops, sorted(tops)
