"""Datasets of the post-training formats: one example per item, read from aligned mmap fields.

==========  =================================================  ==========
class       ``__getitem__(i)`` (int64 token arrays)            batch kind
==========  =================================================  ==========
SFT         ``tokens [n]``, ``loss_mask [n]`` uint8             sequence
Pairwise    ``prompt``, ``chosen``, ``rejected`` [+ ``margin``] pair
Unpaired    ``prompt``, ``completion``, ``label`` (bool),       unpaired
            ``kl_completion`` (see :class:`UnpairedDataset`)
Prompt      ``prompt``                                         prompt
==========  =================================================  ==========

A pairwise item is a whole pair, so a pair is never split across micro-batches. Items are copies
(safe to hand to torch); access is O(1) slices of the mapped files. The collator that batches
them is built next to them by :func:`megatron.data.builders.build_data` (``data.layout``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from megatron.data.indexed import DatasetError, IndexedDataset
from megatron.data.meta import field_prefix, read_meta, scalar_path


class FieldDataset:
    """Base: the aligned fields and scalars of one preprocessed dataset.

    Args:
        prefix: Dataset prefix.
        seq_length: Longest sequence the run accepts (``data.seq_length``).
        meta: Its metadata (read if None).

    Raises:
        DatasetError: If the format differs from the class's, fields disagree in row count, or a
            sequence is longer than ``seq_length``.
    """

    format: str = ""
    batch_kind: str = ""
    field_names: tuple[str, ...] = ()

    def __init__(self, prefix: str | Path, seq_length: int, meta: dict[str, Any] | None = None):
        self.prefix = str(prefix)
        self.meta = meta if meta is not None else read_meta(prefix)
        if self.meta["format"] != self.format:
            raise DatasetError(
                f"{prefix}: format is {self.meta['format']!r}, {type(self).__name__} reads "
                f"{self.format!r}"
            )
        self.fields = {n: IndexedDataset(field_prefix(prefix, n)) for n in self.field_names}
        counts = {n: len(d) for n, d in self.fields.items()}
        if (
            len(set(counts.values())) != 1
            or next(iter(counts.values())) != self.meta["num_documents"]
        ):
            raise DatasetError(
                f"{prefix}: fields hold {counts} rows but meta.json says "
                f"{self.meta['num_documents']}; re-run tools/preprocess_data.py"
            )
        longest = int(self.meta.get("max_sequence_length", 0))
        if longest > seq_length:
            raise DatasetError(
                f"{prefix}: its longest sequence has {longest} tokens but data.seq_length is "
                f"{seq_length}; re-run tools/preprocess_data.py with --max-length {seq_length} "
                "(and a --length-policy) or raise data.seq_length"
            )
        self.seq_length = seq_length
        self.scalars = {
            name: np.load(scalar_path(prefix, name), mmap_mode="r")
            for name in self.meta.get("scalars", [])
        }
        self._len = next(iter(counts.values()))

    def __len__(self) -> int:
        return self._len

    def _index(self, i: int) -> int:
        idx = int(i) + self._len if i < 0 else int(i)
        if not 0 <= idx < self._len:
            raise IndexError(f"index {i} out of range for {self._len} rows")
        return idx

    def _get(self, name: str, i: int) -> np.ndarray:
        return np.array(self.fields[name][i], dtype=np.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.prefix!r}, rows={len(self)})"


class SFTDataset(FieldDataset):
    """``sft`` rows: a whole conversation and its loss mask."""

    format = "sft"
    batch_kind = "sequence"
    field_names = ("tokens", "loss_mask")

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        """Row ``i``: ``tokens`` int64 ``[n]``, ``loss_mask`` uint8 ``[n]`` (1 = trained target)."""
        i = self._index(i)
        return {
            "tokens": self._get("tokens", i),
            "loss_mask": np.array(self.fields["loss_mask"][i]),
        }


class PairwiseDataset(FieldDataset):
    """``pairwise`` rows: one preference pair per item."""

    format = "pairwise"
    batch_kind = "pair"
    field_names = ("prompt", "chosen", "rejected")

    @property
    def has_margin(self) -> bool:
        """Whether every row carries a ``margin``."""
        return "margin" in self.scalars

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Pair ``i``: ``prompt``, ``chosen``, ``rejected`` int64 arrays, ``margin`` (float) if any."""
        i = self._index(i)
        item: dict[str, Any] = {n: self._get(n, i) for n in self.field_names}
        for name, values in self.scalars.items():
            item[name] = float(values[i])
        return item


class UnpairedDataset(FieldDataset):
    """``unpaired`` rows, each with a deterministic *mismatched* completion for KTO's KL term.

    Mismatch rule: with ``order = default_rng(seed).permutation(n)``, row ``order[k]`` borrows
    the completion of row ``order[(k + 1) % n]`` — one cycle through all rows, so no row borrows
    its own completion and every completion is borrowed exactly once per epoch. It depends only
    on ``(n, seed)``, never on batching, so it survives resumes and any data-parallel layout.
    (TRL 1.16's ``KTOTrainer`` instead rotates completions by one *within* each batch; both pair
    every prompt with another example's completion. A borrowed completion can still share the
    prompt's text when the data holds several completions of one prompt, e.g. after
    ``--from-pairwise``.)

    Args:
        prefix: Dataset prefix.
        seq_length: ``data.seq_length``.
        meta: Its metadata (read if None).
        seed: Seed of the mismatch permutation (``data.seed``).

    Raises:
        DatasetError: Fewer than 2 rows (no mismatched completion exists).
    """

    format = "unpaired"
    batch_kind = "unpaired"
    field_names = ("prompt", "completion")

    def __init__(
        self, prefix: str | Path, seq_length: int, meta: dict[str, Any] | None = None, seed: int = 0
    ):
        super().__init__(prefix, seq_length, meta)
        if len(self) < 2:
            raise DatasetError(
                f"{prefix}: an unpaired dataset needs at least 2 rows (KTO's KL term pairs each "
                f"prompt with another row's completion); it has {len(self)}"
            )
        order = np.random.default_rng(seed).permutation(len(self))
        self.partner = np.empty(len(self), dtype=np.int64)
        self.partner[order] = np.roll(order, -1)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Row ``i``: ``prompt``, ``completion``, ``kl_completion`` int64 arrays, ``label`` bool."""
        i = self._index(i)
        return {
            "prompt": self._get("prompt", i),
            "completion": self._get("completion", i),
            "label": bool(self.scalars["label"][i]),
            "kl_completion": self._get("completion", int(self.partner[i])),
        }


class PromptDataset(FieldDataset):
    """``prompt`` rows (online RL: completions are generated at train time).

    Datasets written since the ``row`` field exists also give each row's record (the original
    prompt and its extra columns); older ones give the token ids only.
    """

    format = "prompt"
    batch_kind = "prompt"
    field_names = ("prompt",)

    def __init__(self, prefix: str | Path, seq_length: int, meta: dict[str, Any] | None = None):
        super().__init__(prefix, seq_length, meta)
        self.rows = None
        if "row" in (self.meta.get("fields") or {}):
            self.rows = IndexedDataset(field_prefix(prefix, "row"))
            if len(self.rows) != len(self):
                raise DatasetError(
                    f"{prefix}: the row field holds {len(self.rows)} rows, the prompts "
                    f"{len(self)}; re-run tools/preprocess_data.py"
                )

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Row ``i``: ``prompt`` int64 ``[n]`` and ``row``: the record (a dict, or ``None``)."""
        i = self._index(i)
        row = None
        if self.rows is not None:
            row = json.loads(self.rows[i].tobytes().decode("utf-8"))
        return {"prompt": self._get("prompt", i), "row": row}


DATASET_CLASSES: dict[str, type[FieldDataset]] = {
    c.format: c for c in (SFTDataset, PairwiseDataset, UnpairedDataset, PromptDataset)
}
"""Format -> dataset class (``text`` is :class:`megatron.data.text_dataset.TextDataset`)."""
