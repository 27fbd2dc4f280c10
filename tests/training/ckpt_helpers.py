"""A tiny saved checkpoint for the checkpoint-safety and verification tests (one per module)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from megatron.training.distributed import free_port
from tests.training.helpers import run_config, write_config, write_markov_corpus

ROOT = Path(__file__).resolve().parents[2]


def deepy(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``deepy.py train.py ARGS`` on one CPU rank (a free port), output captured."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "deepy.py", "train.py", *args, "launcher.nproc_per_node=1"]
    cmd.append(f"launcher.master_port={free_port()}")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def save_tiny_checkpoint(tmp: Path, **overrides: object) -> tuple[Path, Path]:
    """Train the ``markov`` tiny run for 2 steps at ZeRO-1 and save it.

    Returns:
        ``(run config file, checkpoint directory)``; the config has no ``checkpoint`` section.
    """
    prefix = write_markov_corpus(tmp / "corpus")
    cfg = run_config(
        tmp, prefix, **{"training.train_iters": 2, "parallel.zero_stage": 1, **overrides}
    )
    cfg_path = write_config(tmp / "run.yml", cfg)
    ckpt = tmp / "ckpt"
    r = deepy(str(cfg_path), f"checkpoint.save={ckpt}", f"logging.dir={tmp / 'first'}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return cfg_path, ckpt
