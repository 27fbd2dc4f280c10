"""Sequence layouts at the attention and log-prob level: causal, segments and prefix-shared.

The prefix-shared row ``[prompt | chosen | rejected]`` must give the per-sequence log-probs (and
parameter gradients) of the two padded rows ``prompt + chosen`` and ``prompt + rejected``. The
transformer runs in fp64 there, where the two layouts are the same math with masked keys
weighted exactly 0 (hidden states agree to ~1e-15). The vocabulary projection then rounds logits to
fp32 by design (``megatron.parallel.cross_entropy``) and the per-sequence sums are fp32, so a
hidden-state difference of 1e-15 can still flip the last bit of a token's fp32 log-prob: with at
most 8 scored tokens per sequence the sums may differ by 8 fp32 ulps, i.e. relative
8 * 2^-23 ~ 1e-6 — the tolerance used (a layout bug, such as rejected seeing chosen, moves the
sums by ~1e-1).
"""

from __future__ import annotations

import pytest
import torch

from megatron.data.batch import Batch
from megatron.model import GPTModel
from megatron.model.attention import sdpa_attention, select_backend
from megatron.model.layout import GroupedAttention, SequenceLayout
from megatron.objectives.logprobs import sequence_log_probs
from tests.helpers_runs import padded_batch, prefix_shared_batch, tiny_fp64_model

FP32_ULPS = {"rtol": 8 * 2**-23, "atol": 1e-7}  # see the module docstring


def prefix_layout(p: int, c: int, r: int) -> SequenceLayout:
    """One row ``[prompt (p) | chosen (c) | rejected (r)]``: segments 1, 2, 3; prefixes 0, 1, 1."""
    seg = torch.tensor([[1] * p + [2] * c + [3] * r])
    pre = torch.tensor([[0] * p + [1] * (c + r)])
    pos = torch.tensor([list(range(p)) + list(range(p, p + c)) + list(range(p, p + r))])
    return SequenceLayout(pos, seg, pre)


def test_prefix_mask_is_the_documented_rule():
    """Rows are queries: the prompt is causal; chosen sees prompt + itself; rejected sees the
    prompt + itself, never chosen."""
    mask = prefix_layout(2, 2, 2).attention_mask()[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [1, 1, 0, 0, 1, 1],
        ]
    )
    assert torch.equal(mask, expected)
    assert prefix_layout(2, 2, 2).kind == "prefix"


def test_padding_attends_to_itself_and_segments_stay_apart():
    seg = torch.tensor([[1, 1, 2, 0]])
    layout = SequenceLayout(torch.tensor([[0, 1, 0, 0]]), seg)
    mask = layout.attention_mask()[0, 0].int()
    assert torch.equal(mask, torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    assert layout.kind == "segments" and SequenceLayout.causal(1, 4).kind == "causal"
    assert SequenceLayout.causal(2, 3).attention_mask() is None


def test_bad_layouts_are_refused():
    pos = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="prefix_ids need segment_ids"):
        SequenceLayout(pos, None, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"segment_ids has shape \(1, 3\)"):
        SequenceLayout(pos, torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("kind", ["causal", "segments", "prefix"])
def test_pipeline_message_round_trip(kind):
    layout = prefix_layout(3, 2, 2)
    if kind == "causal":
        layout = SequenceLayout(layout.position_ids)
    elif kind == "segments":
        layout = SequenceLayout(layout.position_ids, layout.segment_ids)
    back = SequenceLayout.from_tensors(*layout.to_tensors())
    assert back.kind == kind
    for a, b in zip(
        (layout.position_ids, layout.segment_ids, layout.prefix_ids),
        (back.position_ids, back.segment_ids, back.prefix_ids),
        strict=True,
    ):
        assert (a is None and b is None) or torch.equal(a, b)


def test_auto_backend_is_sdpa_without_cuda():
    layout = prefix_layout(2, 1, 1)
    assert select_backend("auto", torch.bfloat16, torch.device("cpu"), layout) is sdpa_attention
    assert select_backend("sdpa", torch.float32, torch.device("cpu"), layout) is sdpa_attention
    with pytest.raises(RuntimeError, match="needs the flash-attn package, a CUDA device"):
        select_backend("flash", torch.bfloat16, torch.device("cpu"), layout)


def _model():
    return tiny_fp64_model()


def _prefix_shared(prompt: list[int], chosen: list[int], rejected: list[int]) -> Batch:
    """``[prompt | chosen | rejected]`` in one row; the prompt's last hidden state scores the
    first token of both completions (chosen via ``targets``, rejected via an extra target)."""
    return prefix_shared_batch([(prompt, chosen, rejected)], [[0]])


def _weighted_sums_and_grads(
    model: GPTModel, batch: Batch, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Per-sequence log-prob sums, counts, and the gradients of ``sum(weights * sums)``."""
    model.zero_grad()
    extra = batch.extra_targets
    args = () if extra is None else (extra.index, extra.targets)
    out = model(batch.tokens, batch.layout, batch.targets, *args)
    sums, counts = sequence_log_probs(out["token_logps"], batch, out.get("extra_logps"))
    (sums * weights.to(sums.dtype)).sum().backward()
    return sums.detach(), counts, [p.grad.clone() for p in model.parameters()]


def _sums_and_grads(model: GPTModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, list]:
    return _weighted_sums_and_grads(model, batch, torch.tensor([1.0, -0.5]))


@pytest.mark.parametrize("lengths", [(5, 4, 3), (1, 1, 1), (3, 1, 6)])
def test_prefix_shared_row_equals_padded_rows(lengths):
    """Per-sequence log-prob sums, token counts and parameter gradients are those of the two
    padded rows (tolerance: see the module docstring)."""
    p, c, r = lengths
    g = torch.Generator().manual_seed(sum(lengths))
    draw = lambda n: torch.randint(0, 64, (n,), generator=g).tolist()  # noqa: E731
    prompt, chosen, rejected = draw(p), draw(c), draw(r)
    model = _model()
    want, want_n, want_g = _sums_and_grads(model, padded_batch([(prompt, chosen, rejected)]))
    got, got_n, got_g = _sums_and_grads(model, _prefix_shared(prompt, chosen, rejected))
    torch.testing.assert_close(got, want, **FP32_ULPS)
    torch.testing.assert_close(got_n, want_n, rtol=0, atol=0)
    assert torch.equal(got_n, torch.tensor([float(c), float(r)], dtype=got_n.dtype))
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, **FP32_ULPS)


def test_extra_targets_need_their_log_probs():
    batch = _prefix_shared([1, 2], [3], [4, 5])
    with pytest.raises(ValueError, match="pass their extra_logps"):
        sequence_log_probs(torch.zeros(batch.shape, dtype=torch.float64), batch)


def test_a_leak_from_chosen_to_rejected_is_caught():
    """The same row with rejected allowed to see chosen (one segment for both) changes the
    rejected sum far beyond the tolerance: the equality above is not vacuous."""
    g = torch.Generator().manual_seed(0)
    prompt, chosen, rejected = (torch.randint(0, 64, (n,), generator=g).tolist() for n in (4, 3, 3))
    model = _model()
    batch = _prefix_shared(prompt, chosen, rejected)
    good = _sums_and_grads(model, batch)[0]
    seg = batch.layout.segment_ids.clone()
    seg[seg == 3] = 2
    leaky = batch.replace(
        layout=SequenceLayout(batch.layout.position_ids, seg, batch.layout.prefix_ids)
    )
    bad = _sums_and_grads(model, leaky)[0]
    assert abs(float(bad[1] - good[1])) > 1e-3 and float(bad[0]) == pytest.approx(float(good[0]))


def _spans_row(spans: list[tuple[int, int, int]], width: int) -> tuple[list, list, list]:
    """One row packing prefix-shared spans ``(p, c, r)`` (or plain sequences ``(n, 0, 0)``),
    right-padded to ``width``: ``(segment_ids, prefix_ids, position_ids)``."""
    seg, pre, pos, next_id = [], [], [], 1
    for p, c, r in spans:
        root = next_id
        seg += [root] * p
        pre += [0] * p
        pos += list(range(p))
        next_id += 1
        for n in (c, r):
            if n:
                seg += [next_id] * n
                pre += [root] * n
                pos += list(range(p, p + n))
                next_id += 1
    pad = width - len(seg)
    return seg + [0] * pad, pre + [0] * pad, pos + [0] * pad


def _packed(rows: list[list[tuple[int, int, int]]], prefix: bool = True) -> SequenceLayout:
    width = max(sum(sum(x) for x in spans) for spans in rows) + 1  # at least one padding slot
    seg, pre, pos = zip(*(_spans_row(spans, width) for spans in rows), strict=True)
    tensor = lambda x: torch.tensor(list(x))  # noqa: E731
    return SequenceLayout(tensor(pos), tensor(seg), tensor(pre) if prefix else None)


PACKED_ROWS = [[(5, 3, 4), (2, 1, 1), (1, 6, 2)], [(7, 2, 2)], [(3, 3, 3), (4, 1, 5)]]


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("window", [None, 4])
def test_grouped_attention_equals_the_dense_mask(prefix, window):
    """Rows packing several spans are gathered per span (varlen SDPA); every non-padding token's
    output equals the dense ``[s, s]`` mask's. fp64: the two compute each output from the same
    allowed keys with masked keys weighted exactly 0, so they agree to a few fp64 ulps of the
    O(1) outputs (1e-12 leaves a 1000x margin; a leak across spans moves outputs by O(0.1))."""
    layout = _packed(PACKED_ROWS, prefix)
    plan = layout.attention_plan(window)
    assert isinstance(plan, GroupedAttention), "these rows should be gathered (sparse)"
    spans = [x for row in PACKED_ROWS for x in row]
    groups = len(spans) if prefix else sum(1 + (c > 0) + (r > 0) for _, c, r in spans)
    assert plan.index.shape[0] == groups  # a span (or, without prefixes, each segment) per group
    b, s = layout.position_ids.shape
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, s, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, s, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    dense = SequenceLayout(layout.position_ids, layout.segment_ids, layout.prefix_ids)
    dense._memo[("attention", window)] = dense.attention_mask(window)  # force the dense path
    want = sdpa_attention(q, k, v, dense, window=window)
    got = sdpa_attention(q, k, v, layout, window=window)
    real = layout.segment_ids != 0
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-12)
    assert torch.all(got[~real] == 0)


def test_dense_plan_when_grouping_does_not_pay():
    """One span per row: gathering would not halve the scores, so the dense mask is kept (and
    built once per layout: every layer reuses it)."""
    layout = _packed([[(5, 3, 4)], [(4, 4, 4)]])
    plan = layout.attention_plan()
    assert isinstance(plan, torch.Tensor) and plan.shape == (2, 1, 13, 13)
    assert layout.attention_plan() is plan
    assert SequenceLayout.causal(2, 5).attention_plan() is None


def test_sliding_window_is_measured_in_positions():
    """A rejected token's window reaches back over the prompt by positions, as in the padded
    row ``prompt + rejected`` (chosen, between them in the row, does not shorten it)."""
    mask = prefix_layout(3, 4, 2).attention_mask(window=3)[0, 0]
    first_rejected = 7  # position 3: with window 3 it sees prompt positions 1, 2 and itself
    assert mask[first_rejected].nonzero().squeeze(1).tolist() == [1, 2, 7]


def test_prefix_shared_packed_row_equals_padded_rows():
    """Three spans packed in one row, through the whole fp64 model with the grouped plan: each
    span's log-prob sums and the gradients are those of its padded rows (tolerance: see the
    module docstring)."""
    g = torch.Generator().manual_seed(11)
    draw = lambda n: torch.randint(0, 64, (n,), generator=g).tolist()  # noqa: E731
    pairs = [(draw(p), draw(c), draw(r)) for p, c, r in [(5, 3, 4), (4, 2, 3), (6, 3, 2)]]
    packed = prefix_shared_batch(pairs, [[0, 1, 2]])
    assert isinstance(packed.layout.attention_plan(), GroupedAttention)
    model = _model()
    weights = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.5, 2.0], dtype=torch.float64)
    want, _, want_g = _weighted_sums_and_grads(model, padded_batch(pairs), weights)
    got, _, got_g = _weighted_sums_and_grads(model, packed, weights)
    torch.testing.assert_close(got, want, **FP32_ULPS)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, **FP32_ULPS)
