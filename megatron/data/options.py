"""Options of a preprocessing run (the CLI flags of ``tools/preprocess_data.py``).

One frozen :class:`PreprocessOptions` is read by every stage: the sources (``txt_mode``), the row
formats (keys, chat template, length policy), the workers and the writer. It sits below all of
them, so :mod:`megatron.data.formats` and :mod:`megatron.data.writer` use it without importing
:mod:`megatron.data.preprocess`, which drives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class PreprocessOptions:
    """How to read and tokenize the inputs (the CLI flags of ``tools/preprocess_data.py``)."""

    data_format: str = "text"
    """Row format, a key of :data:`megatron.data.formats.FORMATS` (checked where it is looked up:
    :func:`megatron.data.formats.get_format`)."""
    text_key: str = "text"
    """``text`` format: key (column) holding the document text."""
    append_eod: bool = True
    """``text`` format: append the tokenizer's EOS id to every document."""
    txt_mode: str = "line"
    """``.txt`` inputs: ``line`` = one document per non-empty line, ``file`` = whole file."""
    chat_template: str | None = None
    """Conversational rows: None = the tokenizer's template, a Jinja file path, or ``none``."""
    loss_on: Literal["assistant", "last-turn", "all"] = "assistant"
    """``sft`` ``messages`` rows: which tokens are trained."""
    max_length: int | None = None
    """Longest sequence (prompt + longest completion) kept; None = no limit."""
    length_policy: Literal["drop", "truncate_prompt", "error"] = "drop"
    """Rows over ``max_length``: drop them, cut the prompt from the left, or count as errors."""
    boundary: Literal["resolve", "error"] = "resolve"
    """Prompt/completion boundary inconsistent with the whole tokenization: resolve as TRL does
    (keep the shared token prefix as the prompt, counted) or report the row as an error."""
    from_pairwise: bool = False
    """``unpaired`` format: read pairwise rows, two examples (chosen, rejected) per row."""
    split_special_tokens: bool = True
    """Tokenize texts as special-token pieces (verified per run; see formats/chat.py)."""
    on_error: str = "fail"
    """``fail``: write nothing and raise on bad rows; ``skip``: drop them, list them in errors.jsonl."""
    max_errors: int = 10
    """With ``on_error="fail"``: stop after this many bad rows and report them."""
    allow_empty: bool = False
    """Accept an input file without rows, and a run writing no rows (a 0-row dataset); by default
    either is an error naming the file (an empty input is usually a wrong path or a failed
    export)."""
    workers: int = 1
    """Tokenizer processes; 1 tokenizes in this process."""
    chunk_size: int = 512
    """Rows per work item."""
    show_progress: bool = False
    """Show a tqdm progress bar on stderr."""

    def __post_init__(self) -> None:
        choices = {
            "txt_mode": ["line", "file"],
            "on_error": ["fail", "skip"],
            "loss_on": ["assistant", "last-turn", "all"],
            "length_policy": ["drop", "truncate_prompt", "error"],
            "boundary": ["resolve", "error"],
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("workers", "chunk_size", "max_errors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.from_pairwise and self.data_format != "unpaired":
            raise ValueError("from_pairwise applies to the 'unpaired' format only")
