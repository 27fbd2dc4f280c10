"""``megatron.tokenizer``: the byte-level BPE builder and the thin Hugging Face wrapper."""

from __future__ import annotations

import json

import pytest

from megatron.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    TokenizerError,
    build_byte_level_bpe,
    load_tokenizer,
)
from tests.conftest import make_english_corpus


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir) -> Tokenizer:
    return load_tokenizer(tiny_tokenizer_dir)


def test_special_tokens_come_first_in_id_order(tokenizer):
    ids = [tokenizer.hf.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == [0, 1, 2, 3]
    assert (tokenizer.eos_id, tokenizer.pad_id) == (0, 1)
    assert 260 <= tokenizer.vocab_size <= 512


@pytest.mark.parametrize(
    "text", ["The river reads a blue sky.", "  two  spaces", "émoji 🙂 and 中文", "<|im_start|>x"]
)
def test_any_utf8_text_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch([text, text]) == [ids, ids]


def test_encode_adds_no_special_tokens_and_batches_agree(tokenizer):
    texts = make_english_corpus(20, seed=3)
    batch = tokenizer.encode_batch(texts)
    assert batch == [tokenizer.encode(t) for t in texts]
    assert all(0 not in ids for ids in batch)  # no EOS unless the data layer appends it
    assert tokenizer.encode_batch([]) == []


def test_build_is_deterministic_and_portable(tmp_path, tiny_tokenizer_dir):
    again = build_byte_level_bpe(make_english_corpus(2000, seed=7), 512, tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (tiny_tokenizer_dir / name).read_bytes(), name
    config = json.loads((again / "tokenizer_config.json").read_text())
    # keys that transformers 4.x and 5.x both read the same way
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["additional_special_tokens"] == list(SPECIAL_TOKENS[2:])


def test_vocab_hash_is_stable_and_tracks_the_vocabulary(tmp_path, tokenizer, tiny_tokenizer_dir):
    same = load_tokenizer(tiny_tokenizer_dir)
    assert same.vocab_hash() == tokenizer.vocab_hash() and len(tokenizer.vocab_hash()) == 64
    other = load_tokenizer(build_byte_level_bpe(["a different corpus"] * 50, 300, tmp_path / "o"))
    assert other.vocab_hash() != tokenizer.vocab_hash()


def test_errors(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(ValueError, match=r"vocab_size \(100\) must be at least 260"):
        build_byte_level_bpe(["x"], 100, tmp_path / "small")
    with pytest.raises(TokenizerError, match="tokenizer directory not found: .*build_byte_level"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="cannot load tokenizer from"):
        load_tokenizer(tmp_path / "empty")
    hf = load_tokenizer(tiny_tokenizer_dir).hf
    hf.eos_token = None
    with pytest.raises(TokenizerError, match="has no eos_token; set eos_token"):
        Tokenizer(hf, "no-eos")
