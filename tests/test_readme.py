"""README command blocks run as written: each block marked ``<!-- readme-test: NAME -->`` runs in a fresh shell
(`bash --noprofile --norc -e`, a bare environment, an empty HOME) from the project root, and what it claims is
checked. The serve block runs in tests/serving/test_serve.py, beside the checkpoint it serves.

The cluster block starts a Ray head on the default ports and ends with `ray stop`, which stops every Ray instance
on the machine: it is ordered before every other test (conftest), while no other Ray instance runs.
"""

import json
import subprocess

import pytest
from conftest import ROOT, readme_block, run_block

pytestmark = [pytest.mark.slow, pytest.mark.machine_wide]


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
