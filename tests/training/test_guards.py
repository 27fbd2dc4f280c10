"""The divergence guard (``training.on_nonfinite``), its update filter, keep-finite pruning and the
collapse warning: pure logic over (loss, grad_norm) sequences, then two DP=2 end-to-end runs."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from megatron.config import ConfigError
from megatron.training.checkpointing import _prune, newest_finite_checkpoint
from megatron.training.guards import (
    COLLAPSE_TOLERANCE,
    DivergenceError,
    DivergenceGuard,
    NonFiniteUpdateFilter,
    StepFlags,
)
from tests.config.test_loader import load
from tests.dist_pool import DistPool
from tests.training.helpers import read_losses, run_config, write_config, write_markov_corpus

NAN, INF = float("nan"), float("inf")
LN_V = math.log(120)


def _run(guard, seq, dropped=True, last=None):
    """Feed ``[(loss, grad_norm), ...]``; returns (step of the error or None, error, warnings)."""
    warnings = []
    for step, (loss, grad_norm) in enumerate(seq, start=1):
        flags = StepFlags(not math.isfinite(loss), not math.isfinite(grad_norm), dropped)
        error, lines = guard.observe(step, flags, loss, grad_norm, nll=loss, last_checkpoint=last)
        warnings += lines
        if error is not None:
            return step, error, warnings
    return None, None, warnings


# ---- pure logic -----------------------------------------------------------------------------
def test_stop_names_step_quantity_value_and_no_checkpoint():
    step, error, _ = _run(DivergenceGuard("stop", 5, 0, None), [(3.0, 1.0), (NAN, NAN)])
    assert step == 2 and isinstance(error, DivergenceError) and error.step == 2
    assert str(error) == (
        "training stopped at step 2: loss is nan and grad_norm is nan; nothing saved for step 2;"
        " last good checkpoint: none saved yet [training.on_nonfinite: stop]"
    )


def test_stop_on_grad_norm_alone_names_the_checkpoint():
    guard = DivergenceGuard("stop", 5, 0, None)
    step, error, _ = _run(guard, [(3.0, 1.0), (2.9, INF)], last="ck/iter_0000001")
    assert step == 2 and "grad_norm is inf (loss 2.9)" in str(error)
    assert "last good checkpoint: ck/iter_0000001" in str(error)
    assert not guard.last_finite


def test_skip_step_counts_resets_and_stops_after_max_consecutive():
    guard = DivergenceGuard("skip_step", 3, 0, None)
    seq = [(3.0, 1.0), (NAN, NAN), (NAN, NAN), (2.8, 1.0), (NAN, NAN), (NAN, NAN), (NAN, NAN)]
    step, error, warnings = _run(guard, seq)
    assert step == 7 and guard.skipped == 5
    assert len(warnings) == 4  # steps 2, 3, 5, 6; step 7 is the stop
    assert warnings[0] == (
        "step 2: update skipped, loss is nan and grad_norm is nan; 1 in a row, 1 in this run "
        "[training.on_nonfinite: skip_step]"
    )
    assert "3 consecutive steps skipped (training.max_consecutive_skips: 3)" in str(error)


def test_skip_step_refuses_a_nonfinite_loss_whose_update_was_applied():
    guard = DivergenceGuard("skip_step", 3, 0, None)
    step, error, _ = _run(guard, [(INF, 1.0)], dropped=False)
    assert step == 1 and "the update was applied and cannot be skipped" in str(error)


def test_collapse_warns_once_per_stretch_at_ln_v_and_at_zero_grad_norm():
    guard = DivergenceGuard("stop", 5, 3, LN_V)
    at_ln_v = (LN_V + COLLAPSE_TOLERANCE / 2, 0.5)
    seq = [(LN_V + 0.004, 0.9)] + [at_ln_v] * 5 + [(3.0, 0.4)] + [at_ln_v] * 3
    _, error, warnings = _run(guard, seq)
    assert error is None
    assert len(warnings) == 2 and warnings[0].startswith("step 4: the per-token loss has been")
    assert "ln(model.vocab_size) (uniform predictions) for 3 steps" in warnings[0]
    assert warnings[1].startswith("step 10:")
    _, _, zero = _run(DivergenceGuard("stop", 5, 2, None), [(LN_V, 0.0)] * 4)
    assert len(zero) == 1 and "gradient norm has been exactly 0 for 2 steps" in zero[0]
    assert _run(DivergenceGuard("stop", 5, 0, LN_V), [(LN_V, 0.0)] * 30)[2] == []


def test_update_filter_leaves_weights_and_adamw_state_untouched():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    hook = NonFiniteUpdateFilter()
    opt.register_step_pre_hook(hook)
    w.grad = torch.tensor([1.0, NAN, 1.0])
    opt.step()
    assert hook.dropped and torch.equal(w.detach(), torch.ones(3)) and not opt.state[w]
    w.grad = torch.ones(3)
    opt.step()
    assert not hook.dropped and not torch.equal(w.detach(), torch.ones(3))
    # a norm that overflowed (huge but finite gradients) also drops the update
    big = NonFiniteUpdateFilter(SimpleNamespace(value=INF))
    opt2 = torch.optim.AdamW([w], lr=0.1)
    opt2.register_step_pre_hook(big)
    before = w.detach().clone()
    w.grad = torch.full((3,), 1e30)
    opt2.step()
    assert big.dropped and torch.equal(w.detach(), before)


# ---- keep_last and the newest finite checkpoint ---------------------------------------------
def _tags(root, finite_by_step, latest):
    for step, finite in finite_by_step.items():
        d = root / f"iter_{step:07d}"
        d.mkdir(parents=True)
        state = {"step": step} if finite is None else {"step": step, "finite": finite}
        (d / "client_state.json").write_text(json.dumps(state))
    (root / "latest").write_text(f"iter_{latest:07d}\n")


def test_prune_keeps_the_newest_finite_checkpoint(tmp_path):
    _tags(tmp_path, {1: None, 2: True, 3: False, 4: False, 5: False}, latest=5)
    assert newest_finite_checkpoint(tmp_path).name == "iter_0000002"
    _prune(tmp_path, 2, keep="iter_0000005")
    kept = sorted(p.name for p in tmp_path.glob("iter_*"))
    assert kept == ["iter_0000002", "iter_0000004", "iter_0000005"]


def test_newest_finite_ignores_unfinished_and_unpointed_tags(tmp_path):
    _tags(tmp_path, {1: True, 2: True}, latest=1)
    (tmp_path / "iter_0000003").mkdir()  # an interrupted save: no client state
    assert newest_finite_checkpoint(tmp_path).name == "iter_0000001"
    assert newest_finite_checkpoint(tmp_path / "absent") is None


# ---- config rules ---------------------------------------------------------------------------
def test_guard_config_rules(tmp_path):
    with pytest.raises(
        ConfigError, match=r"training\.max_consecutive_skips: must be >= 1 \(got 0\)"
    ):
        load(tmp_path, "training: {max_consecutive_skips: 0}\n")
    with pytest.raises(ConfigError, match=r"training\.collapse_steps: must be >= 0 \(got -1\)"):
        load(tmp_path, "training: {collapse_steps: -1}\n")
    with pytest.raises(ConfigError, match=r"training\.on_nonfinite: .*skip_step"):
        load(tmp_path, "training: {on_nonfinite: ignore}\n")
    assert load(tmp_path).training.on_nonfinite == "stop"


# ---- end to end: 2 data-parallel ranks ------------------------------------------------------
def _diverge(rank, world, cfg_path, overrides):
    from megatron.config import load_config
    from megatron.training.trainer import Trainer

    try:
        Trainer(load_config([cfg_path], overrides, world)).train()
    except DivergenceError as e:
        return {"step": e.step, "message": str(e)}
    return None


def _skip_one(rank, world, cfg_path, overrides, poison_step):
    """Poisons one gradient on rank 1 only at ``poison_step``; snapshots weights and AdamW
    step counts after every step."""
    from megatron.config import load_config
    from megatron.training.trainer import Trainer

    snaps = {}

    def snapshot(trainer, step):
        params = [p.detach().clone() for p in trainer.model.parameters()]
        counts = [float(s["step"]) for s in trainer.optimizer.state.values() if "step" in s]
        snaps[step] = (params, counts)

    trainer = Trainer(load_config([cfg_path], overrides, world), hooks=[snapshot])
    snapshot(trainer, 0)
    first = next(trainer.model.parameters())
    poison = rank == 1
    first.register_hook(lambda g: g * NAN if poison and trainer.step == poison_step - 1 else g)
    history = trainer.train()

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(snaps[a][0], snaps[b][0], strict=True))

    k = poison_step
    return {
        "unchanged": same(k, k - 1),
        "changed_before": not same(k - 1, k - 2),
        "changed_after": not same(k + 1, k),
        "adam_steps": (snaps[k - 1][1][:1], snaps[k][1][:1], snaps[k + 1][1][:1]),
        "losses": [v["loss"] for v in history],
        "skipped": [v.get("skipped_steps") for v in history],
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guards")
    prefix = write_markov_corpus(tmp / "corpus")
    cfg = run_config(tmp, prefix, **{"training.train_iters": 5})
    pool = DistPool(2)
    yield SimpleNamespace(tmp=tmp, cfg=str(write_config(tmp / "run.yml", cfg)), pool=pool)
    pool.close()


def test_lr_1e30_stops_at_step_2_on_every_rank_before_saving(env):
    save = env.tmp / "diverge_ckpt"
    overrides = [
        "optimizer.lr=1e30",
        f"checkpoint.save={save}",
        "checkpoint.save_interval=1",
        "checkpoint.keep_last=1",
        f"logging.dir={env.tmp / 'diverge_logs'}",
    ]
    results = env.pool.run(_diverge, env.cfg, overrides)
    assert results[0] == results[1]  # the same verdict at the same step on both ranks
    assert results[0]["step"] == 2
    assert results[0]["message"] == (
        "training stopped at step 2: grad_norm is nan (loss 4.78749); nothing saved for step 2; "
        f"last good checkpoint: {save / 'iter_0000001'} [training.on_nonfinite: stop]"
    )
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000001"]
    assert (save / "latest").read_text().strip() == "iter_0000001"
    assert json.loads((save / "iter_0000001" / "client_state.json").read_text())["finite"]
    losses = read_losses(env.tmp / "diverge_logs" / "metrics.jsonl")
    assert sorted(losses) == [1, 2]  # the diverged step is logged, then the run stops


def test_skip_step_drops_one_poisoned_update_and_continues(env):
    overrides = ["training.on_nonfinite=skip_step"]
    results = env.pool.run(_skip_one, env.cfg, overrides, 3)
    for r in results:
        assert r["unchanged"] and r["changed_before"] and r["changed_after"]
        before, at, after = r["adam_steps"]
        assert before == at and after == [before[0] + 1]  # AdamW's state skipped step 3 too
        assert all(math.isfinite(x) for i, x in enumerate(r["losses"]) if i != 2)
        assert r["skipped"] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert results[0]["losses"] == results[1]["losses"]


def test_deepy_exits_3_with_one_line_and_no_nan_checkpoint(tmp_path):
    """Through the real entry points: ``deepy.py`` -> torchrun -> 2 ranks, ``optimizer.lr=1e30``.
    The user sees one line (no rank traceback), the exit status is 3 and no checkpoint of the
    diverged step exists."""
    import subprocess

    from tests.training.stop_helpers import ROOT, deepy_command

    corpus = write_markov_corpus(tmp_path / "corpus")
    save = tmp_path / "ck"
    cfg = write_config(tmp_path / "run.yml", run_config(tmp_path, corpus))
    cmd = deepy_command(cfg, "optimizer.lr=1e30", f"checkpoint.save={save}")
    cmd += ["checkpoint.save_interval=1", "training.train_iters=4"]
    out = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    text = out.stdout + out.stderr
    assert out.returncode == 3, text[-3000:]
    lines = [ln for ln in text.splitlines() if "training stopped at step 2" in ln]
    assert len(lines) == 1, text[-3000:]  # rank 0 only
    assert (
        "grad_norm is nan" in lines[0] and f"last good checkpoint: {save}/iter_0000001" in lines[0]
    )
    assert "Traceback" not in text, text[-3000:]
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000001"]
