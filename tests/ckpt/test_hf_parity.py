"""Logit parity of :class:`GPTModel` with Hugging Face models, through ``megatron.ckpt.hf_mapping``.

Each case builds a tiny random-weight transformers model (fp32, eager attention), converts its
weights and compares the logits of our model at TP = 1 (in process) and TP = 2 and 4 (one spawned
gloo group per world size covering every case). The weights are redrawn at O(1) scale, since
transformers' 0.02-std init leaves near-constant logits that would hide layout errors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron.ckpt.hf_config import model_config_from_hf
from megatron.ckpt.hf_mapping import hf_to_native_state_dict, native_to_hf_state_dict
from megatron.config import ModelConfig
from megatron.config.sections import padded_vocab_size
from megatron.model.gpt import GPTModel
from megatron.parallel.state import ParallelState

TOL = 1e-4
VOCAB, SEQ, BATCH = 300, 24, 2
# 8 query / 4 kv heads: grouped-query attention that still splits across 4 TP ranks.
LLAMA_SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=16,
    intermediate_size=96,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
NEOX_SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    rotary_pct=0.25,
    hidden_act="gelu",
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Below SEQ and inside the frequency range, so all three llama3 bands are exercised.
    "original_max_position_embeddings": 16,
}


def _hf_config(case: str):
    from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    builders = {
        "llama": lambda: LlamaConfig(**LLAMA_SIZES),
        "llama_bias": lambda: LlamaConfig(**LLAMA_SIZES, attention_bias=True, mlp_bias=True),
        "llama3_rope": lambda: LlamaConfig(**LLAMA_SIZES, rope_parameters=dict(LLAMA3_ROPE)),
        "mistral": lambda: MistralConfig(**LLAMA_SIZES, sliding_window=None),
        "mistral_window8": lambda: MistralConfig(**LLAMA_SIZES, sliding_window=8),
        "qwen2": lambda: Qwen2Config(**LLAMA_SIZES),
        "qwen2_tied": lambda: Qwen2Config(**LLAMA_SIZES, tie_word_embeddings=True),
        "neox_parallel": lambda: GPTNeoXConfig(**NEOX_SIZES, use_parallel_residual=True),
        "neox_sequential": lambda: GPTNeoXConfig(**NEOX_SIZES, use_parallel_residual=False),
    }
    return builders[case]()


CASES = [
    "llama",
    "llama_bias",
    "llama3_rope",
    "mistral",
    "mistral_window8",
    "qwen2",
    "qwen2_tied",
    "neox_parallel",
    "neox_sequential",
]


def _build_reference(case: str) -> dict:
    """HF config, fp32 state dict, tokens and eager-attention logits for one case."""
    from transformers import AutoModelForCausalLM

    cfg = _hf_config(case)
    cfg._attn_implementation = "eager"
    torch.manual_seed(CASES.index(case))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" in name:
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:  # norm weights
                p.normal_(1.0, 0.1)
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
        tokens[0, :2] = torch.tensor([0, VOCAB - 1])  # both ends of the real vocabulary
        logits = model(tokens).logits
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"config": cfg, "state_dict": sd, "tokens": tokens, "logits": logits}


@pytest.fixture(scope="module")
def references() -> dict[str, dict]:
    return {case: _build_reference(case) for case in CASES}


def _native_logits(args: ModelConfig, sd: dict, tokens: torch.Tensor, state: ParallelState):
    model = GPTModel(args, state).eval()
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return model.logits(model(tokens))


@pytest.mark.parametrize("case", CASES)
def test_tp1_logits_match_hf(case: str, references: dict) -> None:
    ref = references[case]
    args = model_config_from_hf(ref["config"], tp_size=1)
    sd = hf_to_native_state_dict(ref["state_dict"], args, tp_size=1, tp_rank=0)
    logits = _native_logits(args, sd, ref["tokens"], ParallelState.single())
    diff = (logits - ref["logits"]).abs().max().item()
    print(f"parity {case} tp=1: max|diff|={diff:.3e} (max|logit|={ref['logits'].abs().max():.2f})")
    assert logits.shape == ref["logits"].shape
    assert diff <= TOL, f"{case}: max abs diff {diff:.3e} > {TOL}"


def test_config_mapping() -> None:
    llama3 = model_config_from_hf(_hf_config("llama3_rope"), tp_size=2)
    assert llama3.rope_scaling.type == "llama3" and llama3.rope_scaling.factor == 8.0
    assert llama3.rope_scaling.original_max_position_embeddings == 16
    assert (llama3.num_kv_heads, llama3.kv_channels, llama3.activation) == (4, 16, "swiglu")
    assert llama3.padded_vocab_size == 512 and llama3.vocab_size == VOCAB
    neox = model_config_from_hf(_hf_config("neox_parallel"))
    assert (neox.rotary_pct, neox.norm, neox.norm_bias, neox.activation) == (
        0.25,
        "layernorm",
        True,
        "gelu",
    )
    assert neox.parallel_residual and neox.qkv_bias and neox.proj_bias and neox.mlp_bias
    qwen = model_config_from_hf(_hf_config("qwen2_tied"))
    assert qwen.qkv_bias and not qwen.proj_bias and qwen.tie_word_embeddings
    assert model_config_from_hf(_hf_config("mistral_window8")).sliding_window == 8
    assert model_config_from_hf(_hf_config("mistral")).sliding_window is None
    assert padded_vocab_size(300, 128, 4) == 512 and padded_vocab_size(512, 128, 4) == 512
    assert padded_vocab_size(1, 128, 1) == 128


def test_unsupported_inputs_raise() -> None:
    from transformers import GPT2Config, GPTNeoXConfig, Qwen2Config

    with pytest.raises(ValueError, match="supported: llama, mistral, qwen2, gpt_neox"):
        model_config_from_hf(GPT2Config())
    mixed = Qwen2Config(
        **LLAMA_SIZES, use_sliding_window=True, sliding_window=8, max_window_layers=1
    )
    with pytest.raises(ValueError, match="max_window_layers"):
        model_config_from_hf(mixed)
    with pytest.raises(ValueError, match="hidden_act"):
        model_config_from_hf(GPTNeoXConfig(**{**NEOX_SIZES, "hidden_act": "relu"}))


def test_bad_state_dict_raises(references: dict) -> None:
    ref = references["llama"]
    args = model_config_from_hf(ref["config"])
    extra = dict(ref["state_dict"], **{"model.layers.0.mystery.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected Hugging Face keys.*mystery"):
        hf_to_native_state_dict(extra, args, 1, 0)
    missing = {k: v for k, v in ref["state_dict"].items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ValueError, match="no 'model.layers.1.mlp.up_proj.weight'"):
        hf_to_native_state_dict(missing, args, 1, 0)
    with pytest.raises(ValueError, match="num_kv_heads 4 is not divisible by TP 8"):
        hf_to_native_state_dict(ref["state_dict"], args, 8, 0)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_round_trip_is_exact(tp_size: int, references: dict) -> None:
    """HF -> native shards at TP=p -> HF gives back identical tensors (and shard shapes fit)."""
    for case in CASES:
        ref = references[case]
        args = model_config_from_hf(ref["config"], tp_size=tp_size)
        shards = [
            hf_to_native_state_dict(ref["state_dict"], args, tp_size, r) for r in range(tp_size)
        ]
        back = native_to_hf_state_dict(shards, args, ref["config"].model_type)
        assert back.keys() == ref["state_dict"].keys(), case
        for key, t in ref["state_dict"].items():
            assert torch.equal(back[key], t), f"{case}: {key}"
        # Padding rows are zero and every rank holds its own slice of them.
        pad = torch.cat([s["embedding.weight"] for s in shards])[args.vocab_size :]
        assert pad.shape[0] == args.padded_vocab_size - VOCAB and not pad.any()


def _tp_worker(rank: int, world: int, init_file: str, cases: list, out_dir: str) -> None:
    """One rank: load its shard of every case, compare gathered logits, report via a file."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    state = ParallelState.build(world)
    diffs = {}
    for name, args, hf_sd, tokens, expected in cases:
        sd = hf_to_native_state_dict(hf_sd, args, world, state.tp_rank)
        logits = _native_logits(args, sd, tokens, state)
        diffs[name] = (logits - expected).abs().max().item()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(diffs))
    dist.barrier()
    # why: normal interpreter exit after gloo use can abort in the process-group destructor.
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_tp_logits_match_hf(world: int, references: dict, tmp_path: Path) -> None:
    cases = []
    for case in CASES:
        ref = references[case]
        args = model_config_from_hf(ref["config"], tp_size=world)
        cases.append((case, args, ref["state_dict"], ref["tokens"], ref["logits"]))
    mp.spawn(_tp_worker, args=(world, str(tmp_path / "init"), cases, str(tmp_path)), nprocs=world)
    for rank in range(world):
        diffs = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert diffs.keys() == set(CASES)
        for case, diff in diffs.items():
            if rank == 0:
                print(f"parity {case} tp={world}: max|diff|={diff:.3e}")
            assert diff <= TOL, f"{case} tp={world} rank {rank}: max abs diff {diff:.3e} > {TOL}"
