"""``--format unpaired``: KTO's unpaired preference rows, ``{"prompt", "completion", "label"}``.

``label`` is a JSON boolean (True = desirable), as in TRL's unpaired preference format; 0/1 or
strings are errors. With ``--from-pairwise`` the input is read as pairwise rows (see
:mod:`megatron.data.formats.pairwise`) and each pair becomes two examples, chosen (True) then
rejected (False), as TRL's ``unpair_preference_dataset`` does.

Stored as ``PREFIX.prompt``, ``PREFIX.completion`` (aligned ``.bin``/``.idx``) and
``PREFIX.label.npy`` (bool).
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
    ScalarSpec,
    check_text,
    fit_prompt,
    require,
)
from megatron.data.formats.boundaries import split_prompt_completions
from megatron.data.formats.chat import check_messages
from megatron.data.formats.pairwise import read_pair
from megatron.data.formats.prompt import read_prompt
from megatron.data.sources import RowError

Example = tuple[Any, Any, bool]


def read_example(record: Mapping[str, Any]) -> Example:
    """Validate ``{"prompt", "completion", "label"}``.

    Raises:
        RowError: ``missing_key``, ``not_a_string``, ``bad_message``, ``mixed_types``, ``empty``
            or ``bad_label``.
    """
    prompt = read_prompt(record)
    completion = require(record, "completion")
    label = require(record, "label")
    if not isinstance(label, bool | np.bool_):
        raise RowError(
            "bad_label", f"'label' must be true or false, got {type(label).__name__} {label!r}"
        )
    if isinstance(prompt, list):
        if not isinstance(completion, list):
            raise RowError("mixed_types", "'prompt' is a message list but 'completion' is not")
        completion = check_messages(completion, "completion")
    else:
        if isinstance(completion, list):
            raise RowError("mixed_types", "'completion' is a message list but 'prompt' is not")
        check_text(completion, "completion")
    return prompt, completion, bool(label)


class UnpairedFormat(RowFormat):
    """Prompt, completion and a desirability label per row."""

    name = "unpaired"
    batch_kind = "unpaired"
    fields = (FieldSpec("prompt"), FieldSpec("completion"))
    scalars = (ScalarSpec("label", dtype="bool", required=True),)

    def extract(self, record: Mapping[str, Any], options: Any) -> list[Example]:
        if options.from_pairwise:
            pair = read_pair(record)
            return [(pair.prompt, pair.chosen, True), (pair.prompt, pair.rejected, False)]
        return [read_example(record)]

    def encode(self, items: list[Example], ctx: EncodeContext) -> list[Encoded | RowError]:
        splits = split_prompt_completions([(p, [c]) for p, c, _ in items], ctx)
        out: list[Encoded | RowError] = []
        for (_, _, label), split in zip(items, splits, strict=True):
            if isinstance(split, RowError):
                out.append(split)
                continue
            completion = split.completions[0]
            try:
                prompt, truncated = fit_prompt(split.prompt, [len(completion)], ctx.options)
            except RowError as exc:
                out.append(exc)
                continue
            arrays = {
                "prompt": np.asarray(prompt, dtype=np.int64),
                "completion": np.asarray(completion, dtype=np.int64),
            }
            lengths = {k: int(v.size) for k, v in arrays.items()}
            lengths["sequence"] = lengths["prompt"] + lengths["completion"]
            flags = ("boundary_adjusted",) * split.adjusted + ("prompt_truncated",) * truncated
            out.append(Encoded(arrays, {"label": label}, lengths, flags))
        return out
