"""Attention backends, each realising a :class:`~megatron.model.layout.SequenceLayout`.

Shapes: b batch, s sequence, np heads on this TP rank, nk kv heads on this rank, hn head dim.

* ``sdpa`` (default, every device): torch's ``scaled_dot_product_attention`` — causal kernels for
  the causal layout, else the layout's attention plan (:meth:`SequenceLayout.attention_plan`): a
  boolean mask over the rows, or the rows' groups (packed sequences, prefix-shared spans)
  gathered into their own rows when that at least halves the scores computed;
* ``flash`` (flash-attn 2, CUDA, bf16/fp16): dense causal, or varlen with ``cu_seqlens`` for
  segments and for prefix sharing (each continuing segment's keys are its prefix's and its own,
  gathered; no mask is ever built).

Every backend gives the same outputs on the tokens that are scored (tested).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron.model.layout import GroupedAttention, SequenceLayout

__all__ = [
    "SequenceLayout",
    "VarlenPlan",
    "flash_attention",
    "sdpa",
    "sdpa_attention",
    "select_backend",
]


# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


@functools.cache
def flash_attn_available() -> bool:
    """True when the optional flash-attn package imports (CUDA machines only)."""
    try:
        import flash_attn  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return torch.cuda.is_available()


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    # [b, nk, s, hn] -> [b, nk*groups, s, hn]: each kv head serves `groups` query heads
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SequenceLayout,
    dropout_p: float = 0.0,
    window: int | None = None,
) -> torch.Tensor:
    """torch SDPA. ``q [b, s, np, hn]``, ``k, v [b, s, nk, hn]`` -> ``[b, s, np, hn]``."""
    b, s = q.shape[:2]
    win = window if window is not None and window < s else None
    plan = layout.attention_plan(win)
    if isinstance(plan, GroupedAttention):
        # varlen: each group in its own row of [n, L] (see megatron.model.layout)
        n, width = plan.index.shape
        rows = lambda t: _take(t.flatten(0, 1), plan.index.view(-1)).unflatten(0, (n, width))  # noqa: E731
        out = sdpa(rows(q), rows(k), rows(v), plan.mask, dropout_p)  # [n, L, np, hn]
        flat = _take(out.flatten(0, 1), plan.slots)  # [m, np, hn]: the groups' tokens
        full = q.new_zeros(b * s, *q.shape[2:]).index_copy(0, plan.tokens, flat)
        return full.view_as(q)  # padding tokens' outputs are 0 (never scored)
    return sdpa(q, k, v, plan, dropout_p)


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` along dim 0 by ``index_select``, whose backward is ``index_add_`` (advanced
    indexing's is a sorting ``index_put`` with accumulation: several times slower on CPU)."""
    return t.index_select(0, index)


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    """SDPA on ``[b, s, heads, hn]`` tensors with a boolean mask (``None`` = causal): the
    training layouts and the key/value-cached decoder (:mod:`megatron.model.kv_cache`) alike."""
    groups = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, s, heads, hn] -> [b, heads, s, hn]
    extra = {}
    if groups > 1 and q.device.type == "cpu" and _SDPA_GQA:
        # why: the CPU kernels broadcast kv heads themselves (same values, measured 1.3x faster
        # fwd+bwd, no repeated copies saved); CUDA keeps the repeat, since there a kv-head
        # broadcast can push a masked SDPA off the memory-efficient kernel onto the math one
        extra["enable_gqa"] = True
    else:
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, **extra)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **extra)
    return out.transpose(1, 2)  # [b, np, s, hn] -> [b, s, np, hn]


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SequenceLayout,
    dropout_p: float = 0.0,
    window: int | None = None,
) -> torch.Tensor:
    """flash-attn 2: dense causal, or varlen (``cu_seqlens``) for segments and prefix sharing.

    Prefix sharing never builds a mask: every segment is one query sequence whose keys are its
    shared prefix's tokens followed by its own (the prefix's keys and values gathered once per
    continuing segment), under flash-attn's bottom-right aligned causal mask — query ``i`` of a
    segment continuing a ``P``-token prefix sees keys ``j <= P + i``: all of the prompt and its
    own earlier tokens, never a sibling's. The sliding window ``(window - 1, 0)`` is aligned the
    same way, i.e. measured in positions (they continue from the prefix's end), as SDPA's.
    """
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    win = (window - 1, 0) if window is not None else (-1, -1)
    if layout.segment_ids is None:
        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True, window_size=win)
    b, s = layout.segment_ids.shape
    plan = layout.memo(("flash_varlen",), lambda: varlen_plan(layout))
    flat = lambda t: t.reshape(b * s, *t.shape[2:])  # noqa: E731  [b*s, heads, hn]
    keys = plan.tokens if plan.key_index is None else plan.key_index
    out = flash_attn_varlen_func(
        _take(flat(q), plan.tokens),
        _take(flat(k), keys),
        _take(flat(v), keys),
        plan.cu_q,
        plan.cu_k,
        plan.max_q,
        plan.max_k,
        dropout_p=dropout_p,
        causal=True,
        window_size=win,
    )
    full = q.new_zeros(b * s, *q.shape[2:]).index_copy(0, plan.tokens, out)
    return full.view_as(q)  # padding tokens' outputs are 0 (never scored)


@dataclass(frozen=True)
class VarlenPlan:
    """flash-attn varlen arguments for a segmented layout (see :func:`flash_attention`).

    Attributes:
        tokens: ``[m]`` flat index (``row * s + column``) of every non-padding token, in row
            order; the query sequences are its runs of one segment.
        cu_q: ``[nq + 1]`` int32 query sequence boundaries in ``tokens``.
        key_index: ``[mk]`` flat index of each key (a segment's prefix tokens, then its own),
            or ``None`` without prefix sharing (the keys are the queries).
        cu_k: ``[nq + 1]`` int32 key sequence boundaries.
        max_q: the longest query sequence; ``max_k`` the longest key sequence.
    """

    tokens: torch.Tensor
    cu_q: torch.Tensor
    key_index: torch.Tensor | None
    cu_k: torch.Tensor
    max_q: int
    max_k: int


def varlen_plan(layout: SequenceLayout) -> VarlenPlan:
    """The :class:`VarlenPlan` of a layout with ``segment_ids`` (each segment contiguous)."""
    seg = layout.segment_ids
    b, s = seg.shape
    tokens = torch.nonzero(seg.reshape(-1) != 0).squeeze(1)  # [m]
    rows = torch.div(tokens, s, rounding_mode="floor")
    key = rows * (s + 1) + seg.reshape(-1)[tokens]  # (row, segment)
    starts = torch.nonzero(torch.diff(key, prepend=key[:1] - 1)).squeeze(1)  # where a run starts
    end = starts.new_tensor([tokens.numel()])
    lengths = torch.diff(starts, append=end)
    cu_q = torch.cat([starts, end]).to(torch.int32)
    max_q = int(lengths.max()) if lengths.numel() else 0
    if layout.prefix_ids is None:
        return VarlenPlan(tokens, cu_q, None, cu_q, max_q, max_q)
    run_key = key[starts]
    if torch.unique(run_key).numel() != run_key.numel():
        raise ValueError("flash attention needs each segment's tokens contiguous in its row")
    lookup = torch.full((b * (s + 1),), -1, dtype=torch.long, device=seg.device)
    lookup[run_key] = torch.arange(run_key.numel(), device=seg.device)
    prefix = layout.prefix_ids.reshape(-1)[tokens[starts]]  # [nq] each run's prefix segment
    owner = lookup[rows[starts] * (s + 1) + prefix.clamp(max=s)]  # that prefix's own run
    has = prefix != 0
    if bool((has & ((owner < 0) | (prefix > s))).any()):
        raise ValueError("a segment's prefix_ids name a segment that is not in its row")
    owner = owner.clamp(min=0)
    pre_start = torch.where(has, starts[owner], 0)
    pre_len = torch.where(has, lengths[owner], 0)
    k_len = pre_len + lengths
    cu_k = torch.cat([k_len.new_zeros(1), torch.cumsum(k_len, 0)])
    run = torch.repeat_interleave(torch.arange(k_len.numel(), device=seg.device), k_len)
    offset = torch.arange(int(cu_k[-1]), device=seg.device) - cu_k[run]
    prefix_part = offset < pre_len[run]
    src = torch.where(prefix_part, pre_start[run] + offset, starts[run] + offset - pre_len[run])
    return VarlenPlan(tokens, cu_q, tokens[src], cu_k.to(torch.int32), max_q, int(k_len.max()))


def select_backend(
    name: str, dtype: torch.dtype, device: torch.device, layout: SequenceLayout | None = None
):
    """The attention function for ``model.attention_backend`` on this device, dtype and layout.

    Raises:
        RuntimeError: ``flash`` without flash-attn, CUDA or a half-precision dtype.
    """
    usable = (
        flash_attn_available()
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
    )
    if name == "flash":
        if not usable:
            raise RuntimeError(
                "model.attention_backend=flash needs the flash-attn package, a CUDA device and "
                "bf16/fp16 precision; use 'sdpa' or 'auto'"
            )
        return flash_attention
    if name == "auto" and usable:
        return flash_attention
    return sdpa_attention
