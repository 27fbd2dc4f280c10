"""``--format prompt``: prompts only, for online RL (generation happens at train time).

Row: ``{"prompt": str | [messages]}``. A conversational prompt is rendered with the generation
prompt (or continues a final assistant message); a string is used as is, without EOS. Stored as
``PREFIX.prompt.{bin,idx}``. ``--max-length`` with ``truncate_prompt`` keeps the last tokens.
"""

from __future__ import annotations

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
    fields = (FieldSpec("prompt"),)

    def extract(self, record: Mapping[str, Any], options: Any) -> list[Any]:
        return [read_prompt(record)]

    def encode(self, items: list[Any], ctx: EncodeContext) -> list[Encoded | RowError]:
        out: list[Encoded | RowError] = []
        for split in split_prompt_completions([(p, []) for p in items], ctx):
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
            out.append(Encoded({"prompt": arr}, lengths={"sequence": arr.size}, flags=flags))
        return out
