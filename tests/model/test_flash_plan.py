"""The flash-attn backend's varlen plans, on CPU: :func:`flash_attention` run against a pure-torch
stand-in for ``flash_attn_varlen_func`` / ``flash_attn_func`` that implements their documented
semantics (flash-attn 2.1+: with ``causal=True`` the mask is aligned to the bottom-right corner,
query ``i`` of a sequence sees key ``j <= i + seqlen_k - seqlen_q``; ``window_size = (left,
right)`` keeps keys in ``[i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]``).

What this checks is our part — which tokens form each query sequence, which keys it is given and
in what order (a prefix's keys gathered for every segment continuing it) — against the SDPA
backend's dense mask on the same packed prefix-shared rows. The GPU test in test_attention.py
runs the real kernels. fp64 stand-in: both sides compute each output from the same allowed keys
(masked keys weigh exactly 0), so they agree to a few fp64 ulps of O(1) outputs; 1e-12 keeps a
1000x margin, and a key given to the wrong sequence moves outputs by O(0.1).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from megatron.model.attention import flash_attention, sdpa_attention, varlen_plan
from megatron.model.layout import SequenceLayout
from tests.model.test_layout import PACKED_ROWS, _packed, prefix_layout


def _reference_varlen(
    q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, causal=False, window_size=(-1, -1)
):
    """flash_attn_varlen_func's documented semantics, one sequence at a time (fp64 math)."""
    assert dropout_p == 0.0 and causal
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    assert cu_q.dtype == cu_k.dtype == torch.int32
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for n in range(cu_q.numel() - 1):
        qs, qe, ks, ke = int(cu_q[n]), int(cu_q[n + 1]), int(cu_k[n]), int(cu_k[n + 1])
        lq, lk = qe - qs, ke - ks
        i = torch.arange(lq).view(-1, 1)
        j = torch.arange(lk).view(1, -1)
        allowed = j <= i + lk - lq
        if window_size[0] >= 0:
            allowed &= j >= i + lk - lq - window_size[0]
        qq = q[qs:qe].transpose(0, 1)  # [heads, lq, hn]
        kk = k[ks:ke].repeat_interleave(groups, 1).transpose(0, 1)
        vv = v[ks:ke].repeat_interleave(groups, 1).transpose(0, 1)
        scores = (qq @ kk.transpose(1, 2)) / q.shape[-1] ** 0.5
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[qs:qe] = (probs @ vv).transpose(0, 1)
    return out


def _reference_dense(q, k, v, dropout_p=0.0, causal=False, window_size=(-1, -1)):
    b, s = q.shape[:2]
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32)
    flat = lambda t: t.reshape(b * s, *t.shape[2:])  # noqa: E731
    out = _reference_varlen(flat(q), flat(k), flat(v), cu, cu, s, s, dropout_p, causal, window_size)
    return out.view_as(q)


@pytest.fixture
def fake_flash(monkeypatch):
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = _reference_varlen
    module.flash_attn_func = _reference_dense
    monkeypatch.setitem(sys.modules, "flash_attn", module)


def _qkv(layout: SequenceLayout, seed: int = 5):
    b, s = layout.position_ids.shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, s, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("kind", ["prefix", "segments", "causal"])
@pytest.mark.parametrize("window", [None, 3])
def test_flash_plans_equal_sdpa(fake_flash, kind, window):
    layout = _packed(PACKED_ROWS, prefix=kind == "prefix")
    if kind == "causal":
        layout = SequenceLayout.causal(*layout.position_ids.shape)
    q, k, v = _qkv(layout)
    want = sdpa_attention(q, k, v, layout, window=window)
    got = flash_attention(q, k, v, layout, window=window)
    real = torch.ones_like(layout.position_ids, dtype=torch.bool)
    if layout.segment_ids is not None:
        real = layout.segment_ids != 0
        assert torch.all(got[~real] == 0)
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-12)


def test_prefix_plan_gathers_the_prompt_for_each_completion():
    """``[prompt (3) | chosen (2) | rejected (2)]``: three query sequences; chosen's keys are
    the prompt then chosen, rejected's the prompt then rejected (never chosen)."""
    plan = varlen_plan(prefix_layout(3, 2, 2))
    assert plan.tokens.tolist() == list(range(7))
    assert plan.cu_q.tolist() == [0, 3, 5, 7] and plan.cu_k.tolist() == [0, 3, 8, 13]
    assert plan.key_index.tolist() == [0, 1, 2] + [0, 1, 2, 3, 4] + [0, 1, 2, 5, 6]
    assert (plan.max_q, plan.max_k) == (3, 5)


def test_prefix_plan_refuses_a_missing_prefix():
    layout = SequenceLayout(
        torch.tensor([[0, 1, 2]]), torch.tensor([[1, 1, 2]]), torch.tensor([[0, 0, 5]])
    )
    with pytest.raises(ValueError, match="not in its row"):
        varlen_plan(layout)
