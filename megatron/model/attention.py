"""Sequence layouts and the attention backends that realise them.

Shapes: b batch, s sequence, np heads on this TP rank, nk kv heads on this rank, hn head dim.

A :class:`SequenceLayout` says which token may attend to which:

* ``segment_ids is None``: every row is one causal sequence (fast path, ``is_causal``);
* otherwise ``segment_ids [b, s]`` numbers the sequences packed in a row (1, 2, ...), 0 marks
  padding; attention is causal *within* a segment (block-diagonal). Padding tokens attend only to
  themselves, so no softmax row is empty (no NaN), and their outputs are ignored by the loss.

Every backend must give the same outputs on the non-padding tokens (tested).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SequenceLayout:
    """Positions and segment structure of a batch.

    Attributes:
        position_ids: ``[b, s]`` int64 rotary positions (restart per packed sequence).
        segment_ids: ``[b, s]`` int64 sequence number per token, 0 = padding; ``None`` = one
            causal sequence per row with no padding.
    """

    position_ids: torch.Tensor
    segment_ids: torch.Tensor | None = None

    @classmethod
    def causal(cls, batch: int, seq: int, device: torch.device | None = None) -> SequenceLayout:
        pos = torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq)
        return cls(position_ids=pos)

    def attention_mask(self, window: int | None = None) -> torch.Tensor | None:
        """Boolean ``[b, 1, s, s]`` mask (True = may attend), or ``None`` for plain causal."""
        s = self.position_ids.shape[1]
        if self.segment_ids is None and window is None:
            return None
        i = torch.arange(s, device=self.position_ids.device)
        allowed = i.view(-1, 1) >= i.view(1, -1)  # [s, s] causal
        if window is not None:
            allowed = allowed & (i.view(-1, 1) - i.view(1, -1) < window)
        allowed = allowed.unsqueeze(0)  # [1, s, s]
        if self.segment_ids is not None:
            seg = self.segment_ids
            same = (seg.unsqueeze(2) == seg.unsqueeze(1)) & (seg.unsqueeze(1) != 0)
            allowed = (allowed & same) | torch.eye(s, dtype=torch.bool, device=seg.device)
        return allowed.unsqueeze(1)


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


def select_backend(name: str, dtype: torch.dtype, device: torch.device):
    """The attention function for ``model.attention_backend`` on this device and dtype."""
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
