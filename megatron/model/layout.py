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
scored), and with a sliding window ``pos[i] - pos[j] < window`` — measured in positions, as the
KV cache measures it, so a rejected token's window over the prompt is the padded row's. Every
attention backend must realise the same rule or refuse the layout
(:func:`megatron.model.attention.select_backend`); all give the padded path's outputs (tested).

**Attention plans** (:meth:`SequenceLayout.attention_plan`, computed once per layout and reused by
every layer): a dense ``[b, 1, s, s]`` mask costs ``b * s**2`` scores however few tokens may
attend to each other. When a row packs several independent *groups* (a segment with every
segment that continues it — a prefix-shared span, or one packed sequence), the plan gathers each
group into its own row of a ``[n, L]`` batch (``L`` = the longest group) and attends there under
the same rule, ``n * L**2`` scores; it does so when that is at most half the dense cost. This is
varlen attention for SDPA: packing then costs no attention work beyond the sequences' own.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

# Gather into groups when their scores are at most this share of the dense [b, s, s] mask's: the
# gather/scatter of q, k, v and the output costs O(tokens * heads * head_dim), small beside the
# attention it saves, but not free.
GROUPED_MAX_COST = 0.5


@dataclass(frozen=True)
class GroupedAttention:
    """Attention over ``n`` gathered groups instead of ``b`` rows (see the module docstring).

    Attributes:
        index: ``[n, L]`` int64 flat token index (``row * s + column``) of each group slot;
            unused slots point at token 0 (their queries are dropped, their keys masked).
        valid: ``[n, L]`` bool, True where a slot holds a token of the group.
        mask: ``[n, 1, L, L]`` bool, the layout's rule on the gathered tokens (True = may attend).
        tokens: ``[m]`` int64 flat index of every token in a group (``index[valid]``), and
            ``slots`` ``[m]`` its flat slot in ``[n * L]``: where each output is scattered from.
    """

    index: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor
    tokens: torch.Tensor
    slots: torch.Tensor


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
    # values derived from the layout (attention plans, rotary tables), built once on first use
    # and shared by every layer (see memo)
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

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
            window: sliding-window size (a query sees the allowed keys less than ``window``
                positions before it, itself included), or ``None``.
        """
        if self.segment_ids is None and window is None:
            return None
        return _rule(self.position_ids, self.segment_ids, self.prefix_ids, window)

    def attention_plan(self, window: int | None = None) -> torch.Tensor | GroupedAttention | None:
        """How attention realises this layout: ``None`` (plain causal), the dense mask of
        :meth:`attention_mask`, or a :class:`GroupedAttention` when gathering the rows' groups
        costs at most ``GROUPED_MAX_COST`` of the dense scores. Built once per layout and window."""

        def build() -> torch.Tensor | GroupedAttention | None:
            plan = _grouped(self, window)
            return self.attention_mask(window) if plan is None else plan

        return self.memo(("attention", window), build)

    def memo(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()``, computed once per layout and ``key`` (layers share it; the tensors it
        returns must not need gradients)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

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


def _rule(
    pos: torch.Tensor,
    seg: torch.Tensor | None,
    pre: torch.Tensor | None,
    window: int | None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The module docstring's rule as a ``[b, 1, s, s]`` mask over rows whose order is causal
    order; ``valid`` marks real slots of gathered rows (others only attend to themselves)."""
    s = pos.shape[1]
    i = torch.arange(s, device=pos.device)
    allowed = (i.view(-1, 1) >= i.view(1, -1)).unsqueeze(0)  # [1, s, s] causal
    if window is not None:
        allowed = allowed & (pos.unsqueeze(2) - pos.unsqueeze(1) < window)  # [b, s, s]
    if seg is not None:
        key = seg.unsqueeze(1)  # [b, 1, s]
        same = seg.unsqueeze(2) == key  # [b, s, s]
        if pre is not None:
            query_pre = pre.unsqueeze(2)  # [b, s, 1]
            same = same | ((query_pre != 0) & (query_pre == key))
        real = key != 0 if valid is None else valid.unsqueeze(1) & (key != 0)
        allowed = (allowed & same & real) | torch.eye(s, dtype=torch.bool, device=pos.device)
    return allowed.unsqueeze(1)


def _groups(
    layout: SequenceLayout,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """``(tokens, group, counts, longest)`` when gathering the rows' groups pays (their
    ``n * L**2`` scores at most ``GROUPED_MAX_COST`` of the dense ``b * s**2``), else ``None``:
    every non-padding token's flat index (row-major), its group number (a row's root segment
    with the segments continuing it), each group's size and the largest."""
    seg = layout.segment_ids
    if seg is None:
        return None
    b, s = seg.shape
    root = (
        seg
        if layout.prefix_ids is None
        else torch.where(layout.prefix_ids != 0, layout.prefix_ids, seg)
    )
    tokens = torch.nonzero(seg.reshape(-1) != 0).squeeze(1)  # [m], row-major = causal order
    if tokens.numel() == 0:
        return None
    rows = torch.div(tokens, s, rounding_mode="floor")
    key = rows * (s + 1) + root.reshape(-1)[tokens]  # unique per (row, root segment)
    _, group, counts = torch.unique(key, return_inverse=True, return_counts=True)
    n, longest = counts.numel(), int(counts.max())  # one host sync per layout
    if n * longest * longest > GROUPED_MAX_COST * b * s * s:
        return None
    return tokens, group, counts, longest


def attention_scores(layout: SequenceLayout) -> int:
    """Query-key scores the layout's attention plan computes: ``n * L**2`` when its groups are
    gathered, else ``b * s**2`` (the dense mask; also counted so for plain causal rows)."""
    groups = _groups(layout)
    if groups is not None:
        return groups[2].numel() * groups[3] ** 2
    b, s = layout.position_ids.shape
    return b * s * s


def _grouped(layout: SequenceLayout, window: int | None) -> GroupedAttention | None:
    """Gather each row's groups into their own rows, or ``None`` when that does not pay."""
    groups = _groups(layout)
    if groups is None:
        return None
    tokens, group, counts, longest = groups
    seg = layout.segment_ids
    n = counts.numel()
    order = torch.argsort(group, stable=True)  # tokens by group, causal order kept inside
    starts = torch.cumsum(counts, 0) - counts
    slot_in_group = torch.arange(tokens.numel(), device=seg.device) - starts[group[order]]
    slots = torch.empty_like(tokens)
    slots[order] = group[order] * longest + slot_in_group
    index = torch.zeros(n * longest, dtype=torch.long, device=seg.device)
    index[slots] = tokens
    valid = torch.zeros(n * longest, dtype=torch.bool, device=seg.device)
    valid[slots] = True
    index, valid = index.view(n, longest), valid.view(n, longest)
    take = lambda t: None if t is None else t.reshape(-1)[index]  # noqa: E731  [n, L]
    gseg = take(seg).masked_fill(~valid, 0)
    mask = _rule(take(layout.position_ids), gseg, take(layout.prefix_ids), window, valid)
    return GroupedAttention(index, valid, mask, tokens, slots)
