"""Batched generation with the key/value cache: exactness, sampling, stopping, errors, TP and ZeRO.

Exactness is checked against a full (uncached) forward over prompt + generated tokens. Where it is
claimed exact the model is cast to fp64 and compared at ``atol=1e-10``: in fp64 the only difference
between the two paths (SDPA with an explicit mask over padded cache slots vs the causal kernel
over the bare sequence) is round-off, measured at ~1e-15. One fp32 check uses ``atol=1e-5``
(measured ~1e-6). Token equality is exact everywhere; a wide init (std 0.2) spreads the logits so
no argmax/CDF decision sits within round-off of a tie.
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron.config import ModelConfig
from megatron.model import GPTModel
from megatron.model.generate import GenerationOutput, SamplingConfig, generate, greedy_generate
from megatron.model.kv_cache import KVCache
from megatron.parallel import ParallelState
from tests.dist_pool import DistPool

VOCAB = 120
BASE = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_kv_heads=2,
    ffn_hidden_size=64,
    vocab_size=VOCAB,
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
GREEDY = SamplingConfig(max_new_tokens=16, temperature=0.0)
SAMPLED = SamplingConfig(max_new_tokens=16, temperature=0.8, top_k=40, top_p=0.95)


def _cfg(name: str) -> ModelConfig:
    return ModelConfig(**{**BASE, **VARIANTS[name]})


def _model(name: str, state: ParallelState | None = None, dtype=torch.float32) -> GPTModel:
    model = GPTModel(_cfg(name), state or ParallelState.single(), seed=3)
    return model.to(dtype)


def _prompts(lengths=(3, 9, 1, 6), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _full_logprobs(model: GPTModel, prompt: list[int], new: list[int], temperature=1.0):
    """Greedy tokens and ``log_softmax(logits / T)`` of ``new`` from one uncached forward."""
    seq = torch.tensor([prompt + new])
    with torch.no_grad():
        logits = model.eval().logits(model(seq))[0, len(prompt) - 1 : -1]  # [n, v]
    logp = (logits / temperature).log_softmax(-1)
    return logits.argmax(-1).tolist(), logp.gather(-1, torch.tensor(new)[:, None]).squeeze(-1)


# ---- exactness ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_greedy_tokens_and_logprobs_equal_full_forward_fp64(name):
    model = _model(name, dtype=torch.float64)
    prompts = _prompts()
    out = generate(model, prompts, GREEDY)
    assert out.tokens.shape == (4, 16) and out.lengths.tolist() == [16] * 4
    assert out.logprobs.dtype == torch.float64
    for i, (prompt, new) in enumerate(zip(prompts, out.to_lists(), strict=True)):
        argmax, logp = _full_logprobs(model, prompt, new)
        assert new == argmax
        torch.testing.assert_close(out.logprobs[i], logp, atol=1e-10, rtol=0)
        assert len(set(new)) > 1  # not a degenerate constant continuation


def test_greedy_fp32_close_to_full_forward():
    model = _model("llama-gqa")
    prompts = _prompts()
    out = generate(model, prompts, GREEDY)
    assert out.logprobs.dtype == torch.float32
    for i, (prompt, new) in enumerate(zip(prompts, out.to_lists(), strict=True)):
        argmax, logp = _full_logprobs(model, prompt, new)
        assert new == argmax
        torch.testing.assert_close(out.logprobs[i], logp, atol=1e-5, rtol=0)


def test_sampled_logprobs_are_temperature_scaled_full_forward():
    model = _model("neox", dtype=torch.float64)
    prompts = _prompts()
    out = generate(model, prompts, SAMPLED, seed=4)
    for i, (prompt, new) in enumerate(zip(prompts, out.to_lists(), strict=True)):
        _, logp = _full_logprobs(model, prompt, new, temperature=SAMPLED.temperature)
        torch.testing.assert_close(out.logprobs[i], logp, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["llama-gqa", "sliding-window"])
def test_batched_equals_one_at_a_time(name):
    model = _model(name, dtype=torch.float64)
    prompts = _prompts()
    batched = generate(model, prompts, GREEDY)
    for i, prompt in enumerate(prompts):
        single = generate(model, [prompt], GREEDY)
        assert single.to_lists()[0] == batched.to_lists()[i]
        torch.testing.assert_close(single.logprobs[0], batched.logprobs[i], atol=1e-12, rtol=0)
    assert [greedy_generate(model, p, 16) for p in prompts] == batched.to_lists()


def test_left_padded_right_padded_and_list_inputs_agree():
    model = _model("sliding-window")
    prompts = _prompts()
    width = max(map(len, prompts))
    left = torch.full((4, width), 7)
    right = torch.full((4, width), 7)
    left_mask = torch.zeros(4, width, dtype=torch.long)
    right_mask = torch.zeros(4, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        left[i, width - len(p) :], left_mask[i, width - len(p) :] = torch.tensor(p), 1
        right[i, : len(p)], right_mask[i, : len(p)] = torch.tensor(p), 1
    for cfg in (GREEDY, SAMPLED):
        ref = generate(model, prompts, cfg, seed=2)
        for tokens, mask in ((left, left_mask), (right, right_mask)):
            out = generate(model, tokens, cfg, attention_mask=mask, seed=2)
            assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.logprobs, ref.logprobs)


def test_cache_is_preallocated_and_reused():
    model = _model("llama-gqa").eval()
    cache = KVCache.for_model(model, batch=2, max_len=6)
    ptrs = [k.data_ptr() for k in cache.keys]
    logits = model(torch.tensor([[1, 2, 3], [4, 5, 6]]), kv_cache=cache)
    assert logits.shape == (2, VOCAB) and logits.dtype == torch.float32
    for _ in range(3):
        model(logits.argmax(-1, keepdim=True), kv_cache=cache)
    assert cache.length == 6 and [k.data_ptr() for k in cache.keys] == ptrs
    assert cache.next_positions.tolist() == [6, 6]
    with pytest.raises(ValueError, match="do not fit"):
        model(torch.tensor([[1], [2]]), kv_cache=cache)


# ---- sampling -------------------------------------------------------------------------------


def test_sampling_is_reproducible_per_seed():
    model = _model("llama-gqa")
    prompts = _prompts()
    a, b = generate(model, prompts, SAMPLED, seed=11), generate(model, prompts, SAMPLED, seed=11)
    c = generate(model, prompts, SAMPLED, seed=12)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    assert not torch.equal(a.tokens, generate(model, prompts, GREEDY).tokens)


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(max_new_tokens=16, temperature=1.0, top_k=1),
        SamplingConfig(max_new_tokens=16, temperature=1.5, top_p=1e-6),
    ],
    ids=["top_k=1", "tiny-top_p"],
)
def test_degenerate_sampling_equals_greedy(cfg):
    model = _model("neox")
    prompts = _prompts()
    assert torch.equal(
        generate(model, prompts, cfg, seed=5).tokens, generate(model, prompts, GREEDY).tokens
    )


def test_top_k_restricts_to_k_most_probable():
    model = _model("llama-gqa", dtype=torch.float64)
    prompt = _prompts((5,))[0]
    cfg = SamplingConfig(max_new_tokens=1, temperature=3.0, top_k=3)
    first = {generate(model, [prompt], cfg, seed=s).tokens[0, 0].item() for s in range(40)}
    with torch.no_grad():
        top3 = model.logits(model(torch.tensor([prompt])))[0, -1].topk(3).indices.tolist()
    assert first == set(top3)  # a high temperature reaches all three, top-k nothing else


# ---- stopping -------------------------------------------------------------------------------


def test_eos_stops_rows_independently():
    model = _model("llama-gqa")
    prompts = _prompts()
    free = generate(model, prompts, GREEDY).to_lists()
    eos = free[0][2]  # row 0 stops after 3 tokens; the others wherever eos first appears
    expect = [row[: row.index(eos) + 1] if eos in row else row for row in free]
    assert len({len(r) for r in expect}) > 1  # rows really stop at different steps
    out = generate(model, prompts, GREEDY, eos_id=eos, pad_id=-1)
    assert out.to_lists() == expect
    assert out.lengths.tolist() == [len(r) for r in expect]
    n = max(map(len, expect))
    assert out.tokens.shape == (4, n)
    for i, row in enumerate(expect):
        assert (out.tokens[i, len(row) :] == -1).all() and (out.logprobs[i, len(row) :] == 0).all()


def test_greedy_generate_eos_and_mode():
    model = _model("llama-gqa").train()
    prompt = [5, 6, 7]
    first = greedy_generate(model, prompt, 1)[0]
    assert greedy_generate(model, prompt, 10, eos_id=first) == [first]
    assert greedy_generate(model, torch.tensor(prompt), 4) == greedy_generate(model, prompt, 4)
    assert model.training


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("max_new_tokens", 0),
    ],
)
def test_bad_sampling_config(field, value):
    with pytest.raises(ValueError, match=f"SamplingConfig.{field} must"):
        SamplingConfig(**{field: value})


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([[1, 2], [3] * 60], dict(), r"prompt 1: 60 tokens \+ max_new_tokens 16 exceed"),
        ([[1], []], dict(), "prompt 1 is empty"),
        ([[1, VOCAB]], dict(), r"prompt 0 has token ids outside \[0, 120\)"),
        ([], dict(), "at least one prompt"),
        (torch.ones(2, 3, dtype=torch.long), dict(attention_mask=torch.ones(2, 4)), "shape"),
        ([[1, 2]], dict(attention_mask=torch.ones(1, 2)), "only accepted with"),
    ],
    ids=["too-long", "empty", "out-of-vocab", "no-prompts", "mask-shape", "mask-with-list"],
)
def test_bad_prompts(prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(_model("llama-gqa"), prompts, GREEDY, **kwargs)


# ---- tensor parallelism and DeepSpeed data parallelism (one 2-rank gloo pool) ---------------


@pytest.fixture(scope="module")
def pool():
    p = DistPool(2)
    yield p
    p.close()


def _tp_worker(rank, world, name, prompts):
    model = _model(name, ParallelState.build(world))
    return [generate(model, prompts, cfg, seed=9) for cfg in (GREEDY, SAMPLED)]


@pytest.mark.parametrize("name", ["llama-gqa", "sliding-window"])
def test_tp2_generates_the_same_tokens_as_tp1(pool, name):
    prompts = _prompts()
    model = _model(name)
    ref = [generate(model, prompts, cfg, seed=9) for cfg in (GREEDY, SAMPLED)]
    for per_rank in pool.run(_tp_worker, name, prompts):
        for got, want in zip(per_rank, ref, strict=True):
            assert torch.equal(got.tokens, want.tokens)
            torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=0)


def _zero_worker(rank, world, stage, prompts_per_rank, eos):
    from megatron.training.distributed import import_deepspeed

    os.environ.setdefault("LOCAL_RANK", str(rank))  # DeepSpeed's engine reads it
    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # wraps the pool's group
    state = ParallelState.build(1)  # DP = 2
    model = _model("llama-gqa", state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        # why: with the default threshold (1e5 elements) every tiny parameter stays whole and
        # ZeRO-3 gathers nothing in forward; 0 partitions them all
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, mpu=state.mpu, dist_init_required=False
    )
    if stage == 3:  # partitioned: each forward must all-gather every weight
        assert all(p.numel() == 0 for p in engine.module.parameters())
    prompts, group, seed = prompts_per_rank[rank], state.dp_group, 9 + state.dp_rank
    greedy = generate(engine, prompts, GREEDY, eos_id=eos, group=group)
    sampled = generate(engine, prompts, SAMPLED, eos_id=eos, group=group, seed=seed)
    return greedy, sampled


def _longest(rows: list[list[int]], eos: int) -> int:
    """Longest row after stopping at ``eos`` (16 when it never appears)."""
    return max(row.index(eos) + 1 if eos in row else len(row) for row in rows)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_engine_generates_like_the_plain_model(pool, stage):
    model = _model("llama-gqa")
    prompts_per_rank = [_prompts((4, 2), seed=21), _prompts((7, 3), seed=22)]
    free = [generate(model, p, GREEDY).to_lists() for p in prompts_per_rank]
    # an eos that ends rank 0's rows before rank 1's (so the lockstep all-reduce is exercised)
    eos = next(t for t in free[0][0] if _longest(free[0], t) < _longest(free[1], t))
    ref = [
        (
            generate(model, prompts, GREEDY, eos_id=eos),
            generate(model, prompts, SAMPLED, eos_id=eos, seed=9 + r),
        )
        for r, prompts in enumerate(prompts_per_rank)
    ]
    assert ref[0][0].lengths.max() < ref[1][0].lengths.max()
    for got, want in zip(pool.run(_zero_worker, stage, prompts_per_rank, eos), ref, strict=True):
        for g, w in zip(got, want, strict=True):
            assert isinstance(g, GenerationOutput)
            assert torch.equal(g.tokens, w.tokens) and torch.equal(g.lengths, w.lengths)
            torch.testing.assert_close(g.logprobs, w.logprobs, atol=1e-5, rtol=0)


def test_row_seeds_make_each_row_independent_of_its_batch():
    """With one seed per row a completion depends only on its prompt and seed: alone, in another
    batch, or at another position, it samples the same tokens (online RL relies on this to draw
    the same completions on every data-parallel layout); other seeds sample other tokens."""
    model = GPTModel(_cfg("llama-gqa"), ParallelState.single(), seed=3).eval()
    prompts = [[5, 9, 2], [7], [3, 3, 8, 1, 4], [11, 2]]
    seeds = [101, 202, 303, 404]
    both = generate(model, prompts, SAMPLED, row_seeds=seeds).to_lists()
    for i in range(len(prompts)):
        alone = generate(model, [prompts[i]], SAMPLED, row_seeds=[seeds[i]]).to_lists()[0]
        assert alone == both[i]
    swapped = generate(model, prompts[::-1], SAMPLED, row_seeds=seeds[::-1]).to_lists()
    assert swapped == both[::-1]
    other = generate(model, prompts, SAMPLED, row_seeds=[1, 2, 3, 4]).to_lists()
    assert other != both
    with pytest.raises(ValueError, match="row_seeds has 2 seeds for 4 rows"):
        generate(model, prompts, SAMPLED, row_seeds=[1, 2])


def test_repeat_shares_each_prompts_prefill():
    """``repeat=G`` runs each prompt once and copies its keys/values to its G rows: the same
    tokens and log-probs (fp64: the shared prefill only changes the batch size of the prompt's
    forward, so the values agree to round-off, 1e-12) as the prompts repeated G times."""
    model = GPTModel(_cfg("llama-gqa"), ParallelState.single(), seed=3).double().eval()
    prompts = [[5, 9, 2], [7], [3, 3, 8, 1, 4]]
    seeds = list(range(100, 112))
    shared = generate(model, prompts, SAMPLED, row_seeds=seeds, repeat=4, eos_id=7)
    plain = generate(
        model, [p for p in prompts for _ in range(4)], SAMPLED, row_seeds=seeds, eos_id=7
    )
    assert shared.to_lists() == plain.to_lists()
    torch.testing.assert_close(shared.logprobs, plain.logprobs, atol=1e-12, rtol=0)
    assert len({tuple(r) for r in shared.to_lists()[:4]}) > 1  # a prompt's rows differ
    with pytest.raises(ValueError, match="repeat must be an int >= 1"):
        generate(model, prompts, SAMPLED, repeat=0)


def test_logprob_temperature_scores_the_tempered_distribution():
    """``logprob_temperature`` T: the outputs are those of softmax(logits / T). The model is
    fp64 but its per-token outputs are fp32 (the log-softmax runs in fp32): values of O(5) agree
    to a few fp32 ulps, atol 1e-5; reading the untempered distribution would be off by O(0.1)."""
    cfg = _cfg("llama-gqa")
    plain = GPTModel(cfg, ParallelState.single(), seed=3).double().eval()
    tempered = GPTModel(
        cfg, ParallelState.single(), seed=3, logprob_temperature=0.7,
        outputs=("token_logps", "log_z", "entropy"),
    ).double().eval()  # fmt: skip
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    targets = tokens.roll(-1, 1)
    with torch.no_grad():
        logits = plain.logits(plain(tokens)) / 0.7
        out = tempered(tokens, None, targets)
    logp = logits.log_softmax(-1)
    tol = dict(atol=1e-5, rtol=0)
    want = logp.gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(out["token_logps"].double(), want, **tol)
    torch.testing.assert_close(out["entropy"].double(), -(logp.exp() * logp).sum(-1), **tol)
