"""Exact resume: 20 steps straight == 10 steps, SIGKILL of every rank, resume for 10.

Runs through the real launch path (``deepy.py`` -> torchrun -> ``train.py``) with 2 ranks at
TP=2, ZeRO-1 and dropout on (so the per-rank and TP-tracker RNG states must be restored too).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megatron.config import load_config
from tests.training.helpers import read_losses, run_config, write_config, write_markov_corpus
from tests.training.stop_helpers import deepy_command

ROOT = Path(__file__).resolve().parents[2]


def _launch(cfg_path: Path, *overrides: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen(
        deepy_command(cfg_path, *overrides),
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while Path(f"/proc/{pid}").exists():
        stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
        if stat.split(")")[-1].split()[:1] == ["Z"]:  # a zombie: dead, not yet reaped
            return
        assert time.time() < deadline, f"rank process {pid} survived SIGKILL"
        time.sleep(0.1)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    prefix = write_markov_corpus(tmp / "corpus")
    cfg = run_config(
        tmp,
        prefix,
        **{
            "parallel.tensor": 2,
            "parallel.zero_stage": 1,
            "training.train_iters": 20,
            "model.attention_dropout": 0.1,
            "model.hidden_dropout": 0.1,
        },
    )
    cfg_path = write_config(tmp / "run.yml", cfg)
    straight = tmp / "straight"
    _finish(_launch(cfg_path, f"logging.dir={straight}"))

    ckpt = tmp / "ckpt"
    killed = _launch(
        cfg_path,
        f"checkpoint.save={ckpt}",
        "checkpoint.save_interval=10",
        f"logging.dir={tmp / 'first'}",
        env_extra={"MEGATRON_FAULT_HANG_AFTER_STEP": "10"},
    )
    deadline = time.time() + 300
    while len(list(ckpt.glob(".hung_rank*"))) < 2:
        assert killed.poll() is None, killed.communicate()[0][-4000:]
        assert time.time() < deadline, "ranks never reached step 10"
        time.sleep(0.2)
    # A real kill of every rank, no clean exit. torchrun starts each rank in a session of its
    # own, so the launcher's process group does not contain them: kill them by pid.
    rank_pids = [int(p.read_text()) for p in ckpt.glob(".hung_rank*")]
    for pid in rank_pids:
        os.kill(pid, signal.SIGKILL)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    for pid in rank_pids:
        _wait_gone(pid)

    resumed = tmp / "resumed"
    out = _finish(_launch(cfg_path, f"checkpoint.load={ckpt}", f"logging.dir={resumed}"))
    return {
        "straight": read_losses(straight / "metrics.jsonl"),
        "first": read_losses(tmp / "first" / "metrics.jsonl"),
        "resumed": read_losses(resumed / "metrics.jsonl"),
        "ckpt": ckpt,
        "log": out,
    }


def test_checkpoint_is_complete_and_latest_points_at_it(runs):
    ckpt = runs["ckpt"]
    assert (ckpt / "latest").read_text().strip() == "iter_0000010"
    tag = ckpt / "iter_0000010"
    assert (tag / "client_state.json").is_file() and (tag / "config.yml").is_file()
    saved = load_config([tag / "config.yml"], resolved=True)  # the resolved config reloads
    assert saved.parallel.tensor == 2 and saved.training.train_iters == 20
    assert sorted(p.name for p in tag.glob("rng_state_rank*.pt")) == [
        "rng_state_rank0.pt",
        "rng_state_rank1.pt",
    ]


def test_resume_reproduces_the_straight_run_exactly(runs):
    straight, first, resumed = runs["straight"], runs["first"], runs["resumed"]
    assert sorted(straight) == list(range(1, 21))
    assert [first[s] for s in range(1, 11)] == [straight[s] for s in range(1, 11)]
    assert sorted(resumed) == list(range(11, 21))
    assert [resumed[s] for s in range(11, 21)] == [straight[s] for s in range(11, 21)]
