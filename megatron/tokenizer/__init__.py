"""Tokenizer wrapper (Hugging Face, local directories only) and a tiny BPE builder for tests."""

from megatron.tokenizer.build import SPECIAL_TOKENS, build_byte_level_bpe
from megatron.tokenizer.tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "Tokenizer",
    "TokenizerError",
    "build_byte_level_bpe",
    "load_tokenizer",
]
