"""One rank's share of a rollout: its sampled completions and how they become micro-batches.

Shapes: b rows, s row length, N completions of a micro-batch, T a completion's trained tokens.

A :class:`Completion` holds what one sampled completion needs for training, independent of how
batches lay it out: prompt and completion ids, the sampler's log-probs, and (once computed) the
old-policy and reference log-probs of its *trained* tokens (all of its tokens, or none when a
truncated completion is masked) and its advantage. :func:`micro_batches` turns a list of them into
batches in any ``data.layout`` — ``padded`` or ``packed`` sequences, or ``prefix_shared`` /
``prefix_shared_packed`` spans where the completions of one prompt share its tokens once
(:func:`megatron.data.collators.collate_prompt_groups`) — carrying
:class:`~megatron.data.batch.RolloutFields`, by scattering the per-token values to the batch's
*scored tokens*: its ``[b * s]`` grid flattened, then its ``k`` extra targets
(:func:`scatter_tokens`; the inverse is :func:`gather_tokens`; :func:`flat_outputs` lays the
model's outputs out the same way). The buffer is plain tensors and numbers
(:func:`buffer_state` / :func:`load_buffer`), so a checkpoint taken in the middle of a rollout
holds it and a resume trains on the same completions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatron.data.batch import Batch, RolloutFields
from megatron.data.collators import PREFIX_LAYOUTS, Collator, collate_prompt_groups
from megatron.objectives.online import flat_outputs, scored_tokens  # noqa: F401 - re-exported

_ARRAYS = ("prompt", "tokens", "sampler_logps", "old_logps", "ref_logps")


@dataclass
class Completion:
    """One sampled completion (see the module docstring).

    Attributes:
        example: the prompt's row in the training data.
        prompt: int64 ``[p]`` prompt ids.
        tokens: int64 ``[c]`` sampled ids (an emitted EOS included).
        sampler_logps: fp32 ``[c]`` the backend's log-probs of ``tokens``.
        truncated: it reached ``max_new_tokens`` without EOS.
        trained: its tokens are trained on (not a masked truncated completion).
        advantage: set once the rollout's rewards are in.
        old_logps: fp32 ``[T]`` the sampling policy's log-probs of its trained tokens, or None.
        ref_logps: fp32 ``[T]`` the reference model's, or None.
    """

    example: int
    prompt: np.ndarray
    tokens: np.ndarray
    sampler_logps: np.ndarray
    truncated: bool
    trained: bool = True
    advantage: float = 0.0
    old_logps: np.ndarray | None = None
    ref_logps: np.ndarray | None = None

    def sample(self) -> dict[str, np.ndarray]:
        """The ``sequence`` collator's sample: ``prompt + tokens``, the completion trained."""
        mask = np.zeros(self.prompt.size + self.tokens.size, dtype=np.uint8)
        mask[self.prompt.size :] = int(self.trained)
        return {"tokens": np.concatenate([self.prompt, self.tokens]), "loss_mask": mask}

    @property
    def trained_tokens(self) -> int:
        """Tokens the loss reads (the first completion token is scored at the prompt's last)."""
        return int(self.tokens.size) if self.trained else 0


def _targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flat indices [m], their sequence ids [m])`` of the trained targets into
    :func:`flat_outputs`, grouped by sequence (ascending) and in token order within each (an
    extra target, a completion's first token, before its grid targets)."""
    mask, ids = scored_tokens(batch)
    n = batch.loss_mask.numel()
    order = torch.arange(ids.numel(), device=ids.device)
    # why: a stable sort of [extra..., grid...] keys puts each sequence's extra target first
    rotated = torch.cat([order[n:], order[:n]])
    keep = rotated[mask[rotated] > 0]
    by_sequence = torch.sort(ids[keep], stable=True).indices
    where = keep[by_sequence]
    return where, ids[where]


def scatter_tokens(batch: Batch, values: list[np.ndarray | None]) -> torch.Tensor:
    """``[b * s + k]`` fp32 (:func:`flat_outputs` order) holding each sequence's
    per-trained-token ``values`` at its targets (0 elsewhere); ``values[i]`` belongs to
    sequence ``i``.

    Raises:
        ValueError: a sequence's values do not match its trained targets in number.
    """
    where, ids = _targets(batch)
    counts = torch.bincount(ids, minlength=batch.num_sequences).tolist()
    sizes = [0 if v is None else int(np.asarray(v).size) for v in values]
    if sizes != counts[: len(sizes)] or len(sizes) != batch.num_sequences:
        raise ValueError(f"per-token values of sizes {sizes} for sequences of {counts} targets")
    k = 0 if batch.extra_targets is None else batch.extra_targets.index.numel()
    flat = torch.zeros(batch.loss_mask.numel() + k, dtype=torch.float32)
    parts = [torch.as_tensor(np.asarray(v, dtype=np.float32)) for v in values if v is not None]
    if parts:
        flat[where.cpu()] = torch.cat(parts)
    return flat


def gather_tokens(batch: Batch, flat: torch.Tensor) -> list[np.ndarray]:
    """The inverse of :func:`scatter_tokens`: each sequence's values at its trained targets."""
    where, ids = _targets(batch)
    picked = flat.detach().reshape(-1)[where].float().cpu().numpy()
    counts = torch.bincount(ids.cpu(), minlength=batch.num_sequences).tolist()
    return np.split(picked, np.cumsum(counts)[:-1])


def _groups(part: list[Completion], capacity: int) -> list[list[int]]:
    """Indices of ``part`` grouped by prompt (same example and prompt), in first-seen order; a
    group whose span (the prompt once, then its completions) exceeds ``capacity`` is split into
    spans that fit, each holding the prompt (one prompt + completion always fits:
    :func:`megatron.rollout.setup.build_rollout_source` checks it)."""
    by_prompt: dict[tuple, list[int]] = {}
    for i, c in enumerate(part):
        by_prompt.setdefault((c.example, c.prompt.tobytes()), []).append(i)
    groups = []
    for members in by_prompt.values():
        prompt = part[members[0]].prompt.size
        current, used = [], prompt
        for i in members:
            if current and used + part[i].tokens.size > capacity:
                groups.append(current)
                current, used = [], prompt
            current.append(i)
            used += part[i].tokens.size
        groups.append(current)
    return groups


class CompletionCollator:
    """Lays completions out in one ``data.layout`` (see the module docstring).

    Args:
        layout: ``padded``, ``packed``, ``prefix_shared`` or ``prefix_shared_packed``.
        seq_length: row capacity (``data.seq_length``).
        pad_to_multiple_of: row-length rounding (``data.pad_to_multiple_of``).
    """

    def __init__(self, layout: str, seq_length: int, pad_to_multiple_of: int = 8) -> None:
        self.layout, self.seq_length, self.multiple = layout, seq_length, pad_to_multiple_of
        self.sequences = None
        if layout not in PREFIX_LAYOUTS:
            self.sequences = Collator("sequence", layout, seq_length, pad_to_multiple_of)

    def __call__(self, part: list[Completion]) -> Batch:
        samples = [c.sample() for c in part]
        if self.sequences is not None:
            return self.sequences(samples)
        seqs = [(x["tokens"], x["loss_mask"] > 0) for x in samples]
        groups = _groups(part, self.seq_length)
        prompts = [part[g[0]].prompt.size for g in groups]
        return collate_prompt_groups(
            seqs, groups, prompts, self.layout, self.seq_length, self.multiple
        )


def micro_batches(
    completions: list[Completion],
    collate: Any,
    micro_batch_size: int,
    *,
    num_items: float,
    max_new_tokens: int,
    with_sampler_logps: bool = False,
) -> list[Batch]:
    """Micro-batches of ``micro_batch_size`` completions, in order, with their rollout fields.

    Args:
        completions: this rank's completions of one optimizer step.
        collate: a :class:`CompletionCollator`.
        micro_batch_size: completions per micro-batch.
        num_items: the step's :attr:`RolloutFields.num_items`.
        max_new_tokens: the rollout's.
        with_sampler_logps: attach the sampler's log-probs (the policy has not moved yet).
    """
    out = []
    for start in range(0, len(completions), micro_batch_size):
        part = completions[start : start + micro_batch_size]
        batch = collate(part)

        def flat(name: str, part: list[Completion] = part, batch: Batch = batch):
            values = [getattr(c, name) if c.trained else None for c in part]
            if any(v is None for c, v in zip(part, values, strict=True) if c.trained):
                return None
            return scatter_tokens(batch, values)

        fields = RolloutFields(
            advantages=torch.tensor([c.advantage for c in part], dtype=torch.float32),
            old_logps=flat("old_logps"),
            ref_logps=flat("ref_logps"),
            sampler_logps=flat("sampler_logps") if with_sampler_logps else None,
            num_items=float(num_items),
            max_new_tokens=int(max_new_tokens),
        )
        ids = torch.tensor([c.example for c in part], dtype=torch.long)
        out.append(batch.replace(rollout=fields, example_ids=ids))
    return out


def buffer_state(completions: list[Completion]) -> dict[str, Any]:
    """The completions as tensors and plain data (loads with ``weights_only=True``)."""
    state: dict[str, Any] = {
        "example": [c.example for c in completions],
        "truncated": [c.truncated for c in completions],
        "trained": [c.trained for c in completions],
        "advantage": [c.advantage for c in completions],
    }
    for name in _ARRAYS:
        state[name] = [
            None if getattr(c, name) is None else torch.from_numpy(np.asarray(getattr(c, name)))
            for c in completions
        ]
    return state


def load_buffer(state: dict[str, Any]) -> list[Completion]:
    """The completions :func:`buffer_state` saved."""
    out = []
    for i, example in enumerate(state["example"]):
        arrays = {
            name: None if state[name][i] is None else state[name][i].numpy() for name in _ARRAYS
        }
        out.append(
            Completion(
                example=int(example),
                truncated=bool(state["truncated"][i]),
                trained=bool(state["trained"][i]),
                advantage=float(state["advantage"][i]),
                **arrays,
            )
        )
    return out
