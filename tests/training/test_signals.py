"""Stopping a run: signals checkpoint at a step boundary, nothing is orphaned, no silent hangs.

The end-to-end tests launch ``deepy.py`` -> torchrun -> 2 ranks of the tiny Markov run and stop it
in each of the ways a cluster or a user does (see ``megatron/training/signals.py``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron.config import ConfigError, load_config
from megatron.training.distributed import collective_failure
from megatron.training.signals import preempted_message
from tests.training.helpers import run_config, write_config, write_markov_corpus
from tests.training.stop_helpers import (
    ROOT,
    processes_with,
    rank_pids,
    start,
    steps_logged,
    wait_for,
    wait_gone,
)

MESSAGE = re.compile(
    r"preempted at step (\d+) \(SIGTERM\): saved (\S+)/iter_(\d{7}); resume with the same "
    r"command plus checkpoint\.load=(\S+)"
)


def test_preempted_message_says_where_to_resume(tmp_path):
    saved = tmp_path / "ck" / "iter_0000007"
    assert preempted_message(7, signal.SIGTERM, saved, None) == (
        f"preempted at step 7 (SIGTERM): saved {saved}; resume with the same command plus "
        f"checkpoint.load={tmp_path / 'ck'}"
    )
    assert preempted_message(7, signal.SIGUSR1, saved, str(tmp_path / "ck")) == (
        f"preempted at step 7 (SIGUSR1): saved {saved}; resume with the same command"
    )
    assert preempted_message(3, signal.SIGINT, None, None) == (
        "preempted at step 3 (SIGINT): nothing saved (checkpoint.save is not set)"
    )


def test_collective_failures_become_one_line():
    timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 30000ms")
    assert collective_failure(timeout, 1, 30) == (
        "rank 1: a collective timed out after 30 s: another rank is stalled or dead "
        "(training.collective_timeout_s)"
    )
    peer = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [::1]:7058")
    assert collective_failure(peer, 0, 30) == (
        "rank 0: a collective failed: another rank died; see its output above"
    )
    assert collective_failure(RuntimeError("shape mismatch"), 0, 30) is None
    assert collective_failure(ValueError("timed out"), 0, 30) is None


def test_collective_timeout_must_be_positive(tmp_path):
    cfg = tmp_path / "run.yml"
    write_config(cfg, run_config(tmp_path, tmp_path / "corpus"))
    assert load_config([cfg]).training.collective_timeout_s == 300
    with pytest.raises(ConfigError, match=r"training\.collective_timeout_s: \(0\) must be > 0"):
        load_config([cfg], ["training.collective_timeout_s=0"])


_REPEAT = """
import os, signal, sys, time
from megatron.training import signals
signals.install()
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)  # the same stop, delivered twice (Slurm + torchrun)
print(signals.received(), flush=True)
time.sleep(float(sys.argv[1]))
os.kill(os.getpid(), signal.SIGTERM)
print("still running", flush=True)
"""


@pytest.mark.parametrize("gap, alive", [(0.0, True), (2.5, False)])
def test_a_second_signal_later_exits_at_once(gap, alive):
    r = subprocess.run(
        [sys.executable, "-c", _REPEAT, str(gap)], cwd=ROOT, capture_output=True, text=True
    )
    assert r.stdout.startswith("15\n")
    if alive:
        assert r.returncode == 0 and "still running" in r.stdout
    else:
        assert r.returncode == 128 + 15 and "still running" not in r.stdout
        assert "rank 0: second SIGTERM: exiting now without saving" in r.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("signals")
    prefix = write_markov_corpus(tmp / "corpus")
    cfg = run_config(tmp, prefix, **{"training.train_iters": 100000, "logging.log_interval": 50})
    return tmp, write_config(tmp / "run.yml", cfg)


def _started(tmp: Path, cfg: Path, name: str, *overrides: str):
    ck, logs = tmp / name, tmp / f"{name}-logs"
    log = tmp / f"{name}.log"
    proc = start(cfg, log, f"checkpoint.save={ck}", f"logging.dir={logs}", *overrides)
    wait_for(lambda: steps_logged(logs / "metrics.jsonl") >= 5, 240, f"{name}: 5 steps")
    return proc, ck, logs, log


@pytest.mark.slow
def test_sigterm_of_deepy_saves_and_leaves_nothing(run):
    tmp, cfg = run
    proc, ck, logs, log = _started(tmp, cfg, "term")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    match = MESSAGE.search(log.read_text())
    assert match, log.read_text()[-3000:]
    step = int(match[1])
    assert int(match[3]) == step and match[2] == match[4] == str(ck)
    assert (ck / "latest").read_text().strip() == f"iter_{step:07d}"
    assert steps_logged(logs / "metrics.jsonl") == step  # the checkpoint is of the last step
    wait_gone(str(ck), 5)


@pytest.mark.slow
def test_sigkill_of_deepy_stops_the_ranks_within_seconds(run):
    tmp, cfg = run
    proc, ck, _, log = _started(tmp, cfg, "kill")
    ranks = rank_pids(str(ck))
    assert len(ranks) == 2, processes_with(str(ck))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    took = wait_gone(str(ck), 10)
    print(f"ranks gone {took:.1f} s after SIGKILL of deepy.py")
    assert (ck / "latest").is_file(), log.read_text()[-3000:]  # they saved on the way out


@pytest.mark.slow
def test_sigterm_of_the_ranks_checkpoints_the_current_step(run):
    tmp, cfg = run
    proc, ck, logs, log = _started(tmp, cfg, "ranks", "checkpoint.save_interval=1000")
    for pid in rank_pids(str(ck)):  # what Slurm does at the time limit: every task
        os.kill(pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    step = steps_logged(logs / "metrics.jsonl")
    assert (ck / "latest").read_text().strip() == f"iter_{step:07d}"
    assert f"preempted at step {step} (SIGTERM)" in log.read_text()
    wait_gone(str(ck), 5)


@pytest.mark.slow
def test_a_stalled_rank_is_an_error_not_a_hang(run):
    tmp, cfg = run
    proc, ck, _, log = _started(tmp, cfg, "stall", "training.collective_timeout_s=10")
    rank0, rank1 = rank_pids(str(ck))
    os.kill(rank1, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        expected = re.compile(r"rank 0: a collective \((\w+)\) timed out after 10 s: another rank")
        took = wait_for(lambda: expected.search(log.read_text()), 30, "the timeout message")
        print(f"rank 0 reported the stall {took:.1f} s after SIGSTOP of rank 1")
        assert took < 10 + 8
        wait_for(lambda: rank0 not in rank_pids(str(ck)), 10, "rank 0 to exit")
        assert time.monotonic() - t0 < 10 + 15
    finally:
        os.kill(rank1, signal.SIGKILL)
    assert proc.wait(timeout=60) != 0
    wait_gone(str(ck), 10)
