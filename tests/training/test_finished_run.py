"""Resuming: metrics.jsonl holds each step once after a crash past the last checkpoint, and a
run resumed at its last step says it is finished instead of exiting silently (1 gloo rank)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests.dist_pool import DistPool
from tests.training.helpers import run_config, write_config, write_markov_corpus


def _train(rank, world, cfg_path, overrides):
    import logging

    from megatron.config import load_config
    from megatron.training.trainer import Trainer

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    log = logging.getLogger("megatron")
    level, log.level = log.level, logging.INFO
    log.addHandler(handler)
    try:
        trainer = Trainer(load_config([cfg_path], overrides, world))
        start = trainer.step
        losses = [v["loss"] for v in trainer.train()]
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return {"start": start, "losses": losses, "messages": messages}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    prefix = write_markov_corpus(tmp / "corpus")
    valid = write_markov_corpus(tmp / "valid", docs=40, seed=1)
    cfg = run_config(tmp, prefix, **{"training.train_iters": 4, "training.eval_interval": 2})
    cfg["data"]["valid"] = [{"path": str(valid)}]
    cfg["training"]["eval_iters"] = 1
    pool = DistPool(1)
    yield SimpleNamespace(tmp=tmp, cfg=str(write_config(tmp / "run.yml", cfg)), pool=pool)
    pool.close()


def _records(path):
    return [(r["split"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]


def test_metrics_once_per_step_after_a_resume_and_a_finished_run_says_so(env):
    save, logs = env.tmp / "ckpt", env.tmp / "logs"
    ck = [f"checkpoint.save={save}", "checkpoint.save_interval=2", f"logging.dir={logs}"]
    first = env.pool.run(_train, env.cfg, ck)[0]
    assert len(first["losses"]) == 4
    expected = [("valid", 0), ("train", 1), ("train", 2), ("valid", 2)]
    expected += [("train", 3), ("train", 4), ("valid", 4)]
    assert _records(logs / "metrics.jsonl") == expected
    # a crash after step 4 was logged but before its checkpoint: the last one is step 2
    (save / "latest").write_text("iter_0000002\n")

    again = env.pool.run(_train, env.cfg, [*ck, f"checkpoint.load={save}"])[0]
    assert again["start"] == 2 and again["losses"] == pytest.approx(first["losses"][2:])
    assert _records(logs / "metrics.jsonl") == expected  # steps 3, 4 once, valid 2 kept

    done = env.pool.run(_train, env.cfg, [*ck, f"checkpoint.load={save}"])[0]
    assert done["start"] == 4 and done["losses"] == []
    assert (
        f"run already finished: step 4 of training.train_iters 4 in {save}; nothing to do "
        "(raise training.train_iters to continue)"
    ) in done["messages"]
    assert _records(logs / "metrics.jsonl") == expected
