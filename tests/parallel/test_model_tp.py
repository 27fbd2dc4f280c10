"""The GPT model at TP = 2 and 4 equals the unsharded model: logits, loss and gradients."""

from __future__ import annotations

import pytest
import torch

from megatron.config import ModelConfig
from megatron.model import GPTModel
from megatron.model.attention import SequenceLayout
from megatron.parallel import ParallelState

BASE = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    ffn_hidden_size=64,
    vocab_size=120,
    max_position_embeddings=64,
    norm="rmsnorm",
    activation="swiglu",
    attention_backend="sdpa",
)


# TP=2/4 vs the serial model, fp32 (error model: tests/numerics.py). TP reorders the h = 32 (and
# ffn 64) long dot products, the attention-head split and the V = 128 log-sum-exp; 2 layers deep,
# random rounding gives ~sqrt(64 + 128) u = 14 u relative per value, <= 1e-6 x |value|:
# * loss (a mean of 21 token log-probs ~ln 128 = 4.9, |diff| <= atol + rtol |value|): 5e-6 of
#   round-off against LOSS_TOL's 5e-5;
# * logits (|z| < 1 at this initialisation): ~1e-6 against 1e-5 + 1e-5 |z|;
# * gradients are sums over 24 tokens of signed terms that partly cancel, so their error is
#   relative to the sum of magnitudes, not to the (smaller) result: rtol 1e-4 on top of atol 1e-5.
LOSS_TOL = dict(atol=1e-6, rtol=1e-5)
LOGITS_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=1e-5, rtol=1e-4)

VARIANTS = {
    "llama-gqa": dict(),  # kv heads = TP size: GQA at TP=2, MHA at TP=4
    "neox": dict(
        norm="layernorm",
        activation="gelu",
        rotary_pct=0.25,
        parallel_residual=True,
        qkv_bias=True,
        proj_bias=True,
        mlp_bias=True,
    ),
    "qwen-tied-ckpt": dict(qkv_bias=True, tie_word_embeddings=True, activation_checkpointing=True),
}


def _inputs():
    torch.manual_seed(7)
    tokens = torch.randint(0, 120, (2, 12))
    targets = torch.randint(0, 120, (2, 12))
    seg = torch.tensor([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3])
    pos = torch.tensor([list(range(5)) + list(range(7)), list(range(9)) + [0] * 3])
    return tokens, targets, SequenceLayout(position_ids=pos, segment_ids=seg)


def _run(state, args):
    model = GPTModel(args, state, seed=11)
    tokens, targets, layout = _inputs()
    out = model(tokens, layout, targets)
    loss = -(out["token_logps"][layout.segment_ids > 0]).mean()
    loss.backward()
    logits = model.logits(model(tokens, layout))
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), logits, grads


def _args(name: str, kv: int) -> ModelConfig:
    # padded_vocab_size: 120 -> 128 (make_vocab_size_divisible_by 128 x TP 1; the same at TP 2/4
    # here because 128 is divisible by both)
    return ModelConfig(**{**BASE, **VARIANTS[name]}, num_kv_heads=kv)


def _tp_worker(rank, world, name, kv):
    args = _args(name, kv)
    return _run(ParallelState.build(world), args)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_model_tp_equals_serial(pool, name):
    kv = pool.world_size if name == "llama-gqa" else 4
    args = _args(name, kv)
    loss, logits, grads = _run(ParallelState.single(), args)
    for l_r, logits_r, grads_r in pool.run(_tp_worker, name, kv):
        torch.testing.assert_close(l_r, loss, **LOSS_TOL)
        torch.testing.assert_close(logits_r, logits, **LOGITS_TOL)
        # replicated parameters (norms, row-parallel biases) have the full gradient on every rank
        for n, g in grads_r.items():
            if g.shape == grads[n].shape:
                torch.testing.assert_close(g, grads[n], **GRAD_TOL, msg=n)
