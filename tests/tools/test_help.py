"""``--help`` works on every entry point: usage text on stdout, exit 0, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = sorted(
    str(p.relative_to(ROOT))
    for pattern in (
        "train.py",
        "deepy.py",
        "tools/*.py",
        "tools/ckpts/*.py",
        "tools/bench/*.py",
        "tools/slurm/*.py",
    )
    for p in ROOT.glob(pattern)
    if not p.name.startswith("_")
)


@pytest.fixture(scope="module")
def helps(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """``script -> (its --help run, its working directory)``, four at a time (each run is
    mostly imports, waiting on the disk as much as on a core)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cwds = {s: tmp_path_factory.mktemp("help") for s in ENTRY_POINTS}  # must stay empty

    def run(script: str) -> tuple[subprocess.CompletedProcess, Path]:
        cwd = cwds[script]
        cmd = [sys.executable, str(ROOT / script), "--help"]
        res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        return res, cwd

    with ThreadPoolExecutor(4) as pool:
        return dict(zip(ENTRY_POINTS, pool.map(run, ENTRY_POINTS), strict=True))


def test_every_entry_point_is_listed():
    listed = {"train.py", "deepy.py", "tools/preprocess_data.py", "tools/ckpts/reshard.py"}
    assert listed <= set(ENTRY_POINTS)


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_prints_usage_and_exits_0(script, helps):
    res, cwd = helps[script]
    assert res.returncode == 0, res.stderr[-2000:]
    assert Path(script).name in res.stdout, res.stdout[:500]
    assert "Traceback" not in res.stderr
    assert not list(cwd.iterdir())
