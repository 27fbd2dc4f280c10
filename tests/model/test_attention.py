"""flash-attn (varlen) against torch SDPA on packed and prefix-shared bf16 batches (GPU only).

Rows pack several sequences (segment ids 1, 2, ...; 0 = padding, positions restart per
sequence). Both backends must realise the block-diagonal causal rule of
:class:`~megatron.model.layout.SequenceLayout`; on the scored (non-padding) tokens their outputs
agree to bf16 round-off, and each packed sequence gives what it gives alone.

Tolerance (bf16: 8 significant bits, unit round-off ``U_BF16 = 2**-8``): an attention output is a
softmax-weighted mean of value rows, ``|out| <= max|v|``. Both kernels accumulate in fp32, but a
kernel may round the scores ``s = q.k / sqrt(hn)`` to bf16 (each probability then moves by a
relative ``U_BF16 * max|s|``), rounds the probabilities to bf16 for ``P @ V`` (relative
``U_BF16``) and rounds the output (``U_BF16 * |out|``). Against an fp32 reference on the same bf16
inputs: ``|diff| <= U_BF16 * (1 + max|s|) * max|v| + U_BF16 * |out|``; between the two bf16
kernels twice that (about 0.2 for these N(0, 1) inputs, ``max|s|`` ~ 5). A mask bug (a token
attending to another sequence) moves the first outputs of each later sequence, which average
only a few value rows, by O(|v|) ~ 1-3: outside.
"""

from __future__ import annotations

import pytest
import torch

from megatron.model.attention import SequenceLayout, flash_attention, sdpa_attention

U_BF16 = 2.0**-8

LENGTHS = [[20, 30, 10], [40, 24], [7, 1, 33, 15]]  # per row; rows padded to S
S, NP, NK, HN = 64, 8, 2, 64  # GQA: 4 query heads per kv head


def _packed_layout(device: torch.device) -> SequenceLayout:
    seg = torch.zeros(len(LENGTHS), S, dtype=torch.long)
    pos = torch.zeros(len(LENGTHS), S, dtype=torch.long)
    for r, lengths in enumerate(LENGTHS):
        start = 0
        for i, n in enumerate(lengths):
            seg[r, start : start + n] = i + 1
            pos[r, start : start + n] = torch.arange(n)
            start += n
    return SequenceLayout(position_ids=pos.to(device), segment_ids=seg.to(device))


def _assert_bf16_close(got: torch.Tensor, want: torch.Tensor, bound: float, kernels: int) -> None:
    """``|got - want| <= kernels * (bound + U_BF16 |want|)`` (see the module docstring)."""
    torch.testing.assert_close(
        got.float(), want.float(), atol=kernels * bound, rtol=kernels * U_BF16
    )


@pytest.mark.gpu(needs=["flash-attn"])
def test_flash_equals_sdpa_on_a_packed_bf16_batch():
    device = torch.device("cuda")
    torch.manual_seed(0)
    b = len(LENGTHS)
    # [b, s, np, hn] queries; [b, s, nk, hn] keys and values
    q = torch.randn(b, S, NP, HN, device=device, dtype=torch.bfloat16)
    k = torch.randn(b, S, NK, HN, device=device, dtype=torch.bfloat16)
    v = torch.randn(b, S, NK, HN, device=device, dtype=torch.bfloat16)
    layout = _packed_layout(device)
    flash = flash_attention(q, k, v, layout)
    sdpa = sdpa_attention(q, k, v, layout)
    reference = sdpa_attention(q.float(), k.float(), v.float(), layout)  # fp32, same inputs
    scored = layout.segment_ids != 0
    kv = k.float().repeat_interleave(NP // NK, dim=2)  # [b, s, nk, hn] -> [b, s, np, hn]
    s_max = float((torch.einsum("bsnh,btnh->bnst", q.float(), kv) / HN**0.5).abs().max())
    bound = U_BF16 * (1 + s_max) * float(v.float().abs().max())
    assert flash.shape == sdpa.shape == q.shape
    _assert_bf16_close(flash[scored], reference[scored], bound, kernels=1)
    _assert_bf16_close(sdpa[scored], reference[scored], bound, kernels=1)
    _assert_bf16_close(flash[scored], sdpa[scored], bound, kernels=2)
    # each packed sequence attends only to itself: the same as that sequence alone (dense causal)
    for r, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            piece = slice(start, start + n)
            alone = SequenceLayout.causal(1, n, device=device)
            row = [t[r : r + 1, piece] for t in (q, k, v)]
            _assert_bf16_close(flash[r : r + 1, piece], flash_attention(*row, alone), bound, 2)
            start += n


@pytest.mark.gpu(needs=["flash-attn"])
def test_flash_equals_sdpa_on_packed_prefix_shared_bf16_rows():
    """Prefix-shared spans packed per row: flash-attn's varlen path (each completion's keys =
    its prompt's + its own, no mask) against SDPA's grouped mask, on the scored tokens (same
    tolerance as above); also with a sliding window, measured in positions by both."""
    from tests.model.test_layout import _packed

    device = torch.device("cuda")
    rows = [[(30, 12, 20), (8, 16, 4)], [(50, 6, 7)], [(3, 40, 1), (10, 10, 10)]]
    layout = _packed(rows).to(device)
    b, s = layout.position_ids.shape
    torch.manual_seed(1)
    q = torch.randn(b, s, NP, HN, device=device, dtype=torch.bfloat16)
    k = torch.randn(b, s, NK, HN, device=device, dtype=torch.bfloat16)
    v = torch.randn(b, s, NK, HN, device=device, dtype=torch.bfloat16)
    scored = layout.segment_ids != 0
    kv = k.float().repeat_interleave(NP // NK, dim=2)
    s_max = float((torch.einsum("bsnh,btnh->bnst", q.float(), kv) / HN**0.5).abs().max())
    bound = U_BF16 * (1 + s_max) * float(v.float().abs().max())
    for window in (None, 16):
        reference = sdpa_attention(q.float(), k.float(), v.float(), layout, window=window)
        flash = flash_attention(q, k, v, layout, window=window)
        _assert_bf16_close(flash[scored], reference[scored], bound, kernels=1)
        _assert_bf16_close(
            flash[scored], sdpa_attention(q, k, v, layout, window=window)[scored], bound, 2
        )
