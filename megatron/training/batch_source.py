"""Where each optimizer step's micro-batches come from.

The trainer's loop is the same for every objective: it asks its *batch source* for the next
step's micro-batches (and the metrics that came with them), trains on them and, when it saves,
stores the source's state. Two sources exist:

* :class:`DatasetSource`: rows of a preprocessed dataset, in the seeded, resumable,
  data-parallel-sharded order of :class:`~megatron.data.sampler.GlobalBatchSampler`;
* :class:`megatron.rollout.source.RolloutSource`: completions sampled from the policy itself
  (online RL), scored and given advantages.

A source has ``next_step() -> (micro-batches, metrics)``, ``after_step()``,
``state_dict()`` (plain data, the same on every rank, stored in ``client_state.json``),
``rank_state()`` (this rank's own state or ``None``, stored as ``source_state_rank{r}.pt``),
``load_state_dict(client, rank_state)`` and ``provides_reference`` (whether its batches already
carry reference log-probs, so the step needs no reference provider). A source that evaluates
differently from the objective's loss on held-out rows has ``evaluate() -> metrics``.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron.data.batch import Batch
from megatron.data.sampler import GlobalBatchSampler


class DatasetSource:
    """Micro-batches of dataset rows (see the module docstring).

    Args:
        dataset: the training dataset (``dataset[i]`` is one sample).
        collate: ``collate(samples) -> Batch``.
        sampler: this rank's sampler.
    """

    provides_reference = False

    def __init__(self, dataset: Any, collate: Any, sampler: GlobalBatchSampler) -> None:
        self.dataset, self.collate, self.sampler = dataset, collate, sampler
        self._batches = None

    def next_step(self) -> tuple[list[Batch], dict[str, float]]:
        if self._batches is None:
            self._batches = iter(self.sampler)
        return micro_batches(next(self._batches), self.dataset, self.collate), {}

    def after_step(self) -> None:
        """Nothing to do."""

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def rank_state(self) -> None:
        return None

    def load_state_dict(self, client: dict[str, Any], rank_state: Any = None) -> None:
        self.sampler.load_state_dict(client["sampler"])
        self._batches = None


def micro_batches(indices: list[list[int]], dataset: Any, collate: Any) -> list[Batch]:
    """Collated micro-batches of dataset rows, each with its ``example_ids`` (the rows: what a
    reference cache is indexed by)."""
    out = []
    for mb in indices:
        batch = collate([dataset[i] for i in mb])
        out.append(batch.replace(example_ids=torch.tensor(mb, dtype=torch.long)))
    return out
