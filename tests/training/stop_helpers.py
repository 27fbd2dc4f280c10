"""Launching a 2-rank run through ``deepy.py`` and stopping it: signals, kills, left-over processes.

Every run's command line holds a unique directory (its ``checkpoint.save``), so the processes of
one run — ``deepy.py``, torchrun and the ranks — are found by scanning ``/proc`` for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from megatron.training.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]


def deepy_command(cfg_path: Path, *overrides: str) -> list[str]:
    """``python deepy.py train.py cfg_path`` with 2 local ranks on a free port."""
    return [
        sys.executable,
        "deepy.py",
        "train.py",
        str(cfg_path),
        "launcher.nproc_per_node=2",
        f"launcher.master_port={free_port()}",
        *overrides,
    ]


def start(cfg_path: Path, log: Path, *overrides: str) -> subprocess.Popen:
    """``deepy.py train.py cfg_path`` with 2 ranks in a session of its own, output to ``log``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = deepy_command(cfg_path, *overrides)
    with open(log, "a") as out:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT
        )


def processes_with(marker: str) -> dict[int, str]:
    """Live processes (zombies excluded) whose command line contains ``marker``: pid -> cmdline."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found[int(entry.name)] = cmdline
    return found


def rank_pids(marker: str) -> list[int]:
    """The pids of the run's ranks (``train.py`` processes that are not a launcher)."""
    return sorted(
        pid
        for pid, cmd in processes_with(marker).items()
        if " train.py " in cmd
        and "deepy.py" not in cmd
        and "torch.distributed.run" not in cmd
        and "tools/torchrun.py" not in cmd
    )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` every 0.1 s; returns the seconds it took. Fails after ``timeout``."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"{what}: not after {timeout} s"
        time.sleep(0.1)
    return time.monotonic() - t0


def wait_gone(marker: str, timeout: float) -> float:
    """Wait until no process of the run is left; returns the seconds it took."""
    return wait_for(lambda: not processes_with(marker), timeout, f"processes of {marker} left")


def steps_logged(metrics: Path) -> int:
    """The highest train step in ``metrics.jsonl`` (0 when there is none yet)."""
    if not metrics.is_file():
        return 0
    steps = [0]
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if rec.get("split") == "train":
            steps.append(rec["step"])
    return max(steps)


def last_losses(metrics: Path) -> dict[int, float]:
    """Train loss per step, the *last* record of each step (a resumed run may repeat steps)."""
    out = {}
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # cut short by a SIGKILL; that step is logged again later
            continue
        if rec["split"] == "train":
            out[rec["step"]] = rec["loss"]
    return out
