"""Greedy decoding with the key/value cache equals re-running the full forward per token."""

from __future__ import annotations

import pytest
import torch

from megatron.config import ModelConfig
from megatron.model import GPTModel
from megatron.model.generate import forward_with_cache, greedy_generate
from megatron.parallel import ParallelState

BASE = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_kv_heads=2,
    ffn_hidden_size=64,
    vocab_size=120,
    max_position_embeddings=64,
    norm="rmsnorm",
    activation="swiglu",
    attention_backend="sdpa",
    # why: a wide init spreads the logits, so argmax ties (fp round-off) cannot flip a token
    init_method_std=0.2,
)
VARIANTS = {
    "llama-gqa": dict(),
    "neox": dict(
        norm="layernorm",
        activation="gelu",
        num_kv_heads=4,
        rotary_pct=0.25,
        parallel_residual=True,
        qkv_bias=True,
        proj_bias=True,
        mlp_bias=True,
    ),
    "sliding-window": dict(sliding_window=5, tie_word_embeddings=True),
}


def _model(name: str) -> GPTModel:
    return GPTModel(ModelConfig(**{**BASE, **VARIANTS[name]}), ParallelState.single(), seed=3)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cached_greedy_equals_uncached(name):
    model = _model(name)
    prompt = torch.randint(0, 120, (7,), generator=torch.Generator().manual_seed(1))
    cached = greedy_generate(model, prompt, 24, eos_id=None)
    plain = greedy_generate(model, prompt, 24, eos_id=None, use_cache=False)
    assert len(cached) == 24
    assert cached == plain
    assert len(set(cached)) > 1  # not a degenerate constant continuation


def test_cached_logits_match_full_forward():
    model = _model("sliding-window").eval()
    seq = torch.randint(0, 120, (1, 12), generator=torch.Generator().manual_seed(2))
    full = model.logits(model(seq))[0]  # [s, v]
    logits, cache = forward_with_cache(model, seq[:, :4], None)
    torch.testing.assert_close(logits[0], full[3], rtol=1e-5, atol=1e-5)
    for t in range(4, 12):
        logits, cache = forward_with_cache(model, seq[:, t : t + 1], cache)
        torch.testing.assert_close(logits[0], full[t], rtol=1e-5, atol=1e-5)
    assert cache.position == 12 and cache.layers[0][0].shape[1] == 4  # window - 1 kept


def test_stops_at_eos_and_restores_mode():
    model = _model("llama-gqa").train()
    prompt = [5, 6, 7]
    first = greedy_generate(model, prompt, 1)[0]
    assert greedy_generate(model, prompt, 10, eos_id=first) == [first]
    assert model.training
    with pytest.raises(ValueError, match="non-empty"):
        greedy_generate(model, [], 3)
