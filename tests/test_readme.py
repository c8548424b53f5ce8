"""The README's commands and code run as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_example_runs():
    code = _blocks("python")[0]
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 11
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    net = namespace["net"]
    mask = net.get_submodule("layer1.0.conv1").weight_mask
    assert 0.3 < float((mask == 0).float().mean()) < 0.7
    assert isinstance(namespace["compiled"], torch.nn.Module)


def test_ci_runs_the_readme_install_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    bash = "\n".join(_blocks("bash"))
    assert 'pip install -e ".[dev]"' in bash and 'pip install -e ".[dev]"' in ci
    assert "python -m pytest" in bash
    assert re.search(r"^python -m pytest$", ci, flags=re.M)
