"""Rendering rows to text and tokenizing prompt/completion boundaries consistently.

**Rendering** follows TRL 1.16 (``trl/data_utils.py: apply_chat_template``) without its code:
a conversational prompt is rendered with ``add_generation_prompt=True`` (or
``continue_final_message=True`` when it ends with an assistant turn), each completion as part of
the whole conversation ``prompt + completion``, and the prompt string is cut to the longest
character prefix it shares with every whole conversation (TRL does this for templates such as
DeepSeek-R1's that render the generation prompt differently). Plain-string rows are used as they
are and ``eos_token`` is appended to each completion unless it already ends with it (TRL's DPO
``add_eos``). Templates come from the tokenizer (``apply_chat_template``), a Jinja file, or
``none`` (plain strings only).

**Boundaries** follow TRL 1.16's DPO/SFT ``tokenize_fn`` and ``common_prefix_length``: the
prompt is tokenized alone and each whole conversation is tokenized; the stored prompt is the
longest *token* prefix shared by the lone prompt and every whole conversation, and each stored
completion is the rest of its whole conversation. So ``prompt + completion`` is always exactly
the tokenization of the whole rendered text. A row where that prefix is shorter than the lone
prompt (BPE merged across the boundary, or the template renders the prompt differently) is
*boundary adjusted*: counted, or an error with ``--boundary error``.

**Piecewise tokenization** (speed): Hugging Face ``tokenizers`` splits the input at added special
tokens *before* normalisation and pre-tokenization, so ``tok(text)`` is the concatenation of the
tokenizations of the pieces that start at special tokens (``<|im_start|>...``). Pieces are
deduplicated within a batch and cached, so a pair's shared prompt is tokenized once and a chat
turn's boundary costs only its last piece. Only special tokens with ``lstrip``, ``single_word``
and ``normalized`` all false are cut points; the driver verifies the rule against whole-text
tokenization on the first rows of every run and falls back to whole texts if they ever differ.

**Word cache** (speed): a byte-level BPE (GPT-2 / Llama-3 / Qwen2 style: no normaliser, a
pre-tokenizer that is ``ByteLevel`` with its regex, or a regex ``Split`` then ``ByteLevel``
without one) tokenizes every pre-token on its own, so a piece's ids are the concatenation of its
pre-tokens' ids. The pre-tokens are found with the same regex in Python and each distinct one is
tokenized once and memoised: about 3x faster than ``encode_batch`` on English text. It is part
of the piecewise rule, so the same first-rows check covers it (and turns it off when it differs).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron.data.indexed import DatasetError
from megatron.data.sources import RowError
from megatron.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")


# ----------------------------------------------------------------------------- messages


def is_conversation(value: Any) -> bool:
    """True for a non-empty list whose first element is a mapping with a ``role``."""
    return (
        isinstance(value, list)
        and bool(value)
        and isinstance(value[0], dict)
        and "role" in value[0]
    )


def check_messages(value: Any, key: str) -> list[dict[str, str]]:
    """Validate a message list: dicts with ``role`` in :data:`ROLES` and string ``content``.

    Returns:
        Plain ``{"role", "content"}`` dicts (other keys are kept).

    Raises:
        RowError: ``not_a_message_list`` / ``bad_message`` naming the element and key.
    """
    if not isinstance(value, list) or not value:
        kind = type(value).__name__ if not isinstance(value, list) else "an empty list"
        raise RowError(
            "not_a_message_list", f"{key!r} must be a non-empty list of messages, got {kind}"
        )
    out = []
    for i, msg in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(msg, dict):
            raise RowError("bad_message", f"{where} must be an object, got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise RowError(
                "bad_message", f"{where}.role must be one of {list(ROLES)}, got {role!r}"
            )
        if not isinstance(content, str):
            raise RowError(
                "bad_message", f"{where}.content must be a string, got {type(content).__name__}"
            )
        out.append(dict(msg))
    return out


# ----------------------------------------------------------------------------- rendering


class Renderer:
    """Renders conversations with a chat template (or refuses them when there is none).

    Args:
        tokenizer: Supplies ``apply_chat_template`` and its own template.
        chat_template: ``None`` (the tokenizer's template), ``"none"`` (no template: plain-string
            rows only), or the path of a Jinja file.

    Raises:
        DatasetError: If the template file cannot be read.
    """

    _VERIFY_RENDERS = 8

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None) -> None:
        self.hf = tokenizer.hf
        self.eos_text: str = str(self.hf.eos_token)
        self.source, self.template = describe_template(tokenizer, chat_template)
        self._compiled = _compile(self.template)
        self._verify_left = self._VERIFY_RENDERS
        self._special = dict(self.hf.special_tokens_map)

    def _render_direct(self, messages: list[dict[str, str]], generation_prompt: bool) -> str | None:
        """Render with the compiled template, skipping ``apply_chat_template``'s overhead.

        why: ``apply_chat_template`` normalises every message first and costs ~3x the render
        itself, a third of the pairwise pipeline. Only plain ``{role, content}`` messages take
        this path; the first renders are checked against ``apply_chat_template`` and any
        difference turns the path off for good.
        """
        if self._compiled is None or any(len(m) != 2 for m in messages):
            return None
        text = self._compiled.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=generation_prompt,
            **self._special,
        )
        if self._verify_left > 0:
            self._verify_left -= 1
            reference = self.hf.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=generation_prompt,
                chat_template=self.template,
            )
            if reference != text:
                self._compiled = None
                return reference
        return text

    def _need_template(self) -> None:
        if self.template is None:
            hint = (
                "--chat-template none was given"
                if self.source == "none"
                else f"tokenizer {self.hf.name_or_path!r} has no chat template"
            )
            raise DatasetError(
                f"conversational rows need a chat template but {hint}; pass --chat-template "
                "FILE.jinja or use a tokenizer that has one"
            )

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        """Render ``messages``; with ``generation_prompt`` as a prompt awaiting a reply.

        A prompt ending with an assistant message is continued (``continue_final_message``), one
        ending with a user/tool message gets the generation prompt.

        Raises:
            DatasetError: If there is no template.
            RowError: ``template_error`` if the template rejects the conversation.
        """
        self._need_template()
        last = messages[-1]["role"]
        continue_final = generation_prompt and last == "assistant"
        try:
            if not continue_final:
                text = self._render_direct(messages, generation_prompt)
                if text is not None:
                    return text
            return self.hf.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=generation_prompt and not continue_final,
                continue_final_message=continue_final,
                chat_template=self.template,
            )
        except Exception as exc:  # noqa: BLE001 - jinja and transformers raise many types
            raise RowError("template_error", f"chat template failed: {exc}") from None

    def prompt_and_fulls(
        self, prompt: Any, completions: Sequence[Any]
    ) -> tuple[str, list[str], bool]:
        """Texts of a prompt and of each whole ``prompt + completion`` (see module docstring).

        Args:
            prompt: A string, or a message list (then every completion is a message list).
            completions: Completions of the prompt (may be empty: prompt-only rows).

        Returns:
            ``(prompt_text, full_texts, cut)``; every full text starts with ``prompt_text``, and
            ``cut`` says the rendered prompt had to be shortened to be a prefix of them.
        """
        if isinstance(prompt, str):
            eos = self.eos_text
            return (
                prompt,
                [prompt + c + ("" if c.endswith(eos) else eos) for c in completions],
                False,
            )
        prompt_text = self.render(prompt, generation_prompt=True)
        fulls = [self.render(prompt + c) for c in completions]
        keep = min((common_prefix_length(prompt_text, f) for f in fulls), default=len(prompt_text))
        return prompt_text[:keep], fulls, keep < len(prompt_text)

    def trained_spans(
        self, messages: list[dict[str, str]], loss_on: str
    ) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation and the character spans of its trained assistant turns.

        Turn ``k``'s span starts where ``render(messages[:k], generation_prompt)`` stops sharing a
        prefix with the whole text and ends at the end of ``render(messages[:k+1])`` (e.g.
        ``"Hi!<|im_end|>\\n"`` in ChatML: the end-of-turn token is trained, as in TRL).

        Args:
            messages: A validated conversation.
            loss_on: ``assistant`` (every assistant turn), ``last-turn`` (the last one) or ``all``.

        Returns:
            ``(text, spans)``; ``spans`` are ``[start, end)`` character ranges, in order.

        Raises:
            RowError: ``no_assistant_turn`` if nothing would be trained.
        """
        text = self.render(messages)
        if loss_on == "all":
            return text, [(0, len(text))]
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        if loss_on == "last-turn":
            turns = turns[-1:]
        if not turns:
            raise RowError("no_assistant_turn", "'messages' has no assistant turn to train on")
        spans = []
        for k in turns:
            start = 0
            if k > 0:
                start = common_prefix_length(
                    self.render(messages[:k], generation_prompt=True), text
                )
            end = common_prefix_length(self.render(messages[: k + 1]), text)
            if end > start:
                spans.append((start, end))
        if not spans:
            raise RowError("empty", "every assistant turn renders to nothing")
        return text, spans


def describe_template(tokenizer: Tokenizer, chat_template: str | None) -> tuple[str, str | None]:
    """``(source, template text)``: source is ``tokenizer``, ``none`` or the file path.

    Raises:
        DatasetError: If the template file cannot be read.
    """
    if chat_template == "none":
        return "none", None
    if chat_template is None:
        own = getattr(tokenizer.hf, "chat_template", None)
        return "tokenizer", own if isinstance(own, str) else None
    path = Path(chat_template)
    try:
        return str(path), path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"--chat-template {chat_template}: cannot read it ({exc})") from None


def _compile(template: str | None) -> Any:
    """transformers' compiled Jinja template (its sandbox and helpers), or None."""
    if template is None:
        return None
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without the helper: always use apply_chat_template
        return None
    return _compile_jinja_template(template)


def template_sha256(template: str | None) -> str | None:
    """sha256 of a template's text (None without a template)."""
    return None if template is None else hashlib.sha256(template.encode("utf-8")).hexdigest()


def common_prefix_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common prefix of two sequences (strings or token lists)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


# ----------------------------------------------------------------------------- tokenizing


@dataclass(frozen=True, slots=True)
class Tokenized:
    """A text as its special-token pieces and each piece's token ids."""

    pieces: list[str]
    ids: list[list[int]]

    def flat(self) -> list[int]:
        """All token ids."""
        if len(self.ids) == 1:
            return list(self.ids[0])
        return [t for part in self.ids for t in part]

    def __len__(self) -> int:
        return sum(map(len, self.ids))


def prompt_prefix_length(prompt: Tokenized, full: Tokenized) -> int:
    """Tokens shared by the lone prompt and the whole text (TRL's ``common_prefix_length``)."""
    n, i = 0, 0
    while i < min(len(prompt.pieces), len(full.pieces)) and prompt.pieces[i] == full.pieces[i]:
        n += len(prompt.ids[i])
        i += 1
    rest_p = [t for part in prompt.ids[i:] for t in part]
    rest_f = [t for part in full.ids[i:] for t in part]
    return n + common_prefix_length(rest_p, rest_f)


def _cut_regex(backend: Any) -> re.Pattern[str] | None:
    if backend is None or getattr(backend, "encode_special_tokens", False):
        return None
    tokens = [
        t.content
        for t in backend.get_added_tokens_decoder().values()
        if t.special and not (t.lstrip or t.single_word or t.normalized) and t.content
    ]
    if not tokens:
        return None
    # Longest first: Python's alternation is leftmost-first, HF matches leftmost-longest.
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


GPT2_PRETOKENIZE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""The regex of ``tokenizers``' ``ByteLevel(use_regex=True)`` pre-tokenizer (GPT-2's)."""


WORD_MAX_MISS_RATE = 0.15
"""Above this share of new words per batch the memo is slower than whole pieces (measured: the
break-even is near 0.3 on the 2-core machine); such batches are tokenized whole."""
WORD_PROBE = 64


def _word_regex(backend: Any) -> Any:
    """The pre-tokenization regex of a byte-level BPE whose pieces may go word by word, or None.

    Accepted: no normaliser, a BPE model, every added token a cut point (special, no
    ``lstrip``/``rstrip``/``single_word``/``normalized``), and a pre-tokenizer that is
    ``ByteLevel(use_regex=True, add_prefix_space=False)`` or ``Sequence[Split(Regex, Isolated),
    ByteLevel(use_regex=False, add_prefix_space=False)]``.
    """
    try:
        import regex  # the ``regex`` module: \p{L} classes and possessive quantifiers
    except ImportError:
        return None
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    if spec.get("normalizer") is not None or (spec.get("model") or {}).get("type") != "BPE":
        return None
    if any(
        not t.special or t.lstrip or t.rstrip or t.single_word or t.normalized
        for t in backend.get_added_tokens_decoder().values()
    ):
        return None
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    byte_level = steps[-1] if steps else {}
    if byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space"):
        return None
    if len(steps) == 1 and byte_level.get("use_regex", True):
        pattern = GPT2_PRETOKENIZE
    elif len(steps) == 2 and not byte_level.get("use_regex", True):
        split = steps[0]
        if (
            split.get("type") != "Split"
            or split.get("behavior") != "Isolated"
            or split.get("invert")
            or "Regex" not in (split.get("pattern") or {})
        ):
            return None
        pattern = split["pattern"]["Regex"]
    else:
        return None
    try:
        return regex.compile(pattern)
    except regex.error:
        return None


class PieceEncoder:
    """Batched, cached tokenization of texts as special-token pieces (see module docstring).

    Args:
        tokenizer: A tokenizer; piecewise splitting needs a fast (``tokenizers``) backend.
        split_special: Cut texts at special tokens (False: every text is one piece, and no word
            cache).
        cache_size: Pieces kept between batches (the cache is cleared when full).
        word_cache_size: Distinct pre-tokens memoised (the memo is cleared when full).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        split_special: bool = True,
        cache_size: int = 1 << 16,
        word_cache_size: int = 1 << 18,
    ):
        hf = tokenizer.hf
        self._backend = getattr(hf, "_tokenizer", None) if getattr(hf, "is_fast", False) else None
        self._hf = hf
        self._cut = _cut_regex(self._backend) if split_special else None
        self._cache: dict[str, list[int]] = {}
        self._cache_size = cache_size
        self._fast = hasattr(self._backend, "encode_batch_fast")
        if self._backend is not None and self._backend.truncation is not None:
            self._backend.no_truncation()
        if self._backend is not None and self._backend.padding is not None:
            self._backend.no_padding()
        self._words = _word_regex(self._backend) if self._cut is not None else None
        self._word_ids: dict[str, list[int]] = {}
        self._word_cache_size = word_cache_size
        self._miss_rate = 0.0  # new distinct words / words, in the last batch through the memo
        self._batches = 0

    @property
    def word_cache(self) -> bool:
        """Whether pieces are tokenized pre-token by pre-token through the memo."""
        return self._words is not None

    def _encode_by_words(self, texts: list[str]) -> list[list[int]]:
        """Pieces (each optionally starting with a special token) through the pre-token memo."""
        heads: list[list[int]] = []
        words: list[list[str]] = []
        for text in texts:
            special = self._cut.match(text)
            if special is None:
                heads.append([])
            else:
                heads.append([self._backend.token_to_id(special.group())])
                text = text[special.end() :]
            words.append(self._words.findall(text))
        memo = self._word_ids
        if len(memo) > self._word_cache_size:
            memo.clear()
        missing = list(dict.fromkeys(w for ws in words for w in ws if w not in memo))
        self._miss_rate = len(missing) / max(1, sum(map(len, words)))
        if missing:
            memo.update(zip(missing, self._encode_batch(missing), strict=True))
        out = []
        for head, ws in zip(heads, words, strict=True):
            for w in ws:
                head += memo[w]
            out.append(head)
        return out

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._fast:
            return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    @property
    def piecewise(self) -> bool:
        """Whether texts are cut at special tokens."""
        return self._cut is not None

    def _pieces(self, text: str) -> list[str]:
        if self._cut is None:
            return [text]
        cuts = [m.start() for m in self._cut.finditer(text) if m.start() > 0]
        if not cuts:
            return [text]
        bounds = [0, *cuts, len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]

    def _encode_raw(self, texts: list[str]) -> list[list[int]]:
        if self._backend is None:
            return [list(x) for x in self._hf(texts, add_special_tokens=False)["input_ids"]]
        if self._words is not None:
            self._batches += 1
            # why: each new word costs one tiny encode (~3x a word inside a long text), so text
            # with few repeated words (code, identifiers, rare scripts) goes whole; every
            # WORD_PROBE-th batch tries the memo again in case the text changed.
            if self._miss_rate <= WORD_MAX_MISS_RATE or self._batches % WORD_PROBE == 0:
                return self._encode_by_words(texts)
        return self._encode_batch(texts)

    def encode(self, texts: Iterable[str]) -> list[Tokenized]:
        """Tokenize texts (special tokens in the text are parsed, none are added)."""
        split = [self._pieces(t) for t in texts]
        cache = self._cache
        missing = list(dict.fromkeys(p for pieces in split for p in pieces if p not in cache))
        if missing and len(cache) + len(missing) > self._cache_size:
            cache.clear()  # then every piece of this batch is missing
            missing = list(dict.fromkeys(p for pieces in split for p in pieces))
        if missing:
            cache.update(zip(missing, self._encode_raw(missing), strict=True))
        return [Tokenized(pieces, [cache[p] for p in pieces]) for pieces in split]

    def encode_whole(self, texts: list[str]) -> list[list[int]]:
        """Reference: each text tokenized in one call (no pieces, no cache)."""
        if not texts:
            return []
        if self._backend is None:
            return self._encode_raw(list(texts))
        return self._encode_batch(list(texts))


def disable_rust_threads_for_fork() -> None:
    """Keep ``tokenizers`` single-threaded in a process about to fork tokenizer workers.

    why: a Rust thread pool used before ``fork`` makes ``tokenizers`` disable itself in the
    children with a warning; the worker pool is the parallelism then.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
