"""GPT-style pretraining samples: fixed windows over the concatenated token stream."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from megatron.data.indexed import DatasetError, IndexedDataset
from megatron.data.meta import check_meta, meta_path

logger = logging.getLogger(__name__)


class TextDataset:
    """Fixed-length windows over all documents of a ``text`` dataset, back to back.

    Documents already end with EOS in the file, so the ``.bin`` file is the training stream.
    Sample ``i`` is ``stream[i*s : i*s + s + 1]`` (``s = seq_length``): ``s + 1`` tokens so that
    inputs are ``tokens[:-1]`` and labels ``tokens[1:]``; consecutive samples overlap by one token
    and a window may span several documents (no attention reset at EOS, as in GPT-2/Megatron
    pretraining). ``len = (num_tokens - 1) // s``; the last partial window is dropped. Access is
    O(1): one slice of the mapped file.

    If ``PREFIX.meta.json`` exists its format must be ``text``; tokenizer checks are the caller's
    (:func:`megatron.data.meta.check_meta`).

    Args:
        prefix: Dataset prefix (``PREFIX.bin`` / ``PREFIX.idx``).
        seq_length: Tokens per training sequence ``s``, at least 1.

    Raises:
        DatasetError: If the dataset holds fewer than ``seq_length + 1`` tokens, or its metadata
            names another format.
    """

    def __init__(self, prefix: str | Path, seq_length: int) -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.prefix = str(prefix)
        self.seq_length = int(seq_length)
        self.indexed = IndexedDataset(prefix)
        if meta_path(prefix).is_file():
            check_meta(prefix, expected_format="text")
        else:
            logger.warning("%s has no meta.json; cannot check its format", self.prefix)
        needed = self.seq_length + 1
        if self.indexed.num_tokens < needed:
            raise DatasetError(
                f"dataset {self.prefix!r} has {self.indexed.num_tokens} tokens but seq_length "
                f"{self.seq_length} needs at least {needed}; use a shorter seq_length or more data"
            )
        self._tokens = self.indexed.tokens
        self.num_samples = (self.indexed.num_tokens - 1) // self.seq_length

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        """Sample ``i``.

        Returns:
            ``{"tokens": int64 [seq_length + 1]}`` (a copy, safe to hand to torch).

        Raises:
            IndexError: If ``i`` is out of range.
        """
        n = self.num_samples
        idx = int(i) + n if i < 0 else int(i)
        if not 0 <= idx < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        start = idx * self.seq_length
        window = self._tokens[start : start + self.seq_length + 1]
        return {"tokens": np.array(window, dtype=np.int64)}

    def __repr__(self) -> str:
        return f"TextDataset({self.prefix!r}, seq_length={self.seq_length}, samples={len(self)})"
