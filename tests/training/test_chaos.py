"""Chaos: kill a 2-rank run at random (seeded) moments in every way, resume each time, and get
exactly the losses of an uninterrupted run; no process of the run outlives the test.

Kills, in order: SIGKILL of every process (deepy.py, torchrun, both ranks), SIGTERM of deepy.py
(the ranks checkpoint the current step), SIGKILL of one rank (its peer fails, torchrun stops).
Each relaunch is the same command: ``checkpoint.save`` and ``checkpoint.load`` both name the run's
directory. metrics.jsonl then repeats the steps run again after a resume; the last record of each
step is the one that counts.
"""

from __future__ import annotations

import os
import random
import signal

import pytest

from tests.training.helpers import run_config, write_config, write_markov_corpus
from tests.training.stop_helpers import (
    last_losses,
    processes_with,
    rank_pids,
    start,
    steps_logged,
    wait_for,
    wait_gone,
)

STEPS = 60
SEED = 20240601


@pytest.mark.slow
def test_killed_and_resumed_run_equals_the_straight_run(tmp_path):
    rng = random.Random(SEED)
    prefix = write_markov_corpus(tmp_path / "corpus")
    cfg = run_config(
        tmp_path,
        prefix,
        **{"training.train_iters": STEPS, "model.hidden_dropout": 0.1, "logging.log_interval": 20},
    )
    cfg_path = write_config(tmp_path / "run.yml", cfg)
    ck, logs, log = tmp_path / "ck", tmp_path / "chaos-logs", tmp_path / "chaos.log"
    metrics = logs / "metrics.jsonl"
    command = [f"checkpoint.save={ck}", "checkpoint.save_interval=2", f"logging.dir={logs}"]
    # the reference runs alongside the first chaos launch (start-up dominates on 2 cores)
    straight = start(cfg_path, tmp_path / "straight.log", f"logging.dir={tmp_path / 'straight'}")
    proc = start(cfg_path, log, *command)
    try:
        for kill in ("every process", "deepy.py", "one rank"):
            done = steps_logged(metrics)
            target = done + rng.randint(3, 12)
            wait_for(lambda t=target: steps_logged(metrics) >= t, 240, f"step {target}")
            if kill == "every process":
                for pid in processes_with(str(ck)):
                    os.kill(pid, signal.SIGKILL)
            elif kill == "deepy.py":
                proc.send_signal(signal.SIGTERM)
            else:
                os.kill(rng.choice(rank_pids(str(ck))), signal.SIGKILL)
            code = proc.wait(timeout=120)
            assert (code == 0) == (kill == "deepy.py"), (kill, code, log.read_text()[-3000:])
            wait_gone(str(ck), 30)
            proc = start(cfg_path, log, *command, f"checkpoint.load={ck}")
        assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
        assert straight.wait(timeout=240) == 0
    finally:
        for pid in processes_with(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)
    wait_gone(str(tmp_path), 10)
    reference = last_losses(tmp_path / "straight" / "metrics.jsonl")
    resumed = last_losses(metrics)
    assert sorted(reference) == sorted(resumed) == list(range(1, STEPS + 1))
    assert [resumed[s] for s in range(1, STEPS + 1)] == [reference[s] for s in range(1, STEPS + 1)]
