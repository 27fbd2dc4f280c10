"""Datasets for an objective's batch kind, from the ``data`` config section."""

from __future__ import annotations

from typing import Any

from megatron.data.collators import collate_sequences
from megatron.data.indexed import DatasetError
from megatron.data.text_dataset import TextDataset


class SequenceDataset(TextDataset):
    """:class:`TextDataset` with the collator of the ``sequence`` batch kind attached."""

    collate = staticmethod(collate_sequences)


def _check_tokens(ds: TextDataset, prefix: str, vocab_size: int) -> None:
    from megatron.data.meta import read_meta

    try:
        meta = read_meta(prefix)
    except FileNotFoundError:
        return
    tok_vocab = int(meta.get("tokenizer", {}).get("vocab_size", 0))
    if tok_vocab > vocab_size:
        raise DatasetError(
            f"{prefix}: tokenized with a vocabulary of {tok_vocab} tokens, but model.vocab_size is "
            f"{vocab_size}; set model.vocab_size >= {tok_vocab} or re-tokenize the data"
        )


def _one(kind: str, sources: list[Any], seq_length: int, vocab_size: int, key: str) -> Any:
    if kind != "sequence":
        raise DatasetError(f"batch kind {kind!r} has no dataset builder yet")
    if len(sources) != 1:
        raise DatasetError(
            f"{key}: weighted blending of several datasets is not implemented yet; give one source"
        )
    ds = SequenceDataset(sources[0].path, seq_length)
    _check_tokens(ds, sources[0].path, vocab_size)
    return ds


def build_datasets(kind: str, data_cfg: Any, vocab_size: int) -> tuple[Any, Any | None]:
    """``(train, valid or None)`` datasets for ``kind``; each has ``collate(samples)``."""
    train = _one(kind, data_cfg.train, data_cfg.seq_length, vocab_size, "data.train")
    valid = None
    if data_cfg.valid:
        valid = _one(kind, data_cfg.valid, data_cfg.seq_length, vocab_size, "data.valid")
    return train, valid
