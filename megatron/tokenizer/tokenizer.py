"""Thin wrapper over a Hugging Face tokenizer loaded from a local directory."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """The tokenizer directory is missing, unreadable or lacks a required token."""


class Tokenizer:
    """The few tokenizer operations the data pipeline and trainer need.

    Args:
        hf_tokenizer: A loaded ``transformers`` tokenizer (fast or slow).
        name: Human-readable name recorded in dataset metadata (the directory it came from).

    Raises:
        TokenizerError: If the tokenizer has no EOS token (documents are separated by EOS).
    """

    def __init__(self, hf_tokenizer: Any, name: str) -> None:
        self.hf = hf_tokenizer
        self.name = name
        if hf_tokenizer.eos_token_id is None:
            raise TokenizerError(
                f"tokenizer {name!r} has no eos_token; set eos_token in its "
                "tokenizer_config.json (documents are separated by EOS)"
            )
        self._vocab_hash: str | None = None

    @property
    def vocab_size(self) -> int:
        """Number of token ids including added/special tokens (``len(tokenizer)``)."""
        return len(self.hf)

    @property
    def eos_id(self) -> int:
        """Id of the end-of-sequence token, appended after every document."""
        return int(self.hf.eos_token_id)

    @property
    def pad_id(self) -> int:
        """Id used for padding: the pad token if the tokenizer has one, else EOS."""
        pad = self.hf.pad_token_id
        return int(pad) if pad is not None else self.eos_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens (BOS/EOS) are added only if asked."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = False
    ) -> list[list[int]]:
        """Token ids of each text, same as ``[encode(t) for t in texts]`` but batched."""
        if not texts:
            return []
        out = self.hf(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        return [list(ids) for ids in out]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (any int sequence, e.g. a numpy array)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def vocab_hash(self) -> str:
        """Stable sha256 hex digest of the vocabulary and the special tokens.

        Covers every ``(token, id)`` pair of ``get_vocab()`` (added tokens included), sorted, plus
        the named special tokens and ``all_special_tokens``. Two tokenizers with the same hash map
        the same ids to the same strings; the hash does not cover merges or normalisation.
        """
        if self._vocab_hash is None:
            vocab = sorted((str(tok), int(idx)) for tok, idx in self.hf.get_vocab().items())
            named = {k: str(v) for k, v in sorted(self.hf.special_tokens_map.items())}
            payload = {
                "vocab": vocab,
                "special_tokens": named,
                "all_special_tokens": sorted(str(t) for t in self.hf.all_special_tokens),
            }
            blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
            self._vocab_hash = hashlib.sha256(blob.encode("utf-8")).hexdigest()
        return self._vocab_hash

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def load_tokenizer(name_or_dir: str | Path) -> Tokenizer:
    """Load a tokenizer saved with ``save_pretrained`` from a local directory (never downloads).

    Args:
        name_or_dir: Path of a directory holding ``tokenizer.json`` / ``tokenizer_config.json``.

    Returns:
        The wrapped tokenizer; ``name`` is ``name_or_dir`` as given.

    Raises:
        TokenizerError: If the directory does not exist or ``transformers`` cannot load it.
    """
    path = Path(name_or_dir)
    if not path.is_dir():
        raise TokenizerError(
            f"tokenizer directory not found: {str(name_or_dir)!r}; only local directories are "
            "supported (download it first, e.g. `huggingface-cli download NAME --local-dir DIR`, "
            "or build a test one with megatron.tokenizer.build.build_byte_level_bpe)"
        )
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types; report them uniformly
        raise TokenizerError(f"cannot load tokenizer from {str(path)!r}: {exc}") from exc
    return Tokenizer(hf, name=str(name_or_dir))
