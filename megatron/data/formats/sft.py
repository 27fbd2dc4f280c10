"""``--format sft``: supervised fine-tuning rows with a per-token loss mask.

Rows: ``{"messages": [...]}`` (multi-turn, an optional leading system message) or
``{"prompt", "completion"}`` (strings, or message lists as in TRL's prompt-completion format).
``--loss-on`` picks the trained tokens of ``messages`` rows: ``assistant`` (every assistant turn,
the default, like TRL's ``assistant_only_loss``), ``last-turn`` or ``all``; prompt-completion rows
train the completion (``all``: every token).

Stored as ``PREFIX.tokens`` (the whole rendered conversation's tokenization) and
``PREFIX.loss_mask`` (``uint8``, aligned token for token: 1 = trained as a prediction target).
``--max-length`` with ``truncate_prompt`` drops tokens from the left, never past the first token
before the last trained span.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from megatron.data.formats.base import (
    EncodeContext,
    Encoded,
    FieldSpec,
    RowDropped,
    RowFormat,
    keys_hint,
)
from megatron.data.formats.boundaries import encode_conversations, split_prompt_completions
from megatron.data.formats.chat import check_messages
from megatron.data.formats.unpaired import read_example
from megatron.data.sources import RowError


def _fit(
    tokens: list[int], mask: np.ndarray, protect_from: int, options: Any
) -> tuple[list[int], np.ndarray, bool]:
    limit = options.max_length
    if limit is None or len(tokens) <= limit:
        return tokens, mask, False
    message = f"{len(tokens)} tokens > --max-length {limit}"
    if options.length_policy == "error":
        raise RowError("too_long", message)
    if options.length_policy == "drop":
        raise RowDropped("too_long", message)
    cut = len(tokens) - limit
    if cut >= protect_from:
        raise RowDropped("completion_too_long", message + "; the last trained turn does not fit")
    return tokens[cut:], mask[cut:], True


class SFTFormat(RowFormat):
    """Tokens and loss mask."""

    name = "sft"
    batch_kind = "sequence"
    fields = (FieldSpec("tokens"), FieldSpec("loss_mask", mask=True))

    def extract(self, record: Mapping[str, Any], options: Any) -> list[tuple[str, Any]]:
        if record.get("messages") is not None:
            return [("messages", check_messages(record["messages"], "messages"))]
        if "prompt" in record or "completion" in record:
            prompt, completion, _ = read_example({**record, "label": True})
            return [("prompt_completion", (prompt, completion))]
        raise RowError(
            "missing_key",
            f"missing key 'messages' (or 'prompt' and 'completion'); keys present: "
            f"{keys_hint(record)}",
        )

    def _encode_pc(self, items: list[Any], ctx: EncodeContext) -> list[Any]:
        out = []
        for split in split_prompt_completions([(p, [c]) for p, c in items], ctx):
            if isinstance(split, RowError):
                out.append(split)
                continue
            tokens = split.prompt + split.completions[0]
            mask = np.zeros(len(tokens), dtype=np.uint8)
            mask[0 if ctx.options.loss_on == "all" else len(split.prompt) :] = 1
            out.append((tokens, mask, len(split.prompt), split.adjusted))
        return out

    def _encode_messages(self, items: list[Any], ctx: EncodeContext) -> list[Any]:
        out = []
        for conv in encode_conversations(items, ctx):
            if isinstance(conv, RowError):
                out.append(conv)
                continue
            protect = len(conv.tokens) if ctx.options.loss_on == "all" else conv.last_start
            out.append((conv.tokens, conv.mask, protect, conv.adjusted))
        return out

    def encode(self, items: list[tuple[str, Any]], ctx: EncodeContext) -> list[Encoded | RowError]:
        results: list[Any] = [None] * len(items)
        for kind, encode in (
            ("messages", self._encode_messages),
            ("prompt_completion", self._encode_pc),
        ):
            idx = [i for i, (k, _) in enumerate(items) if k == kind]
            for i, res in zip(idx, encode([items[i][1] for i in idx], ctx), strict=True):
                results[i] = res
        out: list[Encoded | RowError] = []
        for res in results:
            if isinstance(res, RowError):
                out.append(res)
                continue
            tokens, mask, protect, adjusted = res
            if ctx.options.loss_on == "all":
                protect = len(tokens)
            try:
                tokens, mask, truncated = _fit(tokens, mask, protect, ctx.options)
            except RowError as exc:
                out.append(exc)
                continue
            arrays = {"tokens": np.asarray(tokens, dtype=np.int64), "loss_mask": mask}
            lengths = {"sequence": len(tokens), "trained": int(mask[1:].sum())}
            flags = ("boundary_adjusted",) * adjusted + ("prompt_truncated",) * truncated
            out.append(Encoded(arrays, {}, lengths, flags))
        return out
