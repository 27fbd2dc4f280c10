"""Attention backends, each realising a :class:`~megatron.model.layout.SequenceLayout`.

Shapes: b batch, s sequence, np heads on this TP rank, nk kv heads on this rank, hn head dim.

* ``sdpa`` (default, every device): torch's ``scaled_dot_product_attention`` — causal kernels for
  the causal layout, a boolean mask (:meth:`SequenceLayout.attention_mask`) for the others;
* ``flash`` (flash-attn 2, CUDA, bf16/fp16): dense causal, or varlen with ``cu_seqlens`` for
  segments. It cannot express prefix sharing (a query attending to two disjoint key ranges), so
  it refuses that layout; ``auto`` then uses SDPA.

Every backend gives the same outputs on the tokens that are scored (tested).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from megatron.model.layout import SequenceLayout

__all__ = ["SequenceLayout", "flash_attention", "sdpa_attention", "select_backend"]


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
    groups = q.shape[2] // k.shape[2]
    q = q.transpose(1, 2)  # [b, s, np, hn] -> [b, np, s, hn]
    k = _repeat_kv(k.transpose(1, 2), groups)
    v = _repeat_kv(v.transpose(1, 2), groups)
    win = window if window is not None and window < q.shape[2] else None
    mask = layout.attention_mask(win)
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return out.transpose(1, 2)  # [b, np, s, hn] -> [b, s, np, hn]


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SequenceLayout,
    dropout_p: float = 0.0,
    window: int | None = None,
) -> torch.Tensor:
    """flash-attn 2: dense causal, or varlen with ``cu_seqlens`` from the segment ids."""
    if layout.kind == "prefix":
        raise ValueError(FLASH_PREFIX_ERROR)
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    win = (window - 1, 0) if window is not None else (-1, -1)
    if layout.segment_ids is None:
        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True, window_size=win)
    b, s = layout.segment_ids.shape
    seg = layout.segment_ids.reshape(-1)  # [b*s]
    keep = torch.nonzero(seg != 0).squeeze(-1)
    # A new sequence starts where the segment id or the row changes.
    row = torch.arange(b, device=seg.device).repeat_interleave(s)
    key = seg[keep] + row[keep] * (int(seg.max()) + 1)
    starts = torch.nonzero(torch.diff(key, prepend=key[:1] - 1)).squeeze(-1)
    cu = torch.cat([starts, starts.new_tensor([keep.numel()])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    flat = lambda t: t.reshape(b * s, *t.shape[2:])[keep]  # noqa: E731
    out = flash_attn_varlen_func(
        flat(q),
        flat(k),
        flat(v),
        cu,
        cu,
        max_len,
        max_len,
        dropout_p=dropout_p,
        causal=True,
        window_size=win,
    )
    full = q.new_zeros(b * s, *q.shape[2:])
    full[keep] = out
    return full.view_as(q)


FLASH_PREFIX_ERROR = (
    "model.attention_backend=flash cannot realise a prefix-shared layout (a token attending to "
    "its own segment and to a shared prefix); use attention_backend: sdpa or auto"
)


def select_backend(
    name: str, dtype: torch.dtype, device: torch.device, layout: SequenceLayout | None = None
):
    """The attention function for ``model.attention_backend`` on this device, dtype and layout.

    Raises:
        RuntimeError: ``flash`` without flash-attn, CUDA or a half-precision dtype.
        ValueError: ``flash`` for a layout it cannot realise (prefix sharing).
    """
    usable = (
        flash_attn_available()
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
    )
    prefix = layout is not None and layout.kind == "prefix"
    if name == "flash":
        if not usable:
            raise RuntimeError(
                "model.attention_backend=flash needs the flash-attn package, a CUDA device and "
                "bf16/fp16 precision; use 'sdpa' or 'auto'"
            )
        if prefix:
            raise ValueError(FLASH_PREFIX_ERROR)
        return flash_attention
    if name == "auto" and usable and not prefix:
        return flash_attention
    return sdpa_attention
