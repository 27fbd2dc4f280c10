"""Checkpoint conversion in one process: HF -> native -> HF round trips, resharding, dtypes,
the tools' command lines, and one clear error per kind of bad input.

Every case is a tiny random-weight transformers model saved with ``save_pretrained`` (Llama with
Llama-3 rope scaling in sharded safetensors with a tokenizer; Mistral with a sliding window; Qwen2
with tied embeddings; GPT-NeoX with parallel and sequential residual). Trainer loading at ZeRO 0/3
lives in ``test_finetune.py``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from megatron.ckpt import ConversionError
from megatron.ckpt.convert import convert_hf_to_native, convert_native_to_hf, reshard
from megatron.ckpt.hf_config import (
    architecture_mismatches,
    model_config_from_hf,
    model_config_from_section,
    model_section,
)
from megatron.ckpt.hf_mapping import hf_to_native_state_dict, native_shapes, pipeline_layer_of
from megatron.ckpt.native import load_tp_shard, read_model_shards
from megatron.config import ModelConfig, load_config
from megatron.model.gpt import GPTModel
from megatron.parallel.state import ParallelState
from tests.ckpt.hf_models import CASES, HFModel, hf_config, load_hf_tensors, save_random_model
from tests.helpers_runs import tiny_run_config
from tests.tools.helpers import checkpoint_config, load_tool

TOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, HFModel]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, case in enumerate(CASES):
        shard = "40KB" if case == "llama3" else None  # exercise the sharded index
        out[case] = save_random_model(hf_config(case), root / case, seed=i, max_shard_size=shard)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_tokenizer_dir / name, root / "llama3" / name)
    return out


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory) -> dict[str, Path]:
    """Every case converted at TP=2 (fp32)."""
    root = tmp_path_factory.mktemp("native")
    return {case: _converted(m.dir, root / case) for case, m in models.items()}


def _converted(hf_dir: Path, out: Path) -> Path:
    convert_hf_to_native(hf_dir, out, tp_size=2)
    return out


@pytest.mark.parametrize("case", CASES)
def test_hf_to_native_to_hf_is_exact(case, models, converted, tmp_path):
    ref, ckpt = models[case], converted[case]
    out = convert_native_to_hf(
        ckpt, tmp_path / "hf", config=checkpoint_config(ckpt), extras_dir=ckpt / "hf"
    )
    back = load_hf_tensors(out)
    expected = dict(ref.state_dict)
    if ref.config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # transformers re-ties it on load
    assert back.keys() == expected.keys()
    for key, t in expected.items():
        assert torch.equal(back[key], t), key
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(ref.tokens).logits
    assert torch.equal(logits, ref.logits)
    hf_json = json.loads((out / "config.json").read_text())
    assert hf_json["model_type"] == ref.config.model_type
    assert hf_json["hidden_act"] == ref.config.hidden_act
    assert (out / "generation_config.json").is_file()


def test_tokenizer_and_sharded_index_survive(models, converted, tmp_path):
    ckpt = converted["llama3"]
    assert sorted(p.name for p in (ckpt / "hf").iterdir()) == [
        "config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    tool = load_tool("tools/ckpts/convert_native_to_hf.py")  # default template: CKPT/hf
    assert tool.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--no-progress",
                      "--max-shard-size", "0.00005"]) == 0  # fmt: skip
    out = tmp_path / "hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "tokenizer.json").read_bytes() == (
        models["llama3"].dir / "tokenizer.json"
    ).read_bytes()
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == 512


@pytest.mark.parametrize("case", CASES)
def test_converted_checkpoint_runs_at_parity(case, models, converted, tmp_path):
    """model.yml loads with the real loader; the TP=2 shards resharded to TP=1 match HF logits."""
    ref, ckpt = models[case], converted[case]
    run = tmp_path / "run.yml"
    run.write_text(
        yaml.safe_dump(
            tiny_run_config(  # only its model section is read: the converted model.yml
                "markov",
                train="unused",
                with_model=False,
                **{
                    "data.seq_length": 16,
                    "optimizer.lr": 1e-4,
                    "training.train_iters": 1,
                    "schedule.warmup_iters": 0,
                },
            )
        )
    )
    cfg = load_config([ckpt / "model.yml", run], world_size=1).model
    assert (
        cfg.padded_vocab_size
        == native_shapes(model_config_from_hf(ref.config))["embedding.weight"][0]
    )
    model = GPTModel(cfg, ParallelState.single()).eval()
    model.load_state_dict(load_tp_shard(ckpt / "iter_0000000", cfg, 1, 0), strict=True)
    with torch.no_grad():
        logits = model.logits(model(ref.tokens))
    diff = (logits - ref.logits).abs().max().item()
    print(f"converted {case} (TP=2 -> 1): max|diff| = {diff:.2e}")
    assert diff <= TOL


def test_reshard_equals_direct_conversion(models, converted, tmp_path):
    """TP=2 -> 4 and -> 1 give exactly the shards a direct conversion at that TP gives."""
    ref, ckpt = models["mistral_window"], converted["mistral_window"]
    tool = load_tool("tools/ckpts/reshard.py")
    for tp in (4, 1):
        out = tmp_path / f"tp{tp}"
        assert (
            tool.main(["--ckpt", str(ckpt), "--out", str(out), "--tp", str(tp), "--no-progress"])
            == 0
        )
        args = model_config_from_hf(ref.config, tp_size=tp)
        shards = read_model_shards(out / "iter_0000000")
        assert len(shards) == tp
        for rank, sd in enumerate(shards):
            direct = hf_to_native_state_dict(ref.state_dict, args, tp, rank)
            assert sd.keys() == direct.keys()
            assert all(torch.equal(sd[k], direct[k]) for k in direct)
        assert checkpoint_config(out)["model"]["padded_vocab_size"] == args.padded_vocab_size
    assert (tmp_path / "tp1" / "hf" / "config.json").is_file()


@pytest.mark.parametrize("case", ["llama3", "qwen2_tied"])
def test_pipeline_layout_round_trips(case, models, converted, tmp_path):
    """HF -> (TP=2, PP=2) writes DeepSpeed's per-layer files holding exactly the direct TP=2
    shards; its export equals the HF model; (TP=2, PP=2) -> (TP=1, PP=1) equals a direct
    conversion at TP=1, and back to (TP=2, PP=2) gives the same files' tensors again."""
    ref = models[case]
    n = ref.config.num_hidden_layers
    pp = tmp_path / "tp2pp2"
    convert_hf_to_native(ref.dir, pp, tp_size=2, pp_size=2)
    tag = pp / "iter_0000000"
    layers = n + (2 if ref.config.tie_word_embeddings else 3)  # the tied head has no file
    names = {f"layer_{i:02d}-model_{r:02d}-model_states.pt" for i in range(layers) for r in (0, 1)}
    names |= {f"mp_rank_{k:02d}_model_states.pt" for k in range(4)}
    assert {p.name for p in tag.glob("*.pt")} == names
    assert torch.load(tag / "mp_rank_03_model_states.pt", weights_only=False)["module"] is None
    assert checkpoint_config(pp)["parallel"] == {"tensor": 2, "pipeline": 2}
    direct = read_model_shards(converted[case] / "iter_0000000")
    shards = read_model_shards(tag)
    assert len(shards) == 2
    for sd, want in zip(shards, direct, strict=True):
        assert sd.keys() == want.keys()
        assert all(torch.equal(sd[k], want[k]) for k in want)
    out = convert_native_to_hf(
        pp, tmp_path / "hf", config=checkpoint_config(pp), extras_dir=pp / "hf"
    )
    back = load_hf_tensors(out)
    expected = {k: t for k, t in ref.state_dict.items() if k in back}
    assert len(expected) == len(back) == len(ref.state_dict) - ref.config.tie_word_embeddings
    assert all(torch.equal(back[k], t) for k, t in expected.items())
    tool = load_tool("tools/ckpts/reshard.py")
    flat = tmp_path / "tp1pp1"
    assert tool.main(["--ckpt", str(pp), "--out", str(flat), "--tp", "1", "--no-progress"]) == 0
    args = model_config_from_hf(ref.config, tp_size=1)
    one = read_model_shards(flat / "iter_0000000")
    want = hf_to_native_state_dict(ref.state_dict, args, 1, 0)
    assert len(one) == 1 and one[0].keys() == want.keys()
    assert all(torch.equal(one[0][k], want[k]) for k in want)
    loaded = load_tp_shard(tag, args, 1, 0)  # a non-pipeline TP=1 run finetuning from PP=2
    assert all(torch.equal(loaded[k], want[k]) for k in want)
    again = tmp_path / "again"
    argv = ["--ckpt", str(flat), "--out", str(again), "--tp", "2", "--pp", "2", "--no-progress"]
    assert tool.main(argv) == 0
    assert {p.name for p in (again / "iter_0000000").glob("*.pt")} == names
    for sd, first in zip(read_model_shards(again / "iter_0000000"), shards, strict=True):
        assert all(torch.equal(sd[k], first[k]) for k in first)


def test_dtype_bf16_and_bin_input(models, tmp_path):
    """``--dtype bf16`` writes bf16 and the export keeps it; legacy ``pytorch_model.bin`` works."""
    ref = models["neox_parallel"]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(ref.dir / "config.json", legacy / "config.json")
    torch.save(ref.state_dict, legacy / "pytorch_model.bin")
    tool = load_tool("tools/ckpts/convert_hf_to_native.py")
    assert (
        tool.main(
            [
                "--hf-dir",
                str(legacy),
                "--out",
                str(tmp_path / "n"),
                "--dtype",
                "bf16",
                "--no-progress",
            ]
        )
        == 0
    )
    (sd,) = read_model_shards(tmp_path / "n" / "iter_0000000")
    args = model_config_from_hf(ref.config)
    direct = hf_to_native_state_dict(ref.state_dict, args, 1, 0)
    assert all(
        sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], direct[k].bfloat16()) for k in direct
    )
    out = convert_native_to_hf(
        tmp_path / "n", tmp_path / "hf", config=checkpoint_config(tmp_path / "n")
    )
    back = load_hf_tensors(out)
    assert all(back[k].dtype == torch.bfloat16 for k in back)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("case", CASES)
def test_model_section_round_trips_the_model_config(case):
    """The converters build a :class:`ModelConfig`; its ``model:`` section (what model.yml holds)
    reads back as the same config, derived fields included, at any TP size."""
    for tp in (1, 2):
        cfg = model_config_from_hf(hf_config(case), tp_size=tp, divisible_by=64)
        assert isinstance(cfg, ModelConfig) and cfg.make_vocab_size_divisible_by == 64
        section = model_section(cfg)
        assert "kv_channels" not in section and "padded_vocab_size" not in section
        assert model_config_from_section(section, tp) == cfg


def test_norm_bias_only_counts_for_layernorm():
    """RMSNorm has no bias: ``norm_bias`` (default true in the model section) must not make an
    RMSNorm model differ from its HF round trip or from a reference checkpoint's config."""
    from megatron.training.reference import architecture

    rms = model_config_from_hf(hf_config("llama3"))
    assert rms.norm == "rmsnorm"
    flipped = dataclasses.replace(rms, norm_bias=not rms.norm_bias)
    assert architecture_mismatches(rms, flipped) == []
    assert architecture(config_as_dict(rms)) == architecture(config_as_dict(flipped))
    ln = model_config_from_hf(hf_config("neox_parallel"))
    assert ln.norm == "layernorm"
    ln_flipped = dataclasses.replace(ln, norm_bias=not ln.norm_bias)
    assert [m.split(":")[0] for m in architecture_mismatches(ln, ln_flipped)] == ["norm_bias"]
    assert architecture(config_as_dict(ln)) != architecture(config_as_dict(ln_flipped))
    # a config saved before model.head existed reads as an lm-head model
    old = {k: v for k, v in config_as_dict(rms).items() if k != "head"}
    assert architecture(old) == architecture(config_as_dict(rms))


def config_as_dict(args):
    return dataclasses.asdict(args)


@pytest.mark.parametrize("case", ["qwen2_tied", "neox_parallel"])
def test_native_shapes_and_pipeline_layers(case):
    args = model_config_from_hf(hf_config(case))
    model = GPTModel(args, ParallelState.single())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == native_shapes(args)
    n = args.num_layers
    assert pipeline_layer_of("embedding.weight", args) == (0, "weight")
    assert pipeline_layer_of("layers.1.mlp.linear_fc2.weight", args) == (2, "mlp.linear_fc2.weight")
    assert pipeline_layer_of("final_norm.weight", args) == (n + 1, "norm.weight")
    assert pipeline_layer_of("lm_head.weight", args) == (n + 2, "weight")


# ---- bad input: one clear error each, nothing written ------------------------------------------
def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_hf_input_errors(models, tmp_path, tiny_tokenizer_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = models["mistral_window"].dir
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(gpt2)
    cases = [
        (gpt2, {}, r"architecture 'gpt2' \(GPT2LMHeadModel\) is not supported; supported: llama, mistral, qwen2, gpt_neox"),
        (tmp_path / "nowhere", {}, "no such directory"),
        (src, {"tp_size": 3}, "num_attention_heads 8 is not divisible by TP 3"),
        (src, {"tp_size": 8}, "num_kv_heads 4 is not divisible by TP 8"),
        (src, {"pp_size": 3}, "--pp 3: a pipeline stage needs at least one of the model's 2 "),
        (_edit_config(src, tmp_path / "shape", intermediate_size=128), {},
         r"mlp.gate_proj.weight: shape \(96, 64\) does not match the config's \(128, 64\)"),
        (_edit_config(src, tmp_path / "vocab", vocab_size=256), {},
         r"embed_tokens.weight: shape \(300, 64\) does not match the config's \(256, 64\)"),
    ]  # fmt: skip
    no_weights = shutil.copytree(src, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    cases.append((no_weights, {}, "holds no weights: expected model.safetensors"))
    no_config = shutil.copytree(src, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    cases.append((no_config, {}, "config.json is missing"))
    lost_shard = shutil.copytree(models["llama3"].dir, tmp_path / "lost_shard")
    sorted(lost_shard.glob("model-*.safetensors"))[-1].unlink()
    cases.append(
        (lost_shard, {}, r"index.json names model-\d+-of-\d+.safetensors, which is missing")
    )
    big_tokenizer = shutil.copytree(src, tmp_path / "big_tokenizer")
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", big_tokenizer)
    cases.append((big_tokenizer, {}, "token ids go up to 511, but the model's vocab_size is 300"))
    for i, (hf_dir, kw, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(ConversionError, match=message):
            convert_hf_to_native(hf_dir, out, **kw)
        assert not out.exists(), f"{hf_dir}: something was written"


def test_bad_native_input_errors(converted, tmp_path):
    ckpt = converted["qwen2_tied"]
    config = checkpoint_config(ckpt)
    lost = shutil.copytree(ckpt, tmp_path / "lost")
    (lost / "iter_0000000" / "mp_rank_01_model_states.pt").unlink()
    wrong = dict(config, model=dict(config["model"], ffn_hidden_size=128))
    cases = [
        (lost, config, {}, r"written at TP=2, but the model files of TP ranks \[1\] are missing"),
        (ckpt, wrong, {}, "weights do not match config.yml: TP rank 0: layers.0.mlp.linear_fc1.weight"),
        (ckpt, config, {"arch": "mistral"}, "cannot be written as 'mistral': biases are not supported"),
        (tmp_path / "nowhere", config, {}, "does not exist"),
    ]  # fmt: skip
    for i, (src, cfg, kw, message) in enumerate(cases):
        with pytest.raises(ConversionError, match=message):
            convert_native_to_hf(src, tmp_path / f"out{i}", config=cfg, **kw)
        assert not (tmp_path / f"out{i}").exists()
    with pytest.raises(ConversionError, match="--tp 3: num_attention_heads 8 is not divisible"):
        reshard(ckpt, tmp_path / "r", config=config, tp_size=3)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConversionError, match="exists and is not empty"):
        reshard(ckpt, tmp_path / "full", config=config, tp_size=1)


def test_cli_reports_errors(tmp_path, capsys):
    tool = load_tool("tools/ckpts/convert_hf_to_native.py")
    assert tool.main(["--hf-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.json is missing" in err
