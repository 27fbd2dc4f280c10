"""Datasets for an objective's batch kind, from the ``data`` config section.

``build_data(kind, data_cfg, vocab_size)`` checks every dataset against the run first
(:func:`megatron.data.meta.check_dataset_compat`: the format must serve ``kind``, the tokenizer
must match ``data.tokenizer``, token ids must fit ``model.vocab_size``; ``preflight`` calls it
before any rank starts), then opens them, applies ``data.split``, blends by weight
(:mod:`megatron.data.blending`) and builds the collator that turns samples into a
:class:`~megatron.data.batch.Batch` (returned next to the datasets; the caller owns it):

=============  ===================  ===============================================
batch kind     formats              collate
=============  ===================  ===============================================
``sequence``   ``text``, ``sft``    fixed windows (text); padded/packed (sft)
``pair``       ``pairwise``         padded/packed/prefix_shared, pairs kept whole
``unpaired``   ``unpaired``         padded/packed, KL sequences appended
``prompt``     ``prompt``           padded/packed
=============  ===================  ===============================================

All datasets of a blend must share a format and a tokenizer (``vocab_hash``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron.data.batch import Batch
from megatron.data.blending import BlendedDataset, SubsetDataset, split_indices
from megatron.data.collators import PREFIX_LAYOUTS, Collator, collate_sequences, default_layout
from megatron.data.datasets import DATASET_CLASSES, UnpairedDataset
from megatron.data.indexed import DatasetError
from megatron.data.meta import check_dataset_compat
from megatron.data.text_dataset import TextDataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunData:
    """The datasets of a run and the collator of its batch kind.

    Attributes:
        train: the training dataset (blended, split).
        valid: the validation dataset, or ``None``.
        test: the test dataset, or ``None``.
        collate: ``collate(samples) -> Batch`` for every split.
    """

    train: Any
    valid: Any | None
    test: Any | None
    collate: Callable[[list[dict[str, Any]]], Batch]


def _open(meta: dict[str, Any], path: str, data_cfg: Any) -> Any:
    fmt = meta["format"]
    if fmt == "text":
        return TextDataset(path, data_cfg.seq_length)
    cls = DATASET_CLASSES[fmt]
    if cls is UnpairedDataset:
        return UnpairedDataset(path, data_cfg.seq_length, meta, seed=data_cfg.seed)
    return cls(path, data_cfg.seq_length, meta)


def _open_blend(
    kind: str, sources: list[Any], data_cfg: Any, vocab_size: int, key: str
) -> tuple[list[Any], list[dict[str, Any]]]:
    datasets, metas = [], []
    for i, src in enumerate(sources):
        try:
            meta = check_dataset_compat(src.path, kind, data_cfg.tokenizer, vocab_size)
            datasets.append(_open(meta, src.path, data_cfg))
        except DatasetError as exc:
            raise DatasetError(f"{key}[{i}]: {exc}") from None
        metas.append(meta)
    formats = {m["format"] for m in metas}
    if len(formats) > 1:
        raise DatasetError(f"{key}: a blend must hold one format, got {sorted(formats)}")
    hashes = {m.get("tokenizer", {}).get("vocab_hash") for m in metas} - {None}
    if len(hashes) > 1:
        names = sorted({str(m.get("tokenizer", {}).get("name")) for m in metas})
        raise DatasetError(f"{key}: datasets were built with different tokenizers ({names})")
    templates = {str(m.get("chat_template", {}).get("sha256")) for m in metas}
    if len(templates) > 1:
        logger.warning("%s: datasets were rendered with different chat templates", key)
    return datasets, metas


def _eos_id(metas: list[dict[str, Any]]) -> int | None:
    ids = {(m.get("special_ids") or {}).get("eos") for m in metas}
    return ids.pop() if len(ids) == 1 else None


def _collate(
    kind: str,
    datasets: list[Any],
    metas: list[dict[str, Any]],
    data_cfg: Any,
    options: dict[str, Any],
) -> Any:
    if isinstance(datasets[0], TextDataset):
        return collate_sequences
    with_margin = all(getattr(d, "has_margin", False) for d in datasets)
    if any(getattr(d, "has_margin", False) for d in datasets) and not with_margin:
        logger.warning("pair margins ignored: not every dataset of the blend has them")
    options = dict(options)
    if options.get("score_token") == "eos":
        eos = _eos_id(metas)
        if eos is None:
            raise DatasetError(
                "objective.score_token: eos needs the tokenizer's EOS id, which the datasets' "
                "meta.json (special_ids.eos) does not give; use score_token: last"
            )
        options["eos_id"] = eos
    layout = data_cfg.layout
    if layout == "auto":  # a section built in code; load_config resolves it (default_layout)
        layout = default_layout(kind)
    if kind == "prompt" and layout in PREFIX_LAYOUTS:
        # online RL lays its sampled completions out in this layout itself
        # (megatron.rollout.buffer); prompt rows alone have nothing to share
        layout = "padded"
    return Collator(
        kind,
        layout,
        data_cfg.seq_length,
        data_cfg.pad_to_multiple_of,
        with_margin,
        **options,
    )


def _blend(datasets: list[Any], weights: list[float], seed: int) -> Any:
    if len(datasets) == 1:
        return datasets[0]
    return BlendedDataset(datasets, weights, seed=seed)


def build_data(
    kind: str, data_cfg: Any, vocab_size: int, collate_options: dict[str, Any] | None = None
) -> RunData:
    """Train/valid/test datasets for ``kind`` (separate prefixes, or ``data.split`` of ``train``)
    and their collator.

    ``collate_options`` are the objective's :class:`~megatron.data.collators.Collator` keyword
    arguments (``Objective.collate_options()``: e.g. ``with_kl``, ``score_token``).

    Raises:
        DatasetError: A dataset is missing or does not fit the run; the message starts with the
            config key (``data.train[1]: PREFIX: ...``).
    """
    train_ds, metas = _open_blend(kind, data_cfg.train, data_cfg, vocab_size, "data.train")
    weights = [s.weight for s in data_cfg.train]
    collate = _collate(kind, train_ds, metas, data_cfg, collate_options or {})
    parts: list[Any] = [None, None, None]
    if data_cfg.split:
        cuts = [split_indices(len(d), data_cfg.split, data_cfg.seed) for d in train_ds]
        for j, name in enumerate(("train", "valid", "test")):
            if j >= len(data_cfg.split) or data_cfg.split[j] == 0:
                continue
            subsets = [SubsetDataset(d, c[j]) for d, c in zip(train_ds, cuts, strict=True)]
            empty = [d.prefix for d, s in zip(train_ds, subsets, strict=True) if not len(s)]
            if empty:
                raise DatasetError(
                    f"data.split: the {name} part of {empty[0]} is empty; use a larger fraction"
                )
            parts[j] = _blend(subsets, weights, data_cfg.seed)
    else:
        parts[0] = _blend(train_ds, weights, data_cfg.seed)
    for j, key in ((1, "valid"), (2, "test")):
        sources = getattr(data_cfg, key)
        if sources:
            ds, _ = _open_blend(kind, sources, data_cfg, vocab_size, f"data.{key}")
            parts[j] = _blend(ds, [s.weight for s in sources], data_cfg.seed)
    return RunData(train=parts[0], valid=parts[1], test=parts[2], collate=collate)
