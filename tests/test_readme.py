"""README command blocks run as written: each block marked ``<!-- readme-test: NAME -->`` runs in a fresh shell
(`bash --noprofile --norc -e`, a bare environment) from the project root, and what it claims is checked.

The cluster block starts a Ray head on the default ports and ends with `ray stop`, which stops every Ray instance
on the machine: it is ordered before every other test (conftest), while no other Ray instance runs.
"""

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.machine_wide]


def readme_block(name: str) -> str:
    """The fenced bash block right after ``<!-- readme-test: name -->`` in README.md."""
    found = re.search(rf"<!-- readme-test: {name} -->\n```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert found, f"README.md has no block marked readme-test: {name}"
    return found.group(1)


def run_block(block: str, timeout_s: float) -> subprocess.CompletedProcess:
    fresh = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home()), "LANG": "C.UTF-8"}
    return subprocess.run(["bash", "--noprofile", "--norc", "-e", "-c", block], cwd=ROOT, env=fresh,
                          capture_output=True, text=True, timeout=timeout_s)


def test_the_cluster_block_runs_as_written(tiny_models):
    block = readme_block("cluster")
    out = ROOT / "outputs" / "cluster-eval"
    summary = out / "summary.json"
    summary.unlink(missing_ok=True)
    try:
        proc = run_block(block, timeout_s=600)
    finally:
        subprocess.run(["bash", "-c", "source .venv/bin/activate && ray stop --force"], cwd=ROOT,
                       capture_output=True, timeout=120)  # whatever happened, no head stays behind
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "succeeded" in proc.stdout + proc.stderr  # `ray job submit` waited for the job and saw it succeed
    assert len(json.loads(summary.read_text())["turn_accuracy"]) == 2  # the job wrote where $PWD said
