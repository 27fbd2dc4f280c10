"""Deterministic, resumable, data-parallel-sharded batch sampler.

Order: epoch ``e`` visits the samples in ``np.random.default_rng([seed, e]).permutation(n)``
(``arange(n)`` without shuffling). Each optimizer step takes the next ``G = m * a * d`` indices of
that order as its global batch (``m`` micro-batch size, ``a`` gradient-accumulation steps, ``d``
data-parallel size). Within the global batch, micro-batch ``k`` of DP rank ``r`` is::

    global_batch[(k * d + r) * m : (k * d + r + 1) * m]

so micro-step ``k`` of all ranks together covers the contiguous block ``[k*d*m, (k+1)*d*m)``. The
set of samples per step depends only on ``G``, so e.g. ``d=2, a=1`` and ``d=1, a=2`` train on the
same samples per optimizer step (the gradient-accumulation vs DP equivalence tests rely on this).

Epoch boundaries: a global batch never spans two epochs. With ``drop_last=True`` the ``n % G``
samples left at the end of an epoch are skipped and the next step starts epoch ``e + 1``. With
``drop_last=False`` the last global batch of an epoch is completed with the first samples of that
same epoch's order (a few samples repeat, shapes stay fixed).

Iteration is endless (epochs roll over); the trainer decides when to stop. The state is
``(epoch, position in the epoch's order)`` and advances when a step is yielded; a sampler restored
with :meth:`GlobalBatchSampler.load_state_dict` yields exactly the remaining order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


class GlobalBatchSampler:
    """Yields, per optimizer step, this rank's micro-batches of sample indices.

    Args:
        num_samples: Dataset length ``n``.
        micro_batch_size: Samples per micro-batch per rank ``m``.
        data_parallel_size: Number of data-parallel ranks ``d``.
        data_parallel_rank: This rank ``r`` in ``[0, d)``.
        gradient_accumulation_steps: Micro-batches per optimizer step per rank ``a``.
        seed: Seed of the per-epoch permutations.
        shuffle: Permute each epoch; else visit samples in order.
        drop_last: Skip an epoch's incomplete last global batch (else wrap it, see module doc).

    Raises:
        ValueError: If a size is < 1, the rank is out of range, or ``num_samples`` is smaller than
            one global batch ``m * a * d``.
    """

    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        data_parallel_size: int,
        data_parallel_rank: int,
        gradient_accumulation_steps: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        for name, value in (
            ("micro_batch_size", micro_batch_size),
            ("data_parallel_size", data_parallel_size),
            ("gradient_accumulation_steps", gradient_accumulation_steps),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank ({data_parallel_rank}) must be in [0, "
                f"data_parallel_size={data_parallel_size})"
            )
        self.num_samples = int(num_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_size = int(data_parallel_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.gradient_accumulation_steps = int(gradient_accumulation_steps)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.global_batch_size = micro_batch_size * gradient_accumulation_steps * data_parallel_size
        if self.num_samples < self.global_batch_size:
            raise ValueError(
                f"dataset has {self.num_samples} samples, fewer than one global batch of "
                f"{self.global_batch_size} (micro_batch_size {micro_batch_size} x "
                f"gradient_accumulation_steps {gradient_accumulation_steps} x data_parallel_size "
                f"{data_parallel_size}); use more data or a smaller batch"
            )
        self._epoch = 0
        self._position = 0  # index into the current epoch's order of the next step's first sample
        self._consumed = 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def consumed_samples(self) -> int:
        """Global samples handed out so far (all ranks; steps x global batch size)."""
        return self._consumed

    @property
    def epoch(self) -> int:
        """Epoch the next step is drawn from."""
        return self._epoch

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in a full epoch."""
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return -(-self.num_samples // self.global_batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The visiting order of epoch ``epoch``: int64 ``[num_samples]`` permutation."""
        if epoch != self._order_epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._order = rng.permutation(self.num_samples).astype(np.int64, copy=False)
            else:
                self._order = np.arange(self.num_samples, dtype=np.int64)
            self._order_epoch = epoch
        return self._order

    def _next_global_batch(self) -> np.ndarray:
        n, g = self.num_samples, self.global_batch_size
        remaining = n - self._position
        if remaining <= 0 or (self.drop_last and remaining < g):
            self._epoch += 1
            self._position = 0
        order = self.epoch_order(self._epoch)
        start = self._position
        batch = order[start : start + g]
        if batch.size < g:  # drop_last=False: complete from the start of this epoch's order
            batch = np.concatenate([batch, order[: g - batch.size]])
        self._position = min(start + g, n)
        self._consumed += g
        return batch

    def _rank_micro_batches(self, batch: np.ndarray) -> list[list[int]]:
        m, d, r = self.micro_batch_size, self.data_parallel_size, self.data_parallel_rank
        return [
            batch[(k * d + r) * m : (k * d + r + 1) * m].tolist()
            for k in range(self.gradient_accumulation_steps)
        ]

    def __iter__(self) -> Iterator[list[list[int]]]:
        """Endless steps, each ``gradient_accumulation_steps`` lists of ``micro_batch_size`` ints."""
        while True:
            yield self._rank_micro_batches(self._next_global_batch())

    def state_dict(self) -> dict[str, Any]:
        """Resumable state; the same for every DP rank (it describes the global order)."""
        return {
            "consumed_samples": self._consumed,
            "epoch": self._epoch,
            "position_in_epoch": self._position,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next step is the one after the last step it had yielded.

        The order must be the same one, so ``num_samples``, ``seed`` and ``shuffle`` must match.
        A different global batch size is allowed (e.g. a resume on a different DP size): the
        remaining samples of the epoch are then cut into batches of the new size.

        Raises:
            ValueError: If a key is missing or the order-defining fields differ.
        """
        missing = [k for k in ("consumed_samples", "epoch", "position_in_epoch") if k not in state]
        if missing:
            raise ValueError(f"sampler state is missing {missing}")
        for key in ("num_samples", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}; resuming would visit a different order "
                    "(same data and data seed are needed to resume)"
                )
        position = int(state["position_in_epoch"])
        if not 0 <= position <= self.num_samples:
            raise ValueError(f"sampler state position_in_epoch {position} out of range")
        self._consumed = int(state["consumed_samples"])
        self._epoch = int(state["epoch"])
        self._position = position
