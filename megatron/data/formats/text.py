"""``--format text``: one document per row, tokenized whole, EOS appended (pretraining data).

Stored at ``PREFIX.{bin,idx}`` (the prefix itself, no field suffix); read as fixed windows by
:class:`megatron.data.text_dataset.TextDataset`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from megatron.data.formats.base import EncodeContext, Encoded, FieldSpec, RowFormat, keys_hint
from megatron.data.sources import RowError


class TextFormat(RowFormat):
    """Plain documents under ``options.text_key``."""

    name = "text"
    batch_kind = "sequence"
    fields = (FieldSpec(""),)

    def extract(self, record: Mapping[str, Any], options: Any) -> list[str]:
        key = options.text_key
        if key not in record:
            raise RowError(
                "missing_key", f"missing key {key!r} (keys present: {keys_hint(record)})"
            )
        value = record[key]
        if not isinstance(value, str):
            raise RowError("not_a_string", f"{key!r} must be a string, got {type(value).__name__}")
        return [value]

    def encode(self, items: list[str], ctx: EncodeContext) -> list[Encoded | RowError]:
        eod = [ctx.tokenizer.eos_id] if ctx.options.append_eod else []
        out: list[Encoded | RowError] = []
        for ids in ctx.tokenizer.encode_batch(items):
            doc = np.asarray(ids + eod, dtype=np.int64)
            out.append(Encoded({"": doc}, lengths={"sequence": doc.size}))
        return out
