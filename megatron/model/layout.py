"""Sequence layouts: which token of a batch row may attend to which, and at what position.

Shapes: b batch rows, s row length.

One :class:`SequenceLayout` describes every row layout the data layer produces:

* **causal** (``segment_ids is None``): each row is one causal sequence (padding, if any, only on
  the right, where nothing is scored) — the fast path (``is_causal`` kernels);
* **segments** (``segment_ids [b, s]``, ``prefix_ids is None``): a row packs several sequences,
  numbered 1, 2, ... (0 = padding); attention is causal *within* a segment (block-diagonal);
* **prefix-shared** (``prefix_ids [b, s]`` as well): a token of segment ``g`` may also attend to
  the earlier tokens of segment ``prefix_ids`` (its shared prefix, 0 = none). The row
  ``[prompt | chosen | rejected]`` has segments 1, 2, 3 with ``prefix_ids`` 0, 1, 1: rejected sees
  the prompt and itself, never chosen; its positions continue from the prompt's end (the
  collator writes them in ``position_ids``). One level of sharing: a prefix has no prefix itself.

Attention rule, for query ``i`` and key ``j`` of one row::

    allowed(i, j) = j <= i and seg[j] != 0 and (seg[j] == seg[i] or seg[j] == prefix[i] != 0)

plus ``allowed(i, i)`` for padding tokens (no empty softmax row, no NaN; their outputs are never
scored). Every attention backend must realise the same rule or refuse the layout
(:func:`megatron.model.attention.select_backend`); all give the padded path's outputs (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceLayout:
    """Positions and segment structure of a batch.

    Attributes:
        position_ids: ``[b, s]`` int64 rotary positions (restart per packed sequence, continue
            from a shared prefix).
        segment_ids: ``[b, s]`` int64 sequence number per token, 0 = padding; ``None`` = one
            causal sequence per row.
        prefix_ids: ``[b, s]`` int64 per token, the segment its sequence continues (a shared
            prefix it may attend to), 0 = none; ``None`` = no sharing. Needs ``segment_ids``.
    """

    position_ids: torch.Tensor
    segment_ids: torch.Tensor | None = None
    prefix_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.prefix_ids is not None and self.segment_ids is None:
            raise ValueError("SequenceLayout: prefix_ids need segment_ids")
        for name in ("segment_ids", "prefix_ids"):
            t = getattr(self, name)
            if t is not None and t.shape != self.position_ids.shape:
                raise ValueError(
                    f"SequenceLayout: {name} has shape {tuple(t.shape)}, position_ids "
                    f"{tuple(self.position_ids.shape)}"
                )

    @classmethod
    def causal(cls, batch: int, seq: int, device: torch.device | None = None) -> SequenceLayout:
        """One causal sequence per row, positions ``0 .. seq - 1``."""
        pos = torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq)
        return cls(position_ids=pos)

    @property
    def kind(self) -> str:
        """``"causal"``, ``"segments"`` or ``"prefix"`` (see the module docstring)."""
        if self.segment_ids is None:
            return "causal"
        return "segments" if self.prefix_ids is None else "prefix"

    def to(self, device: torch.device) -> SequenceLayout:
        """The layout's tensors on ``device``."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return SequenceLayout(
            move(self.position_ids), move(self.segment_ids), move(self.prefix_ids)
        )

    def attention_mask(self, window: int | None = None) -> torch.Tensor | None:
        """Boolean ``[b, 1, s, s]`` mask (True = may attend), or ``None`` for plain causal.

        Args:
            window: sliding-window size (a query sees itself and the ``window - 1`` tokens
                before it in the row), or ``None``.
        """
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
            key = seg.unsqueeze(1)  # [b, 1, s]
            same = seg.unsqueeze(2) == key  # [b, s, s]
            if self.prefix_ids is not None:
                pre = self.prefix_ids.unsqueeze(2)  # [b, s, 1]
                same = same | ((pre != 0) & (pre == key))
            same = same & (key != 0)
            allowed = (allowed & same) | torch.eye(s, dtype=torch.bool, device=seg.device)
        return allowed.unsqueeze(1)

    # ---- pipeline messages: tensors only, fixed arity -----------------------------------------
    def to_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(position_ids, segment_ids, prefix_ids)`` for a pipeline message; an absent tensor
        travels as ``[b, 1]`` zeros (pipeline messages must be tensors)."""
        pos = self.position_ids
        empty = torch.zeros(pos.shape[0], 1, dtype=torch.long, device=pos.device)
        seg = empty if self.segment_ids is None else self.segment_ids
        pre = empty if self.prefix_ids is None else self.prefix_ids
        return pos, seg, pre

    @classmethod
    def from_tensors(
        cls, position_ids: torch.Tensor, segment_ids: torch.Tensor, prefix_ids: torch.Tensor
    ) -> SequenceLayout:
        """Inverse of :meth:`to_tensors`."""
        s = position_ids.shape[1]
        seg = segment_ids if segment_ids.shape[1] == s else None
        pre = prefix_ids if prefix_ids.shape[1] == s and seg is not None else None
        return cls(position_ids, seg, pre)
