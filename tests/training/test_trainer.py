"""Trainer features on 2 gloo ranks at TP=2: precision, activation checkpointing, evaluation,
weights-only loading, checkpoint pruning; plus the pure schedule and logging helpers."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from megatron.training.metrics import format_line
from megatron.training.optimizer import learning_rate, param_groups
from tests.dist_pool import DistPool
from tests.training.helpers import run_config, write_config, write_markov_corpus


def _train(rank, world, cfg_path, overrides):
    from megatron.config import load_config
    from megatron.training.trainer import Trainer

    trainer = Trainer(load_config([cfg_path], overrides, world))
    start_step = trainer.step
    params = sum(float(p.double().sum()) for p in trainer.model.parameters())
    losses = [v["loss"] for v in trainer.train()]
    return {"losses": losses, "start_step": start_step, "initial_param_sum": params}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer")
    prefix = write_markov_corpus(tmp / "corpus")
    valid = write_markov_corpus(tmp / "valid", docs=40, seed=1)
    cfg = run_config(tmp, prefix, **{"parallel.tensor": 2, "training.train_iters": 4})
    cfg["data"]["valid"] = [{"path": str(valid)}]
    pool = DistPool(2)
    yield SimpleNamespace(tmp=tmp, cfg=str(write_config(tmp / "run.yml", cfg)), pool=pool)
    pool.close()


def run(env, *overrides):
    return env.pool.run(_train, env.cfg, list(overrides))[0]


def test_bf16_tracks_fp32(env):
    fp32 = run(env, "parallel.zero_stage=1")["losses"]
    bf16 = run(env, "parallel.zero_stage=1", "training.precision=bf16")["losses"]
    assert all(math.isfinite(x) for x in bf16)
    assert bf16 == pytest.approx(fp32, rel=1e-2)


def test_activation_checkpointing_replays_dropout_exactly(env):
    drop = ["model.attention_dropout=0.2", "model.hidden_dropout=0.2"]
    plain = run(env, *drop)["losses"]
    ckpt = run(env, *drop, "model.activation_checkpointing=true")["losses"]
    no_drop = run(env)["losses"]
    assert ckpt == plain  # same masks in the recomputation: bit-identical
    assert plain != no_drop  # dropout was really on


def test_evaluation_runs_at_start_and_every_interval(env):
    logs = env.tmp / "eval_logs"
    run(env, "training.eval_interval=2", "training.eval_iters=2", f"logging.dir={logs}")
    recs = [json.loads(x) for x in (logs / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in recs if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [0, 2, 4]
    assert valid[-1]["loss"] < valid[0]["loss"]
    train = [r for r in recs if r["split"] == "train"]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"} <= set(train[0])


def test_finetune_loads_weights_only_and_pruning_keeps_the_last(env):
    save = env.tmp / "ft_ckpt"
    first = run(
        env,
        f"checkpoint.save={save}",
        "checkpoint.save_interval=2",
        "checkpoint.keep_last=1",
        "training.train_iters=6",
    )
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000006"]
    assert (save / "latest").read_text().strip() == "iter_0000006"
    fresh = run(env, "training.train_iters=1", "schedule.warmup_iters=0")
    tuned = run(
        env,
        f"checkpoint.load={save}",
        "checkpoint.finetune=true",
        "training.train_iters=1",
        "training.seed=99",
        "schedule.warmup_iters=0",
    )
    assert tuned["start_step"] == 0 and len(tuned["losses"]) == 1
    assert tuned["initial_param_sum"] != pytest.approx(fresh["initial_param_sum"])
    # the loaded weights are the trained ones: the first loss starts where training ended
    assert tuned["losses"][0] < fresh["losses"][0] - 0.2
    assert first["losses"][-1] < first["losses"][0]


# ---- pure helpers ---------------------------------------------------------------------------
def _sched(**kw):
    base = dict(
        style="cosine", warmup_iters=None, warmup_fraction=None, min_lr=0.1, decay_iters=None
    )
    return SimpleNamespace(**{**base, **kw})


def test_learning_rate_schedules_by_hand():
    s = _sched(warmup_iters=2)
    assert learning_rate(1, 1.0, s, 12) == 0.5 and learning_rate(2, 1.0, s, 12) == 1.0
    # cosine: halfway through decay (t - W = 5 of 10) -> min + (peak - min) / 2
    assert learning_rate(7, 1.0, s, 12) == pytest.approx(0.55)
    assert learning_rate(12, 1.0, s, 12) == pytest.approx(0.1)
    assert learning_rate(50, 1.0, s, 12) == pytest.approx(0.1)  # clamped past the end
    lin = _sched(style="linear", warmup_fraction=0.25)  # 3 of 12 warm-up steps
    assert learning_rate(3, 2.0, lin, 12) == 2.0
    assert learning_rate(6, 2.0, lin, 12) == pytest.approx(0.1 + 1.9 * (1 - 3 / 9))
    assert learning_rate(9, 2.0, _sched(style="constant"), 12) == 2.0


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and [p.dim() for p in decay["params"]] == [2]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


def test_console_line():
    line = format_line(
        10,
        20,
        {
            "loss": 1.23456,
            "lr": 1e-3,
            "grad_norm": 0.5,
            "tokens_per_s": 1234.4,
            "samples_per_s": 3.0,
            "step_time": 0.1,
        },
        65.0,
        65.0,
    )
    assert line == (
        "step 10/20 | loss 1.2346 | lr 1.00e-03 | grad_norm 0.500 | tokens/s 1234 | "
        "samples/s 3.00 | elapsed 00:01:05 | eta 00:01:05"
    )


def test_pipeline_resume_and_activation_checkpointing(env):
    """PP=2: a run resumed from its step-2 checkpoint continues exactly; checkpointed stages
    replay dropout exactly."""
    pp = [
        "parallel.tensor=1",
        "parallel.pipeline=2",
        "model.hidden_dropout=0.1",
        "model.attention_dropout=0.1",
    ]
    straight = run(env, *pp)["losses"]
    save = env.tmp / "pp_ckpt"
    run(env, *pp, f"checkpoint.save={save}", "checkpoint.save_interval=2", "training.train_iters=2")
    resumed = run(env, *pp, f"checkpoint.load={save}", f"checkpoint.save={save}")
    assert resumed["start_step"] == 2
    assert resumed["losses"] == straight[2:]
    assert run(env, *pp, "model.activation_checkpointing=true")["losses"] == straight
