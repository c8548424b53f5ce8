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


# -- the README's numbers against the examples' recorded summaries ---------------------------

OUTPUTS = ROOT / "examples" / "outputs"
EXAMPLE_BLOCK = re.compile(r"<!-- example-output: (\w+) -->\n```text\n(.*?)```", flags=re.S)


def _in_order(lines: list[str], recorded: list[str]) -> str | None:
    """None when every line occurs in ``recorded`` in the same order, else the first that
    does not (the README may leave recorded lines out, never change or reorder them)."""
    position = 0
    for line in lines:
        try:
            position = recorded.index(line, position) + 1
        except ValueError:
            return line
    return None


def _quoted() -> list[tuple[str, list[str]]]:
    return [(name, block.rstrip("\n").splitlines()) for name, block in EXAMPLE_BLOCK.findall(README)]


def test_readme_result_blocks_match_the_examples_recorded_summaries():
    quoted = _quoted()
    assert quoted, "the README quotes no example output"
    for name, lines in quoted:
        path = OUTPUTS / f"{name}.txt"
        assert path.is_file(), f"README quotes {name} but {path} does not exist: run the example"
        missing = _in_order(lines, path.read_text().splitlines())
        assert missing is None, (
            f"README block of {name} has a line the example's recorded summary does not "
            f"(re-run examples/{name}.py and update the README): {missing!r}"
        )


def test_every_recorded_summary_is_quoted_and_names_an_example():
    quoted = {name for name, _ in _quoted()}
    recorded = {p.stem for p in OUTPUTS.glob("*.txt")}
    assert recorded <= quoted, f"recorded but not in the README: {sorted(recorded - quoted)}"
    writers = {
        m.group(1)
        for path in (ROOT / "examples").glob("*.py")
        for m in re.finditer(r'Summary\("(\w+)"', path.read_text())
    }
    assert recorded <= writers, f"records no example writes: {sorted(recorded - writers)}"


def test_the_drift_check_can_fail():
    """A changed digit, a reordered or an invented line is caught; a left-out line is not."""
    name, lines = _quoted()[0]
    recorded = (OUTPUTS / f"{name}.txt").read_text().splitlines()
    assert _in_order(lines, recorded) is None
    changed = [re.sub(r"\d", lambda d: str((int(d.group()) + 1) % 10), lines[0], count=1)]
    assert _in_order(changed + lines[1:], recorded) == changed[0]
    if len(lines) > 1:
        assert _in_order(lines[::-1], recorded) is not None
        assert _in_order(lines[1:], recorded) is None
    assert _in_order([*lines, "an invented line"], recorded) == "an invented line"


def test_readme_and_docs_do_not_point_outside_the_repository():
    texts = {"README.md": README}
    texts |= {str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "docs").rglob("*.md")}
    for path in [*(ROOT / "passes").rglob("*.py"), *(ROOT / "rewriter").rglob("*.py")]:
        texts[str(path.relative_to(ROOT))] = path.read_text()
    for path in (ROOT / "examples").glob("*.py"):
        texts[str(path.relative_to(ROOT))] = path.read_text()
    for name, text in texts.items():
        for bad in ("../shared", "PAPERS.md", "DESIGN.md"):
            assert bad not in text, f"{name} refers to {bad}, which a clone does not have"


def test_readme_links_to_docs_exist():
    for target in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / target).exists(), target
