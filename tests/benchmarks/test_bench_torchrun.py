"""The benchmark CLI runs data-parallel under torchrun (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, distributed: bool) -> dict:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        if distributed
        else [sys.executable]
    )
    command = [
        *launcher,
        "-m",
        "benchmarks",
        "--benchmark",
        "split-digits",
        "--methods",
        "spg",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--threads",
        "1",
        "--no-plots",
        "--no-progress",
        "--quiet",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = list(out.glob("runs/spg/seed0/result.json"))
    assert len(results) == 1, list(out.rglob("*"))
    return json.loads(results[0].read_text())


@pytest.mark.slow
def test_cli_under_torchrun_matches_a_single_process_run(tmp_path: Path) -> None:
    parallel = _run(tmp_path / "ddp", distributed=True)
    single = _run(tmp_path / "single", distributed=False)
    environment = parallel["environment"]
    assert environment["world_size"] == 2
    assert environment["backend"] == "gloo"
    # Same global minibatches (rank 0's order split across ranks): the result agrees closely.
    assert abs(parallel["acc"] - single["acc"]) < 0.03
    # Only rank 0 writes: one run directory, no stray per-rank files.
    assert not list((tmp_path / "ddp").rglob("*rank1*"))
