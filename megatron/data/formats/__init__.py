"""Row formats of ``tools/preprocess_data.py --format`` and the batch kind each one serves.

=========  ==========================================  ===============================  ==========
format     row                                         files (``PREFIX.`` + ...)        batch kind
=========  ==========================================  ===============================  ==========
text       ``text``                                    ``bin``/``idx``                  sequence
sft        ``messages`` | ``prompt`` + ``completion``  ``tokens``, ``loss_mask``        sequence
pairwise   [``prompt``] + ``chosen`` + ``rejected``    ``prompt``, ``chosen``,          pair
           [+ ``margin``/``score_*``]                  ``rejected`` [+ ``margin.npy``]
unpaired   ``prompt`` + ``completion`` + ``label``     ``prompt``, ``completion``,      unpaired
                                                       ``label.npy``
prompt     ``prompt``                                  ``prompt``                       prompt
=========  ==========================================  ===============================  ==========

Each token field is an indexed dataset (``megatron.data.indexed``) at ``PREFIX.<field>.bin`` /
``.idx``; the fields of one dataset are aligned row for row. See each module for its details.
"""

from megatron.data.formats.base import (
    EncodeContext,
    Encoded,
    FieldSpec,
    RowDropped,
    RowFormat,
    ScalarSpec,
)
from megatron.data.formats.pairwise import PairwiseFormat
from megatron.data.formats.prompt import PromptFormat
from megatron.data.formats.sft import SFTFormat
from megatron.data.formats.text import TextFormat
from megatron.data.formats.unpaired import UnpairedFormat

FORMATS: dict[str, RowFormat] = {
    f.name: f
    for f in (TextFormat(), SFTFormat(), PairwiseFormat(), UnpairedFormat(), PromptFormat())
}
"""``--format`` name -> format."""

BATCH_KINDS: dict[str, str] = {name: f.batch_kind for name, f in FORMATS.items()}
"""Format -> the objective batch kind its datasets serve."""


def get_format(name: str) -> RowFormat:
    """The format called ``name`` (``PreprocessOptions.data_format``).

    Raises:
        ValueError: ``name`` is not a format; the message lists the choices.
    """
    if name not in FORMATS:
        raise ValueError(f"data_format must be one of {sorted(FORMATS)}, got {name!r}")
    return FORMATS[name]


__all__ = [
    "BATCH_KINDS",
    "FORMATS",
    "EncodeContext",
    "Encoded",
    "FieldSpec",
    "RowDropped",
    "RowFormat",
    "ScalarSpec",
    "get_format",
]
