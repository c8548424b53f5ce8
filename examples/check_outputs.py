"""Re-run examples with their default arguments and compare their summaries with the records.

Each example writes its summary (the lines the README quotes) to
``examples/outputs/<example>.txt`` when run with its defaults (``examples/summary.py``).
This script runs the named examples (default: every example that records a summary)
with ``REWRITER_EXAMPLE_OUTPUTS`` pointing at a temporary folder, so the records are not
touched, and prints a diff for every summary that changed. Exit status 1 when any
drifted: then update ``examples/outputs/`` (run the example) and the README block
(``tests/test_readme.py`` checks that the README matches the records).

The examples are deterministic on one machine (one thread, seeded); another CPU or
PyTorch build may round differently. Most take minutes: run one at a time.

Run: python examples/check_outputs.py [EXAMPLE ...]
"""

from __future__ import annotations

import argparse
import difflib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORDED = HERE / "outputs"


def recorded_examples() -> list[str]:
    """Every example with a recorded summary, by name."""
    return sorted(p.stem for p in RECORDED.glob("*.txt"))


def rerun(name: str, folder: Path) -> tuple[bool, str]:
    """Run ``examples/<name>.py`` with defaults; (whether its summary matches, report)."""
    env = {**os.environ, "REWRITER_EXAMPLE_OUTPUTS": str(folder), "OMP_NUM_THREADS": "1"}
    env.setdefault("REWRITER_PROGRESS", "0")
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, str(HERE / f"{name}.py")], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        return False, f"{name}: exit status {run.returncode} after {seconds:.0f} s\n{run.stderr}"
    fresh = (folder / f"{name}.txt").read_text().splitlines()
    old = (RECORDED / f"{name}.txt").read_text().splitlines()
    if fresh == old:
        return True, f"{name}: summary unchanged ({seconds:.0f} s)"
    diff = difflib.unified_diff(old, fresh, "recorded", "now", lineterm="")
    return False, f"{name}: summary drifted ({seconds:.0f} s)\n" + "\n".join(diff)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "examples", nargs="*", help="example names (default: every recorded one)", default=[]
    )
    args = ap.parse_args()
    names = args.examples or recorded_examples()
    unknown = [n for n in names if not (RECORDED / f"{n}.txt").is_file()]
    if unknown:
        ap.error(f"no recorded summary for {unknown}; recorded: {recorded_examples()}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            same, report = rerun(name, Path(tmp))
            print(report, flush=True)
            ok &= same
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
