"""Preallocated key/value cache for incremental decoding through the model's own layers.

Shapes: b batch rows, L slots per row (``max_len``), s tokens fed in this step, t filled slots
after this step (``length + s``), nkp kv heads on this TP rank, hn head dim.

Every layer's keys and values live in one ``[b, L, nkp, hn]`` buffer each, allocated once; a
step writes its ``s`` new keys/values into slots ``length .. length + s - 1`` of every row (the
same slots for all rows, so rows of different lengths are padded: a padding slot is marked
invalid and never attended to). Each slot also records the rotary position of its token, which
is what the sliding window is measured in, so left padding does not shift the window.

Attention rule of a step, for the query in slot ``i`` and the key in slot ``j`` of one row::

    allowed(i, j) = j <= i and valid[j] and (window is None or pos[i] - pos[j] < window)

plus ``allowed(i, i)`` (a padding query attends to itself: no empty softmax row, no NaN; its
output is never used). For a row without padding this is exactly the training mask
(:meth:`megatron.model.layout.SequenceLayout.attention_mask`), restricted to the new queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Keys, values and slot bookkeeping of every layer for one batch of rows.

    Build it with :meth:`allocate` (or :meth:`for_model`) and pass it to
    ``GPTModel.forward(tokens, layout, kv_cache=cache)``, which calls :meth:`begin_step`,
    :meth:`layer` (per layer) and :meth:`end_step`.

    Attributes:
        keys: per layer ``[b, L, nkp, hn]`` (rotary already applied).
        values: per layer ``[b, L, nkp, hn]``.
        key_positions: ``[b, L]`` int64 rotary position of each filled slot.
        key_valid: ``[b, L]`` bool, True where a slot holds a real (non-padding) token.
        next_positions: ``[b]`` int64 position of each row's next token (one past its last real
            token so far).
        length: slots filled so far (the first slot the next step writes).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_positions: torch.Tensor
    key_valid: torch.Tensor
    next_positions: torch.Tensor
    length: int = 0
    _positions: torch.Tensor | None = field(default=None, repr=False)
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        batch: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        """Zeroed buffers for ``num_layers`` layers, ``batch`` rows of ``max_len`` slots."""
        shape = (batch, max_len, kv_heads, head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            key_positions=torch.zeros(batch, max_len, dtype=torch.long, device=device),
            key_valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
            next_positions=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int, max_len: int) -> KVCache:
        """A cache shaped for a :class:`~megatron.model.gpt.GPTModel` (this TP rank's heads)."""
        attn = model.layers[0].self_attention
        weight = model.embedding.weight
        return cls.allocate(
            len(model.layers), batch, max_len, attn.nkp, attn.hn, weight.dtype, weight.device
        )

    @property
    def max_len(self) -> int:
        """Slots per row."""
        return self.key_valid.shape[1]

    def repeat_rows(self, repeat: int) -> KVCache:
        """A cache of ``repeat`` copies of each row (row ``i`` becomes rows ``i * repeat ..
        (i + 1) * repeat - 1``), after a prompt was run once for several completions of it."""
        if self._positions is not None:
            raise RuntimeError("KVCache.repeat_rows inside a step")
        rep = lambda t: t.repeat_interleave(repeat, dim=0)  # noqa: E731  [b, ...] -> [b * r, ...]
        return KVCache(
            keys=[rep(k) for k in self.keys],
            values=[rep(v) for v in self.values],
            key_positions=rep(self.key_positions),
            key_valid=rep(self.key_valid),
            next_positions=rep(self.next_positions),
            length=self.length,
        )

    def begin_step(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Claim the next ``s`` slots for the tokens of this step.

        Args:
            positions: ``[b, s]`` int64 rotary positions of the new tokens.
            valid: ``[b, s]`` bool, False for padding tokens.

        Raises:
            ValueError: if the step does not fit in the remaining slots.
        """
        s = positions.shape[1]
        if self.length + s > self.max_len:
            raise ValueError(
                f"KVCache: {s} new tokens do not fit ({self.length} of {self.max_len} slots used)"
            )
        end = self.length + s
        self.key_positions[:, self.length : end] = positions
        self.key_valid[:, self.length : end] = valid
        self._positions, self._masks = positions, {}

    def mask(self, window: int | None) -> torch.Tensor:
        """``[b, 1, s, t]`` bool mask of this step (True = may attend), see the module doc."""
        if window not in self._masks:
            if self._positions is None:
                raise RuntimeError("KVCache.mask called outside begin_step/end_step")
            s = self._positions.shape[1]
            t = self.length + s
            device = self.key_valid.device
            q_slot = torch.arange(self.length, t, device=device).view(s, 1)
            k_slot = torch.arange(t, device=device).view(1, t)
            allowed = (k_slot <= q_slot).unsqueeze(0) & self.key_valid[:, None, :t]  # [b, s, t]
            if window is not None:
                gap = self._positions.unsqueeze(2) - self.key_positions[:, None, :t]  # [b, s, t]
                allowed = allowed & (gap < window)
            allowed = allowed | (k_slot == q_slot).unsqueeze(0)
            self._masks[window] = allowed.unsqueeze(1)  # [b, s, t] -> [b, 1, s, t]
        return self._masks[window]

    def layer(self, index: int) -> LayerKVCache:
        """The view that layer ``index``'s attention writes to and reads from."""
        return LayerKVCache(self, index)

    def end_step(self) -> None:
        """Commit the step: advance ``length`` and each row's next position."""
        if self._positions is None:
            raise RuntimeError("KVCache.end_step without begin_step")
        s = self._positions.shape[1]
        valid = self.key_valid[:, self.length : self.length + s]
        last = torch.where(valid, self._positions, -1).amax(dim=1)  # [b]; -1: no real token
        self.next_positions = torch.where(last >= 0, last + 1, self.next_positions)
        self.length += s
        self._positions, self._masks = None, {}


@dataclass
class LayerKVCache:
    """One layer's slice of a :class:`KVCache` during a step."""

    cache: KVCache
    index: int

    def update(
        self, k: torch.Tensor, v: torch.Tensor, window: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store this step's keys/values and return everything the queries may see.

        Args:
            k: ``[b, s, nkp, hn]`` new keys (rotary applied).
            v: ``[b, s, nkp, hn]`` new values.
            window: the layer's sliding window, or ``None``.

        Returns:
            ``(keys [b, t, nkp, hn], values [b, t, nkp, hn], mask [b, 1, s, t] bool)``.
        """
        c = self.cache
        start, end = c.length, c.length + k.shape[1]
        c.keys[self.index][:, start:end] = k
        c.values[self.index][:, start:end] = v
        return c.keys[self.index][:, :end], c.values[self.index][:, :end], c.mask(window)
