"""``--format pairwise``: preference pairs in one pass, the prompt stored once.

Rows (TRL's preference formats): ``{"prompt", "chosen", "rejected"}`` with strings (standard) or
message lists (conversational), or ``{"chosen", "rejected"}`` alone (implicit prompt: the shared
prefix is extracted as in TRL 1.16 ``extract_prompt`` — the longest common run of messages, or of
characters, giving a space just before the divergence to the completions; as TRL's
``maybe_extract_prompt``, a string ``prompt`` next to conversational completions is ignored and
the prompt is extracted). Optional numbers ``margin``, ``score_chosen``, ``score_rejected`` are
carried through; each must be given in every row or in none.

Stored aligned by construction: ``PREFIX.prompt``, ``PREFIX.chosen``, ``PREFIX.rejected``
(``.bin``/``.idx`` each, row ``i`` of the three is pair ``i``) and ``PREFIX.<scalar>.npy``.
``prompt + chosen`` and ``prompt + rejected`` are exactly the tokenizations of the two whole
rendered conversations (see :mod:`megatron.data.formats.chat`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megatron.data.formats.base import (
    EncodeContext,
    Encoded,
    FieldSpec,
    RowFormat,
    ScalarSpec,
    check_number,
    check_text,
    fit_prompt,
    require,
)
from megatron.data.formats.boundaries import split_prompt_completions
from megatron.data.formats.chat import check_messages, is_conversation
from megatron.data.sources import RowError

PAIR_SCALARS = ("margin", "score_chosen", "score_rejected")


@dataclass
class Pair:
    """A validated pair: strings, or message lists throughout."""

    prompt: Any
    chosen: Any
    rejected: Any
    scalars: dict[str, float] = field(default_factory=dict)


def _implicit_strings(chosen: str, rejected: str) -> tuple[str, str, str]:
    idx = next(
        (i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b),
        min(len(chosen), len(rejected)),
    )
    if idx > 0 and chosen[idx - 1] == " ":
        idx -= 1  # the space belongs to the completions (TRL's extract_prompt)
    if idx == 0:
        raise RowError(
            "no_prompt",
            "'chosen' and 'rejected' share no prefix to use as the prompt; add 'prompt'",
        )
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _implicit_messages(chosen: list, rejected: list) -> tuple[list, list, list]:
    idx = next(
        (i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b),
        min(len(chosen), len(rejected)),
    )
    if idx == 0:
        raise RowError(
            "no_prompt", "'chosen' and 'rejected' share no leading messages to use as the prompt"
        )
    for key, rest in (("chosen", chosen[idx:]), ("rejected", rejected[idx:])):
        if not rest:
            raise RowError("empty", f"{key!r} has no messages after the shared prompt")
        if rest[0]["role"] != "assistant":
            raise RowError(
                "bad_message", f"{key!r} continues the prompt with a {rest[0]['role']!r} turn"
            )
    return chosen[:idx], chosen[idx:], rejected[idx:]


def read_pair(record: Mapping[str, Any]) -> Pair:
    """Validate a pairwise record (see the module docstring).

    Raises:
        RowError: ``missing_key``, ``not_a_string``, ``bad_message``, ``mixed_types``, ``empty``,
            ``identical``, ``no_prompt`` or ``bad_number``.
    """
    chosen, rejected = require(record, "chosen"), require(record, "rejected")
    prompt = record.get("prompt")
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen, rejected = check_messages(chosen, "chosen"), check_messages(rejected, "rejected")
        if chosen == rejected:
            raise RowError("identical", "'chosen' and 'rejected' are identical")
        if is_conversation(prompt):
            prompt = check_messages(prompt, "prompt")
        else:
            prompt, chosen, rejected = _implicit_messages(chosen, rejected)
    elif isinstance(chosen, str) and isinstance(rejected, str):
        check_text(chosen, "chosen")
        check_text(rejected, "rejected")
        if chosen == rejected:
            raise RowError("identical", "'chosen' and 'rejected' are identical")
        if prompt is None:
            prompt, chosen, rejected = _implicit_strings(chosen, rejected)
        elif isinstance(prompt, list):
            raise RowError(
                "mixed_types", "'prompt' is a message list but 'chosen'/'rejected' are strings"
            )
        else:
            check_text(prompt, "prompt")
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            check_text(value, key)
    else:
        kinds = f"{type(chosen).__name__} and {type(rejected).__name__}"
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str | list):
                check_text(value, key)  # raises not_a_string with the key
        raise RowError(
            "mixed_types", f"'chosen' and 'rejected' must both be strings or both lists ({kinds})"
        )
    scalars = {k: check_number(record[k], k) for k in PAIR_SCALARS if record.get(k) is not None}
    return Pair(prompt, chosen, rejected, scalars)


class PairwiseFormat(RowFormat):
    """Prompt, chosen and rejected, aligned."""

    name = "pairwise"
    batch_kind = "pair"
    fields = (FieldSpec("prompt"), FieldSpec("chosen"), FieldSpec("rejected"))
    scalars = tuple(ScalarSpec(k) for k in PAIR_SCALARS)

    def extract(self, record: Mapping[str, Any], options: Any) -> list[Pair]:
        return [read_pair(record)]

    def encode(self, items: list[Pair], ctx: EncodeContext) -> list[Encoded | RowError]:
        splits = split_prompt_completions([(p.prompt, [p.chosen, p.rejected]) for p in items], ctx)
        out: list[Encoded | RowError] = []
        for pair, split in zip(items, splits, strict=True):
            if isinstance(split, RowError):
                out.append(split)
                continue
            chosen, rejected = split.completions
            if chosen == rejected:
                out.append(RowError("identical", "'chosen' and 'rejected' tokenize identically"))
                continue
            try:
                prompt, truncated = fit_prompt(
                    split.prompt, [len(chosen), len(rejected)], ctx.options
                )
            except RowError as exc:
                out.append(exc)
                continue
            arrays = {
                "prompt": np.asarray(prompt, dtype=np.int64),
                "chosen": np.asarray(chosen, dtype=np.int64),
                "rejected": np.asarray(rejected, dtype=np.int64),
            }
            lengths = {k: int(v.size) for k, v in arrays.items()}
            lengths["sequence"] = lengths["prompt"] + max(lengths["chosen"], lengths["rejected"])
            flags = ("boundary_adjusted",) * split.adjusted + ("prompt_truncated",) * truncated
            out.append(Encoded(arrays, dict(pair.scalars), lengths, flags))
        return out
