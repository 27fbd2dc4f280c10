"""``--format prompt``: prompts only, for online RL (generation happens at train time).

Row: ``{"prompt": str | [messages], ...}``. A conversational prompt is rendered with the
generation prompt (or continues a final assistant message); a string is used as is, without EOS.
Stored as ``PREFIX.prompt.{bin,idx}`` (token ids) and ``PREFIX.row.{bin,idx}``: the whole record as
UTF-8 JSON, so the original prompt and every other column (e.g. a reference ``answer``) reach the
reward functions, as TRL passes a dataset's extra columns. ``--max-length`` with
``truncate_prompt`` keeps the last tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from megatron.data.formats.base import (
    EncodeContext,
    Encoded,
    FieldSpec,
    RowFormat,
    check_text,
    fit_prompt,
    require,
)
from megatron.data.formats.boundaries import split_prompt_completions
from megatron.data.formats.chat import check_messages
from megatron.data.sources import RowError


def read_prompt(record: Mapping[str, Any], key: str = "prompt") -> str | list[dict[str, str]]:
    """A string or message-list prompt from ``record[key]``, validated."""
    value = require(record, key)
    if isinstance(value, list):
        return check_messages(value, key)
    return check_text(value, key)


class PromptFormat(RowFormat):
    """Prompt-only rows."""

    name = "prompt"
    batch_kind = "prompt"
    fields = (FieldSpec("prompt"), FieldSpec("row", json=True))

    def extract(self, record: Mapping[str, Any], options: Any) -> list[Any]:
        prompt = read_prompt(record)
        try:
            row = json.dumps(dict(record), ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise RowError("bad_column", f"the row cannot be stored as JSON: {e}") from None
        return [(prompt, row)]

    def encode(self, items: list[Any], ctx: EncodeContext) -> list[Encoded | RowError]:
        out: list[Encoded | RowError] = []
        prompts = [(p, []) for p, _ in items]
        for (_, row), split in zip(items, split_prompt_completions(prompts, ctx), strict=True):
            if isinstance(split, RowError):
                out.append(split)
                continue
            try:
                prompt, truncated = fit_prompt(split.prompt, [], ctx.options)
            except RowError as exc:
                out.append(exc)
                continue
            arr = np.asarray(prompt, dtype=np.int64)
            flags = ("prompt_truncated",) if truncated else ()
            arrays = {"prompt": arr, "row": np.frombuffer(row, dtype=np.uint8)}
            out.append(Encoded(arrays, lengths={"sequence": arr.size}, flags=flags))
        return out
