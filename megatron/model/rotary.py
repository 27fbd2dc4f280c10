"""Rotary position embeddings (RoFormer, arXiv:2104.09864) with partial rotation and scaling.

Shapes: b batch, s sequence, n heads, hn head dim, d rotary dim (``hn * rotary_pct``).

Conventions (both used by real checkpoints):

* non-interleaved ("rotate half", GPT-NeoX and Hugging Face Llama): the rotary dims are split into
  halves ``[x1, x2]`` and rotated as ``(x1 cos - x2 sin, x2 cos + x1 sin)``;
* interleaved (GPT-J, Meta's original Llama code): adjacent pairs ``(x_{2i}, x_{2i+1})`` rotate.

Scaling: ``linear`` divides every frequency by ``factor`` (position interpolation,
arXiv:2306.15595); ``llama3`` keeps high frequencies, divides low ones by ``factor`` and blends
in between (Llama 3.1 report, arXiv:2407.21783; same formula as transformers'
``_compute_llama3_parameters``). cos/sin are computed in fp32 from fp32 positions, as transformers
does, then cast to the activations' dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def inverse_frequencies(dim: int, base: float, scaling: Any | None = None) -> torch.Tensor:
    """``[d/2]`` fp32 inverse frequencies ``base^(-2i/d)``, with optional scaling applied.

    Computed on the CPU whatever the default device: a model built on the meta device would
    otherwise run these ops through torch's Python decompositions (which import torch._dynamo,
    seconds of start-up) for a buffer that is rebuilt anyway (:meth:`rebuild_buffers`)."""
    positions = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu")
    inv = 1.0 / (base ** (positions.float() / dim))
    if scaling is None:
        return inv
    if scaling.type == "linear":
        return inv / scaling.factor
    if scaling.type == "llama3":
        old = scaling.original_max_position_embeddings
        low_wavelen = old / scaling.low_freq_factor
        high_wavelen = old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
        smooth = (old / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unknown rope scaling type {scaling.type!r}")


class RotaryEmbedding(torch.nn.Module):
    """Computes cos/sin tables for given position ids and rotates query/key heads."""

    def __init__(self, dim: int, base: float, interleaved: bool = False, scaling: Any = None):
        super().__init__()
        self.dim, self.interleaved, self.base, self.scaling = dim, interleaved, base, scaling
        self.register_buffer("inv_freq", inverse_frequencies(dim, base, scaling), persistent=False)
        # what the tables depend on: layers with equal keys share one table per layout
        self.key = (dim, base, interleaved, repr(scaling))

    def rebuild_buffers(self, device: torch.device) -> None:
        """Recompute ``inv_freq`` on ``device`` (a model built on the meta device has none)."""
        self.inv_freq = inverse_frequencies(self.dim, self.base, self.scaling).to(device)

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``[b, s]`` positions -> cos, sin of shape ``[b, s, 1, d]``."""
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq.float()  # [b, s, d/2]
        if self.interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)  # [b, s, d]
        else:
            emb = torch.cat([freqs, freqs], dim=-1)  # [b, s, d]
        return emb.cos().to(dtype).unsqueeze(2), emb.sin().to(dtype).unsqueeze(2)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first ``d`` dims of ``x`` ``[b, s, n, hn]``; the rest pass through."""
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        if self.interleaved:
            pairs = rot.unflatten(-1, (-1, 2))  # [b, s, n, d/2, 2]
            turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        else:
            half = self.dim // 2
            turned = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        rotated = rot * cos + turned * sin
        return rotated if rest.shape[-1] == 0 else torch.cat([rotated, rest], dim=-1)
