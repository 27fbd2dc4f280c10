"""Converted checkpoints in the trainer, on 2 gloo ranks (one pool for the module).

HF Llama -> native (TP=2) -> ``Trainer`` with ``checkpoint.finetune: true`` at ZeRO 0-3:
the loaded weights are exactly the converted ones; 3 training steps later the saved checkpoint
(ZeRO-3: fp32 partitions only, rebuilt through DeepSpeed's ``zero_to_fp32``) is exported to HF and
transformers' loss on a batch equals our engine's loss on it. Also: loading at another TP size
(resharded on the fly), and one clear error per bad load (full resume of a weights-only
checkpoint, missing directory, model config that does not fit the weights).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml

from megatron.ckpt.convert import convert_hf_to_native, convert_native_to_hf
from megatron.ckpt.native import read_model_shard
from megatron.model.convert_config import model_config_from_hf
from megatron.model.hf_mapping import hf_to_native_state_dict
from tests.dist_pool import DistPool
from tests.model.hf_models import save_random_model
from tests.training.helpers import VOCAB, run_config, write_config, write_markov_corpus

LOSS_TOL = 1e-5


def _batch() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))


def _finetune(rank, world, cfg_paths, overrides, train):
    """Build a Trainer (loading the checkpoint), snapshot its weights, optionally train, then
    return the weights before and after and the engine's mean next-token loss on :func:`_batch`."""
    import deepspeed

    from megatron.config import load_config
    from megatron.training.trainer import Trainer

    trainer = Trainer(load_config(cfg_paths, overrides, world))
    module = trainer.engine.module
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(partitioned, enabled=bool(partitioned)):
        loaded = {k: v.detach().clone() for k, v in module.state_dict().items()}
    losses = [v["loss"] for v in trainer.train()] if train else []
    with deepspeed.zero.GatheredParameters(partitioned, enabled=bool(partitioned)):
        after = {k: v.detach().clone() for k, v in module.state_dict().items()}
    tokens = _batch()
    module.eval()
    with torch.no_grad():
        out = module(tokens[:, :-1], targets=tokens[:, 1:])
    loss = -out["token_logps"].mean().item()
    return {"loaded": loaded, "after": after, "losses": losses, "loss": loss}


def _load_only(rank, world, cfg_paths, overrides):
    from megatron.config import load_config
    from megatron.training.checkpointing import CheckpointError
    from megatron.training.trainer import Trainer

    try:
        Trainer(load_config(cfg_paths, overrides, world))
    except CheckpointError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from transformers import LlamaConfig

    tmp = tmp_path_factory.mktemp("ckpt_trainer")
    hf_cfg = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
    )
    hf = save_random_model(hf_cfg, tmp / "hf")
    convert_hf_to_native(hf.dir, tmp / "native", tp_size=2, divisible_by=32)
    run = run_config(tmp, write_markov_corpus(tmp / "corpus"), **{"parallel.tensor": 2})
    del run["model"]  # comes from the converted model.yml
    paths = [str(tmp / "native" / "model.yml"), str(write_config(tmp / "run.yml", run))]
    pool = DistPool(2)
    yield SimpleNamespace(tmp=tmp, hf=hf, paths=paths, pool=pool)
    pool.close()


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_finetune_train_export_matches_transformers(env, zero):
    from transformers import AutoModelForCausalLM

    native, save = env.tmp / "native", env.tmp / f"run_z{zero}"
    overrides = [
        f"parallel.zero_stage={zero}",
        f"checkpoint.load={native}",
        "checkpoint.finetune=true",
        f"checkpoint.save={save}",
        "training.train_iters=3",
    ]
    results = env.pool.run(_finetune, env.paths, overrides, True)
    args = model_config_from_hf(env.hf.config, tp_size=2, divisible_by=32)
    for rank, res in enumerate(results):
        expected = hf_to_native_state_dict(env.hf.state_dict, args, 2, rank)
        assert res["loaded"].keys() == expected.keys()
        assert all(torch.equal(res["loaded"][k], expected[k]) for k in expected), rank
    losses = results[0]["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    config = yaml.safe_load((save / "iter_0000003" / "config.yml").read_text())
    out = convert_native_to_hf(
        save, env.tmp / f"hf_z{zero}", config=config, extras_dir=native / "hf"
    )
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens = _batch()
    with torch.no_grad():
        hf_loss = model(tokens, labels=tokens).loss.item()
    ours = results[0]["loss"]
    original = AutoModelForCausalLM.from_pretrained(env.hf.dir, attn_implementation="eager")
    with torch.no_grad():
        untrained = original.eval()(tokens, labels=tokens).loss.item()
    assert abs(untrained - hf_loss) > 1e-3  # the export holds the trained weights
    print(
        f"ZeRO-{zero}: transformers loss {hf_loss:.7f}, ours {ours:.7f}, |diff| {abs(hf_loss - ours):.1e}"
    )
    assert abs(hf_loss - ours) <= LOSS_TOL


def test_finetune_at_another_tp_reshards_on_load(env):
    overrides = [
        "parallel.tensor=1",
        f"checkpoint.load={env.tmp / 'native'}",
        "checkpoint.finetune=true",
    ]
    results = env.pool.run(_finetune, env.paths, overrides, False)
    args = model_config_from_hf(env.hf.config, tp_size=1, divisible_by=32)
    expected = hf_to_native_state_dict(env.hf.state_dict, args, 1, 0)
    for res in results:  # two data-parallel replicas of the TP=1 model
        assert all(torch.equal(res["loaded"][k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel.zero_stage=1", "training.precision=bf16"],
        ["parallel.zero_stage=2"],
        ["parallel.zero_stage=3"],
    ],
    ids=["zero1-bf16", "zero2", "zero3"],
)
def test_optimizer_master_weights_start_from_the_loaded_ones(env, overrides):
    """One step at a vanishing learning rate leaves the loaded weights unchanged, so the
    optimizer's fp32 master copy was refreshed from them (else the step would write the random
    initialisation back). In bf16 the module holds the converted weights rounded to bf16."""
    base = [f"checkpoint.load={env.tmp / 'native'}", "checkpoint.finetune=true"]
    base += ["training.train_iters=1", "optimizer.lr=1e-30", "schedule.warmup_iters=0"]
    results = env.pool.run(_finetune, env.paths, [*base, *overrides], True)
    args = model_config_from_hf(env.hf.config, tp_size=2, divisible_by=32)
    for rank, res in enumerate(results):
        expected = hf_to_native_state_dict(env.hf.state_dict, args, 2, rank)
        dtype = res["loaded"]["embedding.weight"].dtype
        assert all(torch.equal(res["loaded"][k], expected[k].to(dtype)) for k in expected)
        assert all(torch.equal(res["after"][k], res["loaded"][k]) for k in expected)


def test_finetune_from_a_zero3_training_checkpoint(env):
    """At TP=2 DeepSpeed's own weights-only load of a ZeRO-3 checkpoint fails (its zero_to_fp32
    mixes the TP ranks' partitions); ours consolidates one TP rank at a time."""
    native, save = env.tmp / "native", env.tmp / "z3_train"
    first = ["parallel.zero_stage=3", f"checkpoint.load={native}", "checkpoint.finetune=true"]
    env.pool.run(
        _finetune, env.paths, [*first, f"checkpoint.save={save}", "training.train_iters=2"], True
    )
    again = ["parallel.zero_stage=3", f"checkpoint.load={save}", "checkpoint.finetune=true"]
    results = env.pool.run(_finetune, env.paths, again, False)
    args = model_config_from_hf(env.hf.config, tp_size=2, divisible_by=32)
    for rank, res in enumerate(results):
        trained = read_model_shard(save / "iter_0000002", rank)
        assert all(torch.equal(res["loaded"][k], trained[k]) for k in trained)
        original = hf_to_native_state_dict(env.hf.state_dict, args, 2, rank)
        assert not all(torch.equal(trained[k], original[k]) for k in original)


def test_bad_loads_fail_clearly(env):
    native = env.tmp / "native"
    cases = [
        ([f"checkpoint.load={native}"], ["holds weights only", "checkpoint.finetune: true"]),
        ([f"checkpoint.load={native / 'nowhere'}", "checkpoint.finetune=true"], ["does not exist"]),
        (
            [f"checkpoint.load={native}", "checkpoint.finetune=true", "model.ffn_hidden_size=96"],
            ["does not fit the run's model config", "layers.0.mlp.linear_fc1.weight"],
        ),
        (
            [f"checkpoint.load={native}", "checkpoint.finetune=true"]
            + ["parallel.tensor=1", "parallel.pipeline=2"],
            ["holds no pipeline layer files", "use parallel.pipeline: 1"],
        ),
    ]
    for overrides, fragments in cases:
        errors = env.pool.run(_load_only, env.paths, overrides)
        assert all(e and all(f in e for f in fragments) for e in errors), errors
