"""What every ``--format`` shares: the output schema, encoded rows, length policies, validation.

A format is a :class:`RowFormat`: it declares the token *fields* it writes (one indexed dataset
each, ``PREFIX.<field>.{bin,idx}``, rows aligned) and its per-row *scalars* (``PREFIX.<name>.npy``),
validates one record into zero or more items (:meth:`RowFormat.extract`) and tokenizes a batch of
items (:meth:`RowFormat.encode`), returning an :class:`Encoded` row or a :class:`RowError` per item.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from megatron.data.formats.chat import PieceEncoder, Renderer
from megatron.data.options import PreprocessOptions
from megatron.data.sources import RowError

if TYPE_CHECKING:
    from megatron.tokenizer import Tokenizer


class RowDropped(RowError):
    """A valid row left out by policy (too long): counted, listed, never a failure."""


@dataclass(frozen=True)
class FieldSpec:
    """One aligned per-row array of the output.

    Attributes:
        name: File suffix: the field is stored at ``PREFIX.<name>.{bin,idx}`` (``""``: the prefix
            itself, the ``text`` format's layout).
        mask: A 0/1 ``uint8`` per token (e.g. ``loss_mask``) rather than token ids.
        json: The row's data as UTF-8 JSON bytes (``uint8``) rather than token ids (the
            ``prompt`` format's original prompt and extra columns).
    """

    name: str
    mask: bool = False
    json: bool = False

    @property
    def tokens(self) -> bool:
        """Whether the field holds token ids (else ``uint8`` mask values or bytes)."""
        return not (self.mask or self.json)


@dataclass(frozen=True)
class ScalarSpec:
    """One per-row number stored in ``PREFIX.<name>.npy``.

    Attributes:
        name: Record key and file suffix.
        dtype: ``"float32"`` or ``"bool"``.
        required: Present in every row; optional scalars must be given in all rows or in none.
    """

    name: str
    dtype: str = "float32"
    required: bool = False


@dataclass
class Encoded:
    """One output row.

    Attributes:
        arrays: Field name -> 1-D array (token ids int64, or uint8 masks).
        scalars: Scalar name -> value (only the scalars this row has).
        lengths: Named lengths for the summary (e.g. ``prompt``, ``chosen``, ``sequence``).
        flags: Events counted in the summary (``boundary_adjusted``, ``prompt_truncated``).
    """

    arrays: dict[str, np.ndarray]
    scalars: dict[str, float | bool] = field(default_factory=dict)
    lengths: dict[str, int] = field(default_factory=dict)
    flags: tuple[str, ...] = ()


class EncodeContext:
    """What a format's ``encode`` may use; one per worker process.

    Args:
        tokenizer: The run's tokenizer.
        options: The run's options.
    """

    def __init__(self, tokenizer: Tokenizer, options: PreprocessOptions) -> None:
        self.tokenizer = tokenizer
        self.options = options
        self.pieces: PieceEncoder = PieceEncoder(
            tokenizer, split_special=options.split_special_tokens
        )
        self._renderer: Renderer | None = None

    @property
    def renderer(self) -> Renderer:
        """The chat renderer (built on first use: it reads the template file)."""
        if self._renderer is None:
            self._renderer = Renderer(self.tokenizer, self.options.chat_template)
        return self._renderer


class RowFormat:
    """Base class of a ``--format`` (see the module docstring)."""

    name: str = ""
    batch_kind: str = ""
    fields: tuple[FieldSpec, ...] = ()
    scalars: tuple[ScalarSpec, ...] = ()

    def extract(self, record: Mapping[str, Any], options: PreprocessOptions) -> list[Any]:
        """Validate one record into the items it yields (usually one).

        Raises:
            RowError: With a short ``reason`` and a message naming the offending key.
        """
        raise NotImplementedError

    def encode(self, items: list[Any], ctx: EncodeContext) -> list[Encoded | RowError]:
        """Tokenize items; one :class:`Encoded` or :class:`RowError` per item, in order."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- validation


def keys_hint(record: Mapping[str, Any]) -> str:
    """``'a', 'b'`` listing up to 10 keys of a record (for missing-key messages)."""
    return ", ".join(repr(k) for k in sorted(map(str, record))[:10]) or "none"


def require(record: Mapping[str, Any], key: str) -> Any:
    """``record[key]``, or :class:`RowError` ``missing_key`` listing the keys present."""
    if key not in record or record[key] is None:
        raise RowError("missing_key", f"missing key {key!r} (keys present: {keys_hint(record)})")
    return record[key]


def check_text(value: Any, key: str, allow_empty: bool = False) -> str:
    """A string field; :class:`RowError` ``not_a_string`` / ``empty`` otherwise."""
    if not isinstance(value, str):
        raise RowError("not_a_string", f"{key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError("empty", f"{key!r} is empty")
    return value


def check_number(value: Any, key: str) -> float:
    """A finite real number (not a bool); :class:`RowError` ``bad_number`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowError("bad_number", f"{key!r} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise RowError("bad_number", f"{key!r} must be finite, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- lengths


def fit_prompt(
    prompt: list[int], completion_lengths: list[int], options: PreprocessOptions
) -> tuple[list[int], bool]:
    """Apply ``options.max_length`` to ``prompt + longest completion``.

    Policies: ``drop`` (raise :class:`RowDropped` ``too_long``), ``error`` (raise
    :class:`RowError` ``too_long``) or ``truncate_prompt`` (drop prompt tokens from the left so
    the longest sequence fits, keeping at least one prompt token; if even that cannot fit the row
    is dropped as ``completion_too_long``).

    Returns:
        ``(prompt, truncated)``.
    """
    limit = options.max_length
    longest = max(completion_lengths, default=0)
    total = len(prompt) + longest
    if limit is None or total <= limit:
        return prompt, False
    message = f"{total} tokens (prompt {len(prompt)} + completion {longest}) > --max-length {limit}"
    if options.length_policy == "error":
        raise RowError("too_long", message)
    if options.length_policy == "drop":
        raise RowDropped("too_long", message)
    keep = limit - longest
    if keep < 1:
        raise RowDropped("completion_too_long", message + "; the completion alone does not fit")
    return prompt[-keep:], True
