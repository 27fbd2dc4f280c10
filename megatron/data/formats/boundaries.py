"""Token boundaries between prompts and completions, batched over a chunk of rows.

Both entry points render every item, tokenize all texts of the chunk in one
:meth:`~megatron.data.formats.chat.PieceEncoder.encode` call, then apply TRL's prefix rule (see
:mod:`megatron.data.formats.chat`). Per item they return a result or the :class:`RowError` that
rendering or the boundary check raised, so one bad row never spoils its chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron.data.formats.base import EncodeContext
from megatron.data.formats.chat import Tokenized, prompt_prefix_length
from megatron.data.sources import RowError


@dataclass
class Split:
    """A prompt and its completions as token ids; ``prompt + c`` is the whole tokenization."""

    prompt: list[int]
    completions: list[list[int]]
    adjusted: bool
    """The lone prompt's tokenization was not a prefix of every whole text."""


def _boundary_error(ctx: EncodeContext, lone: Tokenized, keep: int) -> RowError:
    tail = ctx.tokenizer.decode(lone.flat()[keep:])
    return RowError(
        "boundary_mismatch",
        f"the prompt's last tokens {tail!r} are not a prefix of the whole conversation's "
        "tokenization (BPE merge across the boundary, or a template that renders the prompt "
        "differently); use --boundary resolve to keep the shared prefix as the prompt",
    )


def _template_error() -> RowError:
    return RowError(
        "boundary_mismatch",
        "the chat template renders the prompt (with its generation prompt) differently from the "
        "start of the whole conversation; use --boundary resolve to keep the shared prefix",
    )


def split_prompt_completions(
    items: list[tuple[Any, list[Any]]], ctx: EncodeContext
) -> list[Split | RowError]:
    """Tokenize ``(prompt, completions)`` items consistently.

    Args:
        items: ``(prompt, completions)`` pairs: strings, or message lists (see
            :meth:`Renderer.prompt_and_fulls`). ``completions`` may be empty (prompt-only).
        ctx: Encoding context (renderer, piece encoder, options).

    Returns:
        One :class:`Split` or :class:`RowError` (``template_error``, ``boundary_mismatch``,
        ``empty``) per item.
    """
    rendered: list[tuple[str, list[str], bool] | RowError] = []
    texts: list[str] = []
    for prompt, completions in items:
        try:
            prompt_text, fulls, cut = ctx.renderer.prompt_and_fulls(prompt, completions)
        except RowError as exc:
            rendered.append(exc)
            continue
        if cut and ctx.options.boundary == "error":
            rendered.append(_template_error())
            continue
        rendered.append((prompt_text, fulls, cut))
        texts += [prompt_text, *fulls]
    tokens = iter(ctx.pieces.encode(texts))
    out: list[Split | RowError] = []
    for entry in rendered:
        if isinstance(entry, RowError):
            out.append(entry)
            continue
        lone = next(tokens)
        fulls = [next(tokens) for _ in entry[1]]
        keep = min((prompt_prefix_length(lone, f) for f in fulls), default=len(lone))
        adjusted = keep < len(lone) or entry[2]
        if keep < len(lone) and ctx.options.boundary == "error":
            out.append(_boundary_error(ctx, lone, keep))
            continue
        completions = [f.flat()[keep:] for f in fulls]
        if any(not c for c in completions):
            out.append(RowError("empty", "a completion has no tokens after the prompt"))
            continue
        out.append(Split(lone.flat()[:keep], completions, adjusted))
    return out


@dataclass
class Conversation:
    """A whole conversation's tokens and the 0/1 trained mask over them."""

    tokens: list[int]
    mask: np.ndarray
    """uint8 ``[len(tokens)]``: 1 where the token is trained (as a prediction target)."""
    last_start: int
    """Index of the first token of the last trained span."""
    adjusted: bool


def encode_conversations(
    conversations: list[list[dict[str, str]]], ctx: EncodeContext
) -> list[Conversation | RowError]:
    """Tokenize conversations and mark their trained turns (``options.loss_on``).

    Span edges are character positions (:meth:`Renderer.trained_spans`); each edge ``e`` becomes
    the token index ``prompt_prefix_length(tok(text[:e]), tok(text))`` (TRL's rule), and an edge
    where that is shorter than ``tok(text[:e])`` is a boundary adjustment.

    Returns:
        One :class:`Conversation` or :class:`RowError` per conversation.
    """
    rendered: list[tuple[str, list[tuple[int, int]]] | RowError] = []
    texts: list[str] = []
    for messages in conversations:
        try:
            text, spans = ctx.renderer.trained_spans(messages, ctx.options.loss_on)
        except RowError as exc:
            rendered.append(exc)
            continue
        rendered.append((text, spans))
        edges = sorted({e for span in spans for e in span if 0 < e < len(text)})
        texts += [text, *(text[:e] for e in edges)]
    tokens = iter(ctx.pieces.encode(texts))
    out: list[Conversation | RowError] = []
    for entry in rendered:
        if isinstance(entry, RowError):
            out.append(entry)
            continue
        text, spans = entry
        whole = next(tokens)
        edges = sorted({e for span in spans for e in span if 0 < e < len(text)})
        index: dict[int, int] = {0: 0, len(text): len(whole)}
        first_bad: tuple[Tokenized, int] | None = None
        for e in edges:
            lone = next(tokens)
            index[e] = prompt_prefix_length(lone, whole)
            if index[e] < len(lone) and first_bad is None:
                first_bad = (lone, index[e])
        if first_bad is not None and ctx.options.boundary == "error":
            out.append(_boundary_error(ctx, *first_bad))
            continue
        mask = np.zeros(len(whole), dtype=np.uint8)
        for start, end in spans:
            mask[index[start] : index[end]] = 1
        if not mask[1:].any():
            out.append(RowError("empty", "no trained token after the first one"))
            continue
        out.append(Conversation(whole.flat(), mask, index[spans[-1][0]], first_bad is not None))
    return out
