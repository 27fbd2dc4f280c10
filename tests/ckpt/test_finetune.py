"""Converted checkpoints in the trainer, on 2 gloo ranks (one pool for the module).

HF Llama -> native (TP=2) -> ``Trainer`` with ``checkpoint.finetune: true`` at ZeRO 0-3:
the loaded weights are exactly the converted ones; 3 training steps later the saved checkpoint
(ZeRO-3: fp32 partitions only, rebuilt through DeepSpeed's ``zero_to_fp32``) is exported to HF and
transformers' loss on a batch equals our engine's loss on it. Also: loading at another TP size
(resharded on the fly), and one clear error per bad load (full resume of a weights-only
checkpoint, missing directory, model config that does not fit the weights). Pipeline runs
(PP=2) start from converted (TP, PP) = (1, 2), (2, 2) and non-pipeline (2, 1) checkpoints, and a
PP=2 training checkpoint exports to HF with the trained model's logits.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml

from megatron.ckpt.convert import convert_hf_to_native, convert_native_to_hf
from megatron.ckpt.hf_config import model_config_from_hf
from megatron.ckpt.hf_mapping import hf_to_native_state_dict, native_key_of, pipeline_layer_of
from megatron.ckpt.native import load_tp_shard, read_model_shard
from megatron.model.gpt import GPTModel
from megatron.parallel.state import ParallelState
from tests.ckpt.hf_models import save_random_model
from tests.dist_pool import DistPool
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


def _pipeline_finetune(rank, world, cfg_paths, overrides, train):
    """Build a pipeline Trainer (loading the checkpoint); this stage's weights before and after
    optional training (keys as in ``PipelineModule.state_dict()``)."""
    from megatron.config import load_config
    from megatron.training.trainer import Trainer

    trainer = Trainer(load_config(cfg_paths, overrides, world))
    module = trainer.engine.module
    loaded = {k: v.detach().clone() for k, v in module.state_dict().items()}
    losses = [v["loss"] for v in trainer.train()] if train else []
    after = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {"loaded": loaded, "after": after, "losses": losses}


def _deepspeed_load(rank, world, cfg_paths, overrides, ckpt):
    """DeepSpeed's own weights-only load (``PipelineEngine`` -> ``load_state_dir``) of ``ckpt``
    into a freshly initialised pipeline Trainer; this stage's weights."""
    from megatron.config import load_config
    from megatron.training.trainer import Trainer

    engine = Trainer(load_config(cfg_paths, overrides, world)).engine
    path, _ = engine.load_checkpoint(
        str(ckpt),
        tag="iter_0000000",
        load_module_strict=True,
        load_optimizer_states=False,
        load_lr_scheduler_states=False,
        load_module_only=True,
    )
    assert path is not None
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


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
    for tp in (1, 2):
        convert_hf_to_native(hf.dir, tmp / f"tp{tp}pp2", tp_size=tp, pp_size=2, divisible_by=32)
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
            [f"checkpoint.load={native}", "checkpoint.finetune=true", "model.ffn_hidden_size=96"]
            + ["parallel.tensor=1", "parallel.pipeline=2"],
            ["does not fit the run's model: layers.", ".mlp.linear_fc", "at TP=1"],
        ),
    ]
    for overrides, fragments in cases:
        errors = env.pool.run(_load_only, env.paths, overrides)
        assert all(e and all(f in e for f in fragments) for e in errors), errors


PP2 = ["parallel.tensor=1", "parallel.pipeline=2", "checkpoint.finetune=true"]


def _as_pipeline(native: dict[str, torch.Tensor], args) -> dict[str, torch.Tensor]:
    """Native keys -> the ``PipelineModule``'s ``"{layer}.{key}"`` (untied embeddings)."""
    return {"{}.{}".format(*pipeline_layer_of(k, args)): t for k, t in native.items()}


@pytest.mark.parametrize("source", ["tp1pp2", "tp2pp2", "native"])
def test_pipeline_run_loads_converted_weights(env, source):
    """A PP=2 run (TP=1) holds exactly the converted weights, from pipeline checkpoints at TP=1
    and TP=2 (resharded on load) and from the non-pipeline TP=2 one."""
    overrides = [*PP2, f"checkpoint.load={env.tmp / source}"]
    results = env.pool.run(_pipeline_finetune, env.paths, overrides, False)
    args = model_config_from_hf(env.hf.config, tp_size=1, divisible_by=32)
    expected = _as_pipeline(hf_to_native_state_dict(env.hf.state_dict, args, 1, 0), args)
    stages = [res["loaded"] for res in results]
    assert sorted(k for sd in stages for k in sd) == sorted(expected)  # two disjoint stages
    for sd in stages:
        assert all(torch.equal(sd[k], expected[k]) for k in sd)
    if source == "tp1pp2":  # the layout is DeepSpeed's: its own loader reads it too
        ckpt = env.tmp / source
        pp = ["parallel.tensor=1", "parallel.pipeline=2"]
        for sd in env.pool.run(_deepspeed_load, env.paths, pp, ckpt):
            assert all(torch.equal(sd[k], expected[k]) for k in sd)


def test_pipeline_run_loads_tied_embeddings(env):
    """Tied embeddings: both PP stages' copies of the shared embedding (``tied_modules``) hold the
    converted one, from a (TP=2, PP=2) conversion resharded to TP=1 on load."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{**env.hf.config.to_dict(), "tie_word_embeddings": True})
    hf = save_random_model(cfg, env.tmp / "hf_tied", seed=5)
    ckpt = env.tmp / "tied_tp2pp2"
    convert_hf_to_native(hf.dir, ckpt, tp_size=2, pp_size=2, divisible_by=32)
    paths = [str(ckpt / "model.yml"), env.paths[1]]
    results = env.pool.run(_pipeline_finetune, paths, [*PP2, f"checkpoint.load={ckpt}"], False)
    args = model_config_from_hf(hf.config, tp_size=1, divisible_by=32)
    native = hf_to_native_state_dict(hf.state_dict, args, 1, 0)
    expected = _as_pipeline(native, args)
    expected["tied_modules.embedding.weight"] = expected.pop("0.weight")
    for res in results:
        assert set(res["loaded"]) <= set(expected)
        assert all(torch.equal(res["loaded"][k], expected[k]) for k in res["loaded"])
        assert torch.equal(
            res["loaded"]["tied_modules.embedding.weight"], native["embedding.weight"]
        )


def test_pipeline_trained_checkpoint_exports_the_trained_model(env):
    """PP=2: train 3 steps from the (TP=2, PP=2) conversion, export the saved checkpoint to HF:
    its tensors are the trained ones, and transformers' logits and loss match our model's."""
    from transformers import AutoModelForCausalLM

    save = env.tmp / "pp_run"
    overrides = [*PP2, f"checkpoint.load={env.tmp / 'tp2pp2'}", f"checkpoint.save={save}"]
    results = env.pool.run(
        _pipeline_finetune, env.paths, [*overrides, "training.train_iters=3"], True
    )
    args = model_config_from_hf(env.hf.config, tp_size=1, divisible_by=32)
    n = args.num_layers
    trained = {
        native_key_of(int(k.split(".", 1)[0]), k.split(".", 1)[1], n): t
        for res in results
        for k, t in res["after"].items()
    }
    tag = save / "iter_0000003"
    assert any(tag.glob("layer_*-model_00-model_states.pt"))
    saved = load_tp_shard(tag, args, 1, 0)
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[k], trained[k]) for k in trained)
    original = hf_to_native_state_dict(env.hf.state_dict, args, 1, 0)
    assert not all(torch.equal(trained[k], original[k]) for k in original)

    config = yaml.safe_load((tag / "config.yml").read_text())
    out = convert_native_to_hf(
        save, env.tmp / "hf_pp", config=config, extras_dir=env.tmp / "native" / "hf"
    )
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ours = GPTModel(args, ParallelState.single()).eval()
    ours.load_state_dict(trained, strict=True)
    tokens = _batch()
    with torch.no_grad():
        hf_out = hf(tokens, labels=tokens)
        logits = ours.logits(ours(tokens))
    diff = (hf_out.logits - logits).abs().max().item()
    ours_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
    ).item()
    print(f"PP=2 trained export: max|logit diff| {diff:.1e}, loss {hf_out.loss.item():.7f}")
    assert diff <= 1e-4
    assert abs(hf_out.loss.item() - ours_loss) <= LOSS_TOL
