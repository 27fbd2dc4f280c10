"""Per-sequence log-probabilities from the model's per-token outputs.

Shapes: b batch, s sequence, N sequences, P pairs, k extra targets.

The model gives ``log p(target)`` per position (:mod:`megatron.model.output`); the objectives
reduce them to per-sequence values with :func:`sequence_log_probs` (sums and token counts over
``Batch.sequence_ids``, whatever the row layout, extra targets of prefix-shared rows included)
and, for pair batches, :func:`pair_log_probs` (chosen/rejected halves, token means for the
length-normalised losses) and :func:`ld_pair_log_probs` (LD-DPO weighting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.data.batch import Batch

# ----------------------------------------------------------------------------- per-sequence
# Sequence batches: n sequences per micro-batch, each token of the ``[b, s]`` grid tagged with the
# index of its sequence (``sequence_ids``, -1 where masked). Pair batches hold n = 2P sequences:
# 0..P-1 chosen, P..2P-1 rejected, chosen i paired with rejected P+i.


def _scored(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(valid [b*s + k] bool, ids [b*s + k] int64)`` of the grid's targets, then the extra
    targets': which count for a sequence, and its id (clamped to >= 0)."""
    ids = batch.sequence_ids.reshape(-1)
    valid = (batch.loss_mask.reshape(-1) > 0) & (ids >= 0)
    extra = batch.extra_targets
    if extra is not None:
        valid = torch.cat([valid, extra.sequence_ids >= 0])
        ids = torch.cat([ids, extra.sequence_ids])
    return valid, ids.clamp(min=0)


def _scored_values(
    token_logps: torch.Tensor, batch: Batch, extra_logps: torch.Tensor | None
) -> torch.Tensor:
    """``[b*s + k]`` fp32: ``token_logps`` flattened, then ``extra_logps`` (the order of
    :func:`_scored`); not masked."""
    values = token_logps.reshape(-1).float()
    extra = batch.extra_targets
    if extra is None:
        return values
    if extra_logps is None:
        if extra.index.numel():
            raise ValueError("the batch has extra targets: pass their extra_logps")
        extra_logps = values.new_zeros(0)
    if extra_logps.shape != extra.index.shape:
        raise ValueError(
            f"extra_logps has shape {tuple(extra_logps.shape)}, the batch has "
            f"{extra.index.numel()} extra targets"
        )
    return torch.cat([values, extra_logps.float()])


def sequence_log_probs(
    token_logps: torch.Tensor, batch: Batch, extra_logps: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of target log-probs and their token counts.

    Tokens count where ``loss_mask > 0`` and ``sequence_ids >= 0``; the mask is an indicator, not a
    weight. Masked positions are excluded with ``torch.where`` (not multiplied by 0), so a
    non-finite value there never reaches the sums or their gradients. A batch with
    ``extra_targets`` (prefix-shared rows) also counts each extra target whose sequence id is
    ``>= 0``, from ``extra_logps``.

    Args:
        token_logps: ``[b, s]`` log-probs of the targets (any float dtype; summed in fp32).
        batch: its ``loss_mask``, ``sequence_ids``, ``num_sequences`` and ``extra_targets``.
        extra_logps: ``[k]`` log-probs of ``batch.extra_targets`` (the model's ``extra_logps``).

    Returns:
        ``(sums [N] fp32, counts [N] fp32)``; a sequence without target tokens has sum 0, count 0.

    Raises:
        ValueError: the batch has extra targets and ``extra_logps`` is missing or mis-shaped.
    """
    valid, ids = _scored(batch)
    values = torch.where(valid, _scored_values(token_logps, batch, extra_logps), 0.0)
    zeros = torch.zeros(batch.num_sequences, dtype=torch.float32, device=token_logps.device)
    sums = zeros.index_add(0, ids, values)
    counts = zeros.index_add(0, ids, valid.float())
    return sums, counts


def _positions(batch: Batch) -> torch.Tensor:
    """``[b*s + k]`` int64 1-based position of each target in its sequence (0: not a target), in
    the order of :func:`_scored`; an extra target comes before its sequence's grid targets."""
    n = batch.num_sequences
    valid, ids = _scored(batch)
    key = torch.where(valid, ids, n)  # non-targets sort last, under their own key
    grid = batch.sequence_ids.numel()
    # why: a stable sort of [extra keys, grid keys] ranks each sequence's extra targets first,
    # then its grid targets in row-major order.
    key = torch.cat([key[grid:], key[:grid]])
    sorted_key, order = torch.sort(key, stable=True)
    counts = torch.bincount(key, minlength=n + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(key.numel(), device=key.device) - starts[sorted_key]
    positions = torch.empty_like(rank).scatter_(0, order, rank + 1)
    positions = torch.cat([positions[key.numel() - grid :], positions[: key.numel() - grid]])
    return torch.where(valid, positions, 0)


def token_positions(batch: Batch) -> torch.Tensor:
    """1-based position of each grid target token within its sequence (0 where not a target).

    Positions follow the row-major order of the ``[b, s]`` grid, which is each sequence's token
    order in the padded, packed and prefix-shared layouts since a sequence's grid targets are
    contiguous. An extra target (prefix-shared rows: a completion's first token, scored at the
    prompt's last hidden state) is the first target of its sequence: it takes position 1 and the
    sequence's grid targets follow from 2 (see :func:`extra_token_positions`).

    Args:
        batch: its ``loss_mask``, ``sequence_ids``, ``num_sequences`` and ``extra_targets``.

    Returns:
        ``[b, s]`` int64.
    """
    return _positions(batch)[: batch.sequence_ids.numel()].view_as(batch.sequence_ids)


def extra_token_positions(batch: Batch) -> torch.Tensor:
    """``[k]`` int64 1-based position of each extra target within its sequence (0: counts for no
    sequence); see :func:`token_positions`. Empty without extra targets."""
    return _positions(batch)[batch.sequence_ids.numel() :]


def ld_pair_log_probs(
    token_logps: torch.Tensor,
    batch: Batch,
    alpha: float,
    extra_logps: torch.Tensor | None = None,
) -> torch.Tensor:
    """LD-DPO (arXiv:2409.06411) length-desensitised per-sequence log-probs of a pair batch.

    With ``l = min(|y_w|, |y_l|)`` for each pair, the first ``l`` target tokens of both
    completions count fully and the rest ("verbose tail") with weight ``alpha``:
    ``log pi(y) = sum_{t <= l} log p_t + alpha * sum_{t > l} log p_t``. This is TRL 1.16
    ``DPOTrainer._compute_loss`` with ``ld_alpha`` (``shared_mask`` / ``tail_mask``). Token
    positions ``t`` are those of :func:`token_positions` (extra targets first).

    Args:
        token_logps: ``[b, s]`` log-probs of the targets.
        batch: a pair batch (``num_sequences`` = 2P).
        alpha: weight of the tail tokens, in [0, 1].
        extra_logps: ``[k]`` log-probs of the batch's extra targets (prefix-shared rows).

    Returns:
        ``[2P]`` fp32 (chosen then rejected).
    """
    valid, ids = _scored(batch)
    values = _scored_values(token_logps, batch, extra_logps)
    zeros = torch.zeros(batch.num_sequences, dtype=torch.float32, device=token_logps.device)
    counts = zeros.index_add(0, ids, valid.float())
    chosen, rejected = split_pairs(counts)
    shared = torch.minimum(chosen, rejected).repeat(2)  # [2P]
    weight = torch.where(_positions(batch) <= shared[ids], 1.0, alpha)
    return zeros.index_add(0, ids, torch.where(valid, values * weight, 0.0))


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2P, ...] -> ([P, ...] chosen, [P, ...] rejected)`` (sequence i pairs with P + i)."""
    if x.shape[0] % 2:
        raise ValueError(f"a pair batch holds an even number of sequences, got {x.shape[0]}")
    chosen, rejected = x.chunk(2, dim=0)
    return chosen, rejected


@dataclass(frozen=True)
class PairLogProbs:
    """Per-sequence log-probs of a pair batch, split into chosen and rejected (all ``[P]`` fp32).

    ``*_sums`` are token sums (DPO's ``log pi(y|x)``), ``*_counts`` the target-token counts.
    ``valid`` marks pairs whose two sequences both have at least one target token; the pair losses
    average over valid pairs only (an all-masked sequence must not turn into NaN or dilute the mean).
    """

    chosen_sums: torch.Tensor
    rejected_sums: torch.Tensor
    chosen_counts: torch.Tensor
    rejected_counts: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        """``[P]`` bool: both sequences of the pair have target tokens."""
        return (self.chosen_counts > 0) & (self.rejected_counts > 0)

    @property
    def chosen_means(self) -> torch.Tensor:
        """``[P]`` mean token log-prob of the chosen (sum / count; count clamped to >= 1)."""
        return self.chosen_sums / self.chosen_counts.clamp(min=1.0)

    @property
    def rejected_means(self) -> torch.Tensor:
        """``[P]`` mean token log-prob of the rejected (sum / count; count clamped to >= 1)."""
        return self.rejected_sums / self.rejected_counts.clamp(min=1.0)

    def chosen_nll(self) -> torch.Tensor:
        """Token-mean NLL over every chosen target token of the micro-batch (0-d fp32).

        Equals ``nn.CrossEntropyLoss()`` on the chosen labels (TRL's ``sft`` loss type and CPO/ORPO
        ``nll_loss``); 0 when no chosen token is a target. Every chosen target token counts, also
        those of a pair whose rejected sequence is empty (this is a token-level loss).
        """
        return -self.chosen_sums.sum() / self.chosen_counts.sum().clamp(min=1.0)


def pair_log_probs(
    token_logps: torch.Tensor, batch: Batch, extra_logps: torch.Tensor | None = None
) -> PairLogProbs:
    """:func:`sequence_log_probs` of a pair batch, split into chosen and rejected.

    Args:
        token_logps: ``[b, s]`` fp32 log-probs of the targets.
        batch: a pair batch (``loss_mask``, ``sequence_ids``, ``num_sequences`` = 2P).
        extra_logps: ``[k]`` log-probs of the batch's extra targets (prefix-shared rows).

    Returns:
        :class:`PairLogProbs` with ``[P]`` fp32 fields.
    """
    sums, counts = sequence_log_probs(token_logps, batch, extra_logps)
    chosen_sums, rejected_sums = split_pairs(sums)
    chosen_counts, rejected_counts = split_pairs(counts)
    return PairLogProbs(chosen_sums, rejected_sums, chosen_counts, rejected_counts)
