"""Weighted blending of datasets and deterministic train/valid/test splits.

**Blend.** A blend of datasets ``D_k`` with normalised weights ``w_k`` has ``N = sum_k |D_k|``
items by default. Dataset ``k`` contributes ``c_k`` items (``w_k * N`` rounded by largest
remainder, so ``sum c_k = N``), and its ``j``-th item sits at the position given by sorting the
keys ``(j + 0.5) / c_k`` of all items (ties by dataset index): every prefix of the blend holds
each dataset within about one item of its share (the property Megatron-LM's greedy
``build_blending_indices`` has, computed with one sort). Within dataset ``k`` the ``j``-th draw is
row ``perm_p[j mod |D_k|]`` where ``p = j // |D_k|`` and ``perm_p`` is a seeded permutation of
``D_k``'s rows: an up-weighted dataset is read in full before any row repeats, a down-weighted one
contributes a random subset. The blend is fixed for the run (the sampler shuffles its order
each epoch).

**Split.** ``split_indices(n, fractions, seed)`` cuts a seeded permutation of ``n`` rows into
consecutive parts of the given fractions (each part sorted back into file order); the same
``(n, fractions, seed)`` always gives the same parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class SubsetDataset:
    """Rows ``indices`` of ``dataset``, in that order.

    Args:
        dataset: Any dataset with ``__len__`` / ``__getitem__``.
        indices: int64 row indices into ``dataset``.
    """

    def __init__(self, dataset: Any, indices: np.ndarray) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(self.indices[i])]

    def __repr__(self) -> str:
        return f"SubsetDataset({self.dataset!r}, rows={len(self)})"


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    exact = weights * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


class BlendedDataset:
    """Items drawn from several datasets in proportion to their weights (module docstring).

    Args:
        datasets: Non-empty datasets.
        weights: Positive relative weights, one per dataset.
        size: Items in the blend; default the sum of the datasets' lengths.
        seed: Seed of the per-dataset row permutations.

    Attributes:
        dataset_index: ``[size]`` int64, which dataset item ``i`` comes from.
        sample_index: ``[size]`` int64, its row in that dataset.
    """

    def __init__(
        self,
        datasets: Sequence[Any],
        weights: Sequence[float],
        size: int | None = None,
        seed: int = 0,
    ) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("give one weight per dataset, and at least one dataset")
        w = np.asarray(weights, dtype=np.float64)
        if (w <= 0).any() or any(len(d) == 0 for d in datasets):
            raise ValueError("weights must be > 0 and datasets non-empty")
        self.datasets = list(datasets)
        self.weights = w / w.sum()
        size = int(size if size is not None else sum(len(d) for d in datasets))
        counts = _largest_remainder(self.weights, size)
        keys = [(np.arange(c) + 0.5) / c for c in counts]
        which = np.concatenate([np.full(c, k, np.int64) for k, c in enumerate(counts)])
        order = np.lexsort((which, np.concatenate(keys)))
        self.dataset_index = which[order]
        self.sample_index = np.empty(size, dtype=np.int64)
        for k, (ds, c) in enumerate(zip(self.datasets, counts, strict=True)):
            n = len(ds)
            draws = [np.random.default_rng([seed, k, p]).permutation(n) for p in range(-(-c // n))]
            rows = np.concatenate(draws)[:c] if draws else np.empty(0, np.int64)
            self.sample_index[self.dataset_index == k] = rows

    def __len__(self) -> int:
        return int(self.dataset_index.size)

    def __getitem__(self, i: int) -> Any:
        return self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{d!r}: {w:.3f}" for d, w in zip(self.datasets, self.weights, strict=True)
        )
        return f"BlendedDataset({parts}; {len(self)} items)"


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Deterministic disjoint parts of ``range(n)`` in the given fractions (module docstring).

    Args:
        n: Number of rows.
        fractions: Non-negative fractions summing to 1 (e.g. ``[0.98, 0.02, 0.0]``).
        seed: Permutation seed.

    Returns:
        One sorted int64 index array per fraction.
    """
    perm = np.random.default_rng([seed, n]).permutation(n)
    counts = _largest_remainder(np.asarray(fractions, dtype=np.float64), n)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [np.sort(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
