"""The ``prefix_shared`` layout of pair batches: rows, edge cases and log-prob parity.

Parity tolerance (error model of ``tests/numerics.py``). The model runs in fp64, where a
prefix-shared span and the padded rows ``prompt + chosen`` / ``prompt + rejected`` are the same
math with masked keys weighted exactly 0 (hidden states agree to ~1e-15, see
``tests/model/test_layout.py``). The vocabulary projection rounds the logits to fp32 by design, so
each token's log-prob may still differ by 1 ulp of itself (<= ``ulp(S)`` for a sequence sum
``S``), and the per-sequence fp32 sums add their terms in another order (the extra target comes
last), which costs up to ``n * U * |S|`` <= ``n * ulp(S) / 2`` for ``n`` tokens. So a sequence's
sums may differ by ``1.5 n ulp(S)``; the test allows ``2 n ulp(S)`` (at most ~1e-5 here; a
layout bug such as rejected seeing chosen moves a sum by ~1e-1). Token counts must be equal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron.data.batch import Batch
from megatron.data.collators import Collator
from megatron.model.layout import SequenceLayout
from megatron.objectives.logprobs import sequence_log_probs
from tests.helpers_runs import tiny_fp64_model
from tests.numerics import ulp


def _pair(prompt: list[int], chosen: list[int], rejected: list[int], margin: float = 0.0) -> dict:
    arr = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return {
        "prompt": arr(prompt),
        "chosen": arr(chosen),
        "rejected": arr(rejected),
        "margin": margin,
    }


def test_one_span_per_row_hand_checked():
    """``prefix_shared``: each span in its own row, rows padded to the longest span (8 -> 8)."""
    samples = [_pair([10, 11, 12], [20, 21], [30, 31, 32]), _pair([13], [22], [33, 34])]
    b = Collator("pair", "prefix_shared", 16, 4, score_token="last")(samples)
    assert b.tokens.tolist() == [[10, 11, 12, 20, 21, 30, 31, 32], [13, 22, 33, 34, 0, 0, 0, 0]]
    assert b.layout.segment_ids.tolist() == [[1, 1, 1, 2, 2, 3, 3, 3], [1, 2, 3, 3, 0, 0, 0, 0]]
    assert b.layout.prefix_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0, 0, 0]]
    assert b.layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 1, 2, 0, 0, 0, 0]]
    extra = b.extra_targets
    assert extra.index.tolist() == [2, 8] and extra.targets.tolist() == [30, 33]
    assert b.score_index.tolist() == [4, 9, 7, 11]
    assert b.stats == {"packing_efficiency": 0.75, "real_tokens": 12.0}


def test_packed_rows_follow_the_rule_hand_checked():
    """``prefix_shared_packed``: two pairs in one row: ``[10 11 12 | 20 21 | 30 31 32]`` then
    ``[13 | 22 | 33 34]``."""
    samples = [_pair([10, 11, 12], [20, 21], [30, 31, 32], 0.5), _pair([13], [22], [33, 34], 1.5)]
    collate = Collator("pair", "prefix_shared_packed", 16, 4, with_margin=True, score_token="last")
    b = collate(samples)
    assert b.tokens.tolist() == [[10, 11, 12, 20, 21, 30, 31, 32, 13, 22, 33, 34]]
    assert b.layout.kind == "prefix"
    assert b.layout.segment_ids.tolist() == [[1, 1, 1, 2, 2, 3, 3, 3, 4, 5, 6, 6]]
    assert b.layout.prefix_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 0, 4, 4, 4]]
    assert b.layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 1, 2]]
    # the prompt predicts itself (unscored), then chosen[0]; chosen, rejected their next tokens
    assert b.targets.tolist() == [[11, 12, 20, 21, 0, 31, 32, 0, 22, 0, 34, 0]]
    assert b.sequence_ids.tolist() == [[-1, -1, 0, 0, -1, 2, 2, -1, 1, -1, 3, -1]]
    assert b.loss_mask.tolist() == (b.sequence_ids >= 0).float().tolist()
    extra = b.extra_targets  # rejected[0] at the prompt's last position
    assert extra.index.tolist() == [2, 8] and extra.targets.tolist() == [30, 33]
    assert extra.sequence_ids.tolist() == [2, 3]
    assert b.score_index.tolist() == [4, 9, 7, 11]  # chosen 0, 1 then rejected 0, 1: last tokens
    assert b.num_sequences == 4 and b.margin.tolist() == [0.5, 1.5]
    assert b.stats == {"packing_efficiency": 1.0, "real_tokens": 12.0}  # prompts counted once
    for t in (b.tokens, b.targets, b.sequence_ids, extra.index, extra.targets, extra.sequence_ids):
        assert t.dtype == torch.int64
    assert b.loss_mask.dtype == torch.float32


def _pairs(n: int, seed: int, prompt_range=(1, 12), completion_range=(0, 9)) -> list[dict]:
    rng = np.random.default_rng(seed)
    size = lambda lo_hi: int(rng.integers(*lo_hi))  # noqa: E731
    return [
        _pair(
            rng.integers(4, 60, size(prompt_range)).tolist(),
            rng.integers(4, 60, size(completion_range)).tolist(),
            rng.integers(4, 60, size(completion_range)).tolist(),
            float(rng.random()),
        )
        for _ in range(n)
    ]


def _per_sequence(batch: Batch, values: torch.Tensor, extra: torch.Tensor | None) -> tuple:
    return sequence_log_probs(values.double(), batch, None if extra is None else extra.double())


@pytest.mark.parametrize("layout", ["prefix_shared", "prefix_shared_packed"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trained_tokens_are_those_of_the_padded_layout(seed, layout):
    """Per sequence, the count and the sum (and sum of squares) of the trained target ids are
    the padded layout's: the same tokens are trained, each once. Empty completions included."""
    samples = _pairs(7, seed) + [_pair([5, 6], [], [7, 8]), _pair([9], [10], [])]
    padded = Collator("pair", "padded", 48)(samples)
    shared = Collator("pair", layout, 48)(samples)
    ex = shared.extra_targets.targets
    for f in (lambda t: t, lambda t: t * t):
        want = _per_sequence(padded, f(padded.targets), None)
        got = _per_sequence(shared, f(shared.targets), f(ex))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    counts = _per_sequence(shared, shared.targets, ex)[1]
    assert counts[7].item() == 0 and counts[7 + 9].item() == 2  # empty chosen: no token
    assert counts[8].item() == 1 and counts[8 + 9].item() == 0  # empty rejected: no token
    assert shared.stats["real_tokens"] == sum(
        x["prompt"].size + x["chosen"].size + x["rejected"].size for x in samples
    )
    if layout == "prefix_shared":
        assert shared.tokens.shape[0] == 9  # one pair per row
    else:
        assert shared.tokens.shape[0] < 9  # several pairs per row


@pytest.mark.parametrize("score_token", ["last", "eos"])
def test_score_index_is_the_padded_layouts_token(score_token):
    """Each sequence is scored at the same token (id and position) as in the padded layout."""
    eos = 3
    samples = _pairs(6, seed=4, completion_range=(1, 6))
    for i, x in enumerate(samples):
        for k, key in enumerate(("chosen", "rejected")):
            x[key] = np.concatenate([x[key], [eos], x[key][: (i + k) % 3]]).astype(np.int64)
    batches = [
        Collator("pair", layout, 48, score_token=score_token, eos_id=eos)(samples)
        for layout in ("padded", "prefix_shared")
    ]
    picked = [
        (b.tokens.reshape(-1)[b.score_index], b.layout.position_ids.reshape(-1)[b.score_index])
        for b in batches
    ]
    for a, b in zip(*picked, strict=True):
        assert torch.equal(a, b)
    if score_token == "eos":
        assert (picked[1][0] == eos).all()


def test_edge_cases_and_errors():
    one = Collator("pair", "prefix_shared", 8)([_pair([7], [8, 9], [10])])  # prompt of 1 token
    assert one.tokens[0, :4].tolist() == [7, 8, 9, 10]
    assert one.targets[0, :4].tolist() == [8, 9, 0, 0]
    assert one.sequence_ids[0, :4].tolist() == [0, 0, -1, -1]
    assert one.layout.position_ids[0, :4].tolist() == [0, 1, 2, 1]
    assert one.extra_targets.index.tolist() == [0] and one.extra_targets.targets.tolist() == [10]
    empty = Collator("pair", "prefix_shared", 8)([_pair([7, 8], [], [])])
    assert not empty.loss_mask.any() and empty.extra_targets.index.numel() == 0
    assert empty.layout.segment_ids[0, :2].tolist() == [1, 1]
    with pytest.raises(
        ValueError,
        match=r"pair 1 of the micro-batch has 9 tokens \(prompt \+ chosen \+ rejected in one "
        r"data\.layout: prefix_shared span\), more than data\.seq_length 8",
    ):
        Collator("pair", "prefix_shared", 8)([_pair([1], [2], [3]), _pair([1] * 5, [2, 2], [3, 3])])
    with pytest.raises(ValueError, match="layout 'prefix_shared' needs pair batches, got kind"):
        Collator("sequence", "prefix_shared", 8)
    with pytest.raises(ValueError, match=r"unknown layout 'shared'; choose from \['packed', 'pad"):
        Collator("pair", "shared", 8)


def _model():
    return tiny_fp64_model()


def _sequence_log_probs(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    extra = batch.extra_targets
    args = () if extra is None else (extra.index, extra.targets)
    with torch.no_grad():
        out = model(batch.tokens, batch.layout, batch.targets, *args)
    return sequence_log_probs(out["token_logps"], batch, out.get("extra_logps"))


@pytest.mark.parametrize("layout", ["prefix_shared", "prefix_shared_packed"])
@pytest.mark.parametrize("prompts", [(1, 4), (12, 30)], ids=["short_prompts", "long_prompts"])
def test_log_probs_equal_the_padded_layouts(prompts, layout):
    """A real tiny GPTModel: per-sequence log-prob sums and token counts of the prefix-shared
    rows (one or several pairs per row) are the padded rows' (tolerance: see the module
    docstring)."""
    samples = _pairs(6, seed=prompts[0], prompt_range=prompts, completion_range=(1, 9))
    samples.append(_pair(samples[0]["prompt"].tolist(), [11, 12], []))  # an empty rejected
    model = _model()
    want, want_n = _sequence_log_probs(model, Collator("pair", "padded", 64)(samples))
    shared = Collator("pair", layout, 64)(samples)
    assert (shared.tokens.shape[0] < len(samples)) == (layout == "prefix_shared_packed")
    got, got_n = _sequence_log_probs(model, shared)
    torch.testing.assert_close(got_n, want_n, rtol=0, atol=0)
    tol = torch.tensor([2 * n * ulp(float(s)) for n, s in zip(want_n, want, strict=True)])
    delta = (got - want).abs()
    assert (delta <= tol).all(), (delta.max().item(), tol.min().item())
    assert (want[want_n > 0] < 0).all() and want_n[-1] == 0
    # not vacuous: the same rows without prefix sharing (completions blind to their prompt)
    blind = shared.replace(
        layout=SequenceLayout(shared.layout.position_ids, shared.layout.segment_ids)
    )
    assert (_sequence_log_probs(model, blind)[0] - want).abs().max() > 1e-2


def test_reward_values_at_score_index_equal_the_padded_layouts():
    """A value-head GPTModel (fp64, fp32 values) read at ``score_index``: the rewards of both
    layouts agree up to the last bit of the fp32 values (1 ulp, relative 2^-23)."""
    from megatron.config import ModelConfig
    from megatron.model import GPTModel
    from megatron.parallel import ParallelState

    cfg = ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=2, vocab_size=64,
        make_vocab_size_divisible_by=32, max_position_embeddings=64, norm="rmsnorm",
        activation="swiglu", ffn_hidden_size=64, rotary_pct=0.5, head="value",
    )  # fmt: skip
    model = GPTModel(cfg, ParallelState.single(), seed=3).double().eval()
    samples = _pairs(6, seed=4, completion_range=(1, 6))
    rewards = []
    for layout in ("padded", "prefix_shared"):
        batch = Collator("pair", layout, 48, score_token="last")(samples)
        with torch.no_grad():
            values = model(batch.tokens, batch.layout, batch.targets)["values"]
        rewards.append(values.reshape(-1)[batch.score_index])
    torch.testing.assert_close(rewards[1], rewards[0], rtol=2**-23, atol=1e-9)
