"""Preprocessing of the post-training formats: round trips, boundaries, lengths, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron.data.datasets import PromptDataset
from megatron.data.formats.chat import PieceEncoder
from megatron.data.indexed import DatasetError, IndexedDataset
from megatron.data.meta import read_meta
from megatron.data.preprocess import PreprocessError, PreprocessOptions, preprocess
from tests.data.conftest import conversational_pairs, write_jsonl

EOS = "<|endoftext|>"


def _rows(prefix: Path, field: str, tokenizer) -> list[str]:
    ds = IndexedDataset(f"{prefix}.{field}")
    return [tokenizer.decode(ds[i]) for i in range(len(ds))]


def _files(prefix: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(prefix.parent.glob(prefix.name + ".*")):
        if p.suffix != ".json":  # meta.json names the sources
            out[p.name[len(prefix.name) :]] = p.read_bytes()
    return out


def test_pairwise_round_trip_meta_and_margin(pairwise_prefix, tokenizer, tiny_tokenizer_dir):
    rows = conversational_pairs(64)
    prompts = _rows(pairwise_prefix, "prompt", tokenizer)
    chosen = _rows(pairwise_prefix, "chosen", tokenizer)
    assert chosen[3] == rows[3]["chosen"][0]["content"] + "<|im_end|>\n"
    assert prompts[0] == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n"
        f"{rows[0]['prompt'][1]['content']}<|im_end|>\n<|im_start|>assistant\nWhich part?"
        "<|im_end|>\n<|im_start|>user\nAll of it.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert all(p.endswith("<|im_end|>\n<|im_start|>assistant\n") for p in prompts)
    margin = np.load(f"{pairwise_prefix}.margin.npy")
    assert margin.dtype == np.float32 and np.allclose(margin, [r["margin"] for r in rows])
    meta = read_meta(pairwise_prefix)
    assert meta["format"] == "pairwise" and meta["num_documents"] == 64
    assert meta["scalars"] == ["margin"] and meta["chat_template"]["sha256"]
    assert meta["rows"]["boundary_adjusted"] == 0
    assert meta["options"]["tokenization"] == "pieces, word cache"
    assert meta["num_tokens"] == sum(f["num_tokens"] for f in meta["fields"].values())
    assert meta["tokenizer"]["vocab_hash"] == tokenizer.vocab_hash()


def test_stored_tokens_equal_whole_tokenization(pairwise_prefix, tokenizer, chatml):
    """prompt + chosen is exactly the tokenization of the whole rendered conversation."""
    rows = conversational_pairs(64)
    ds = {f: IndexedDataset(f"{pairwise_prefix}.{f}") for f in ("prompt", "chosen", "rejected")}
    template = chatml.read_text()
    for i in (0, 5, 17, 63):
        for key in ("chosen", "rejected"):
            text = tokenizer.hf.apply_chat_template(
                rows[i]["prompt"] + rows[i][key], tokenize=False, chat_template=template
            )
            stored = np.concatenate([ds["prompt"][i], ds[key][i]]).tolist()
            assert stored == tokenizer.encode(text)


def test_input_kinds_give_identical_datasets(tmp_path, tiny_tokenizer_dir, chatml):
    import datasets

    rows = conversational_pairs(12)
    srcs = {"jsonl": write_jsonl(tmp_path / "p.jsonl", rows)}
    (tmp_path / "p.json").write_text(json.dumps(rows, indent=1))
    srcs["json"] = tmp_path / "p.json"
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "disk"))
    srcs |= {"parquet": tmp_path / "p.parquet", "disk": tmp_path / "disk"}
    options = PreprocessOptions(data_format="pairwise", chat_template=str(chatml))
    outputs = {}
    for name, src in srcs.items():
        preprocess([src], tmp_path / name, tiny_tokenizer_dir, options)
        outputs[name] = _files(tmp_path / name)
    assert all(out == outputs["jsonl"] for out in outputs.values())
    assert set(outputs["jsonl"]) >= {".prompt.bin", ".chosen.idx", ".rejected.bin", ".margin.npy"}


def _string_rows(fmt: str, n: int = 8) -> list[dict]:
    """Plain-string rows of a format (CSV holds no lists)."""
    words = ["river", "model", "stone", "light", "cloud", "field", "glass", "paper"]
    rows = []
    for i in range(n):
        prompt = f"Tell me about the {words[i % 8]} number {i}."
        answer = f" The {words[(i + 3) % 8]} is {i * 7} units."
        row = {
            "sft": {"prompt": prompt, "completion": answer},
            "unpaired": {"prompt": prompt, "completion": answer, "label": i % 3 != 0},
            "prompt": {"prompt": prompt, "answer": answer},
        }[fmt]
        rows.append(row)
    return rows


@pytest.mark.parametrize("fmt", ["sft", "unpaired", "prompt"])
def test_every_input_kind_gives_the_same_dataset(fmt, tmp_path, tiny_tokenizer_dir, tokenizer):
    """JSONL, JSON, parquet, CSV and a save_to_disk directory of the same rows preprocess to
    byte-identical files, for each post-training format (pairwise: the test above)."""
    import datasets

    rows = _string_rows(fmt)
    srcs = {"jsonl": write_jsonl(tmp_path / "r.jsonl", rows)}
    (tmp_path / "r.json").write_text(json.dumps(rows, indent=1))
    srcs["json"] = tmp_path / "r.json"
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "r.parquet"))
    ds.to_csv(str(tmp_path / "r.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "disk"))
    srcs |= {
        "parquet": tmp_path / "r.parquet",
        "csv": tmp_path / "r.csv",
        "disk": tmp_path / "disk",
    }
    options = PreprocessOptions(data_format=fmt, chat_template="none")
    outputs = {}
    for name, src in srcs.items():
        preprocess([src], tmp_path / name, tiny_tokenizer_dir, options)
        outputs[name] = _files(tmp_path / name)
        assert read_meta(tmp_path / name)["num_documents"] == len(rows), name
    assert all(out == outputs["jsonl"] for out in outputs.values()), {
        k: sorted(v) for k, v in outputs.items()
    }
    # and the stored tokens decode back to the rows (plain strings: EOS ends each completion)
    prefix = tmp_path / "jsonl"
    if fmt == "sft":
        tokens, mask = IndexedDataset(f"{prefix}.tokens"), IndexedDataset(f"{prefix}.loss_mask")
        for i, row in enumerate(rows):
            t, m = np.asarray(tokens[i]), np.asarray(mask[i]).astype(bool)
            assert tokenizer.decode(t) == row["prompt"] + row["completion"] + EOS
            assert tokenizer.decode(t[m]) == row["completion"] + EOS
    elif fmt == "unpaired":
        assert _rows(prefix, "prompt", tokenizer) == [r["prompt"] for r in rows]
        assert _rows(prefix, "completion", tokenizer) == [r["completion"] + EOS for r in rows]
        labels = np.load(f"{prefix}.label.npy")
        assert labels.tolist() == [r["label"] for r in rows]
    else:
        assert _rows(prefix, "prompt", tokenizer) == [r["prompt"] for r in rows]
        # the record itself (original prompt, extra columns) reaches online RL's rewards
        ds = PromptDataset(prefix, 128)
        assert [ds[i]["row"] for i in range(len(rows))] == rows


def test_standard_and_implicit_prompts_csv(tmp_path, tiny_tokenizer_dir, tokenizer, chatml):
    import datasets

    rows = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"chosen": "The sun is hot.", "rejected": "The sun is cold."},
    ]
    conv = [
        {
            "chosen": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
            ],
            "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go"}],
            "prompt": "Hi",  # a string prompt next to conversations is ignored (TRL)
        }
    ]
    datasets.Dataset.from_list(rows[:1]).to_csv(str(tmp_path / "s.csv"), index=False)
    inputs = [tmp_path / "s.csv", write_jsonl(tmp_path / "i.jsonl", rows[1:] + conv)]
    options = PreprocessOptions(data_format="pairwise", chat_template=str(chatml))
    preprocess(inputs, tmp_path / "o", tiny_tokenizer_dir, options)
    assert _rows(tmp_path / "o", "prompt", tokenizer) == [
        "The sky is",
        "The sun is",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    ]
    assert _rows(tmp_path / "o", "chosen", tokenizer) == [
        " blue." + EOS,
        " hot." + EOS,
        "Hello<|im_end|>\n",
    ]
    assert _rows(tmp_path / "o", "rejected", tokenizer)[1] == " cold." + EOS


def test_sft_messages_loss_mask(tmp_path, tiny_tokenizer_dir, tokenizer, chatml):
    messages = [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "the model reads"},
        {"role": "assistant", "content": "a red bicycle"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "the river"},
    ]
    rows = [{"messages": messages}, {"prompt": "Say it:", "completion": " the morning news"}]
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    trained = {}
    for loss_on in ("assistant", "last-turn", "all"):
        options = PreprocessOptions(data_format="sft", chat_template=str(chatml), loss_on=loss_on)
        preprocess([src], tmp_path / loss_on, tiny_tokenizer_dir, options)
        toks = IndexedDataset(f"{tmp_path / loss_on}.tokens")
        masks = IndexedDataset(f"{tmp_path / loss_on}.loss_mask")
        assert masks.dtype == np.uint8
        trained[loss_on] = [
            tokenizer.decode(np.asarray(toks[i])[np.asarray(masks[i]) == 1]) for i in range(2)
        ]
    end = "<|im_end|>\n"
    assert trained["assistant"] == [f"a red bicycle{end}the river{end}", " the morning news" + EOS]
    assert trained["last-turn"][0] == f"the river{end}"
    whole = tokenizer.decode(IndexedDataset(f"{tmp_path / 'all'}.tokens")[0])
    assert trained["all"][0] == whole and whole.startswith("<|im_start|>system\nBe nice.")


def _merge_template(tmp_path: Path) -> Path:
    """A template whose generation prompt ends with a space that BPE merges into the answer."""
    path = tmp_path / "merge.jinja"
    path.write_text(
        "{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n"
        "{% else %}Answer: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Answer: {% endif %}"
    )
    return path


def test_boundary_merge_is_detected_and_resolved(tmp_path, tiny_tokenizer_dir, tokenizer):
    rows = [
        {
            "prompt": [{"role": "user", "content": "what does the model read"}],
            "chosen": [{"role": "assistant", "content": "the long report"}],
            "rejected": [{"role": "assistant", "content": "the river"}],
        }
    ] * 3
    src = write_jsonl(tmp_path / "m.jsonl", rows)
    template = str(_merge_template(tmp_path))
    options = PreprocessOptions(data_format="pairwise", chat_template=template)
    summary = preprocess([src], tmp_path / "o", tiny_tokenizer_dir, options)
    assert summary.flags == {"boundary_adjusted": 3}
    prompt = IndexedDataset(f"{tmp_path / 'o'}.prompt")[0].tolist()
    chosen = IndexedDataset(f"{tmp_path / 'o'}.chosen")[0].tolist()
    lone = tokenizer.encode("Question: what does the model read\nAnswer: ")
    whole = tokenizer.encode("Question: what does the model read\nAnswer: the long report\n")
    assert prompt + chosen == whole  # never a silently wrong boundary
    assert prompt == lone[:-1] and lone + tokenizer.encode("the long report\n") != whole
    assert tokenizer.decode(chosen).startswith(" the")

    with pytest.raises(PreprocessError) as info:
        preprocess([src], tmp_path / "e", tiny_tokenizer_dir, options.__class__(
            data_format="pairwise", chat_template=template, boundary="error"
        ))  # fmt: skip
    assert info.value.errors[0].startswith(f"{src}:1: the prompt's last tokens ' '")


def test_length_policies(tmp_path, tiny_tokenizer_dir, tokenizer):
    long_prompt = " ".join(["the model reads the long report"] * 6)
    rows = [
        {"prompt": long_prompt, "completion": " again", "label": True},
        {"prompt": "Hi", "completion": " yes", "label": False},
        {"prompt": "Hi", "completion": " the old engine" * 20, "label": True},
    ]
    src = write_jsonl(tmp_path / "u.jsonl", rows)
    base = {"data_format": "unpaired", "max_length": 16}
    s = preprocess([src], tmp_path / "d", tiny_tokenizer_dir, PreprocessOptions(**base))
    assert s.rows_written == 1 and s.dropped == {"too_long": 2} and not s.skipped
    errors = [
        json.loads(x) for x in Path(f"{tmp_path / 'd'}.errors.jsonl").read_text().splitlines()
    ]
    assert [(e["location"], e["dropped"]) for e in errors] == [
        (f"{src}:1", True),
        (f"{src}:3", True),
    ]

    opts = PreprocessOptions(**base, length_policy="truncate_prompt")
    s = preprocess([src], tmp_path / "t", tiny_tokenizer_dir, opts)
    assert s.rows_written == 2 and s.dropped == {"completion_too_long": 1}
    assert s.flags == {"prompt_truncated": 1}
    prompt = IndexedDataset(f"{tmp_path / 't'}.prompt")[0].tolist()
    completion = IndexedDataset(f"{tmp_path / 't'}.completion")[0].tolist()
    assert len(prompt) + len(completion) == 16 and tokenizer.decode(completion) == " again" + EOS
    assert prompt == tokenizer.encode(long_prompt)[-len(prompt) :]
    assert np.load(f"{tmp_path / 't'}.label.npy").tolist() == [True, False]
    assert read_meta(tmp_path / "t")["max_sequence_length"] == 16

    with pytest.raises(PreprocessError, match=r"u\.jsonl:1: \d+ tokens .* > --max-length 16"):
        preprocess([src], tmp_path / "e", tiny_tokenizer_dir, PreprocessOptions(**base, length_policy="error"))  # fmt: skip


BAD_PAIRWISE = [
    (b'{"prompt": "p", "rejected": "r"}', "missing_key", "missing key 'chosen'"),
    (b'{"prompt": "p", "chosen": 3, "rejected": "r"}', "not_a_string", "'chosen' must be a str"),
    (b'{"prompt": "p", "chosen": "  ", "rejected": "r"}', "empty", "'chosen' is empty"),
    (b'{"prompt": "p \xff", "chosen": "a", "rejected": "r"}', "invalid_utf8", "invalid UTF-8"),
    (b'{"prompt": "p", "chosen": "same", "rejected": "same"}', "identical", "are identical"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "x"}', "bad_number", "'margin'"),
    (
        b'{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "bot", "content": '
        b'"a"}], "rejected": [{"role": "assistant", "content": "b"}]}',
        "bad_message",
        "chosen[0].role must be one of",
    ),
    (
        b'{"prompt": "p", "chosen": "a", "rejected": ["b"]}',
        "mixed_types",
        "must both be strings or both lists",
    ),
    (b'{"chosen": "abc", "rejected": "xyz"}', "no_prompt", "share no prefix"),
]
BAD_UNPAIRED = [
    (b'{"prompt": "p", "completion": "c", "label": "yes"}', "bad_label", "got str 'yes'"),
    (b'{"prompt": "p", "completion": "c", "label": 1}', "bad_label", "got int 1"),
    (b'{"prompt": "p", "completion": "", "label": true}', "empty", "'completion' is empty"),
    (b'{"prompt": "p", "label": true}', "missing_key", "missing key 'completion'"),
]


@pytest.mark.parametrize(
    ("fmt", "cases"), [("pairwise", BAD_PAIRWISE), ("unpaired", BAD_UNPAIRED)], ids=["pair", "kto"]
)
def test_bad_rows_name_file_and_line(tmp_path, tiny_tokenizer_dir, fmt, cases):
    good = (
        b'{"prompt": "ok", "chosen": " a", "rejected": " b"}'
        if fmt == "pairwise"
        else b'{"prompt": "ok", "completion": " a", "label": false}'
    )
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\n".join([good, *(c[0] for c in cases), good]) + b"\n")
    with pytest.raises(PreprocessError) as info:
        preprocess([src], tmp_path / "o", tiny_tokenizer_dir, PreprocessOptions(data_format=fmt))
    assert len(info.value.errors) == min(len(cases), 10)
    for line, ((_, _, text), error) in enumerate(zip(cases, info.value.errors, strict=False), 2):
        assert error.startswith(f"{src}:{line}: ") and text in error, error
    assert not list(tmp_path.glob("o.*"))

    summary = preprocess(
        [src],
        tmp_path / "s",
        tiny_tokenizer_dir,
        PreprocessOptions(data_format=fmt, on_error="skip"),
    )
    assert summary.rows_written == 2
    report = [
        json.loads(x) for x in Path(f"{tmp_path / 's'}.errors.jsonl").read_text().splitlines()
    ]
    assert [e["reason"] for e in report] == [c[1] for c in cases]


def test_from_pairwise_prompt_format_and_scalar_consistency(
    tmp_path, tiny_tokenizer_dir, tokenizer
):
    rows = [{"prompt": "Q1", "chosen": " good", "rejected": " bad"}, {"prompt": "Q2", "chosen": " yes", "rejected": " no"}]  # fmt: skip
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    opts = PreprocessOptions(data_format="unpaired", from_pairwise=True)
    assert preprocess([src], tmp_path / "u", tiny_tokenizer_dir, opts).rows_written == 4
    assert np.load(f"{tmp_path / 'u'}.label.npy").tolist() == [True, False, True, False]
    assert _rows(tmp_path / "u", "completion", tokenizer) == [f" {w}{EOS}" for w in ("good", "bad", "yes", "no")]  # fmt: skip

    preprocess([src], tmp_path / "q", tiny_tokenizer_dir, PreprocessOptions(data_format="prompt"))
    assert _rows(tmp_path / "q", "prompt", tokenizer) == ["Q1", "Q2"]

    mixed = write_jsonl(tmp_path / "m.jsonl", [{**rows[0], "margin": 1.0}, rows[1]])
    with pytest.raises(
        DatasetError, match=r"'margin' is given in 1 of 2 rows .*m\.jsonl:1.*m\.jsonl:2"
    ):
        preprocess([mixed], tmp_path / "m", tiny_tokenizer_dir, PreprocessOptions(data_format="pairwise"))  # fmt: skip


def test_conversations_need_a_template(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "c.jsonl", conversational_pairs(2))
    with pytest.raises(DatasetError, match="has no chat template; pass --chat-template"):
        preprocess([src], tmp_path / "o", tiny_tokenizer_dir, PreprocessOptions(data_format="pairwise"))  # fmt: skip


# ---- word cache: pre-token by pre-token tokenization (see megatron/data/formats/chat.py) ------
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _variant(src: Path, dst: Path, edit) -> Path:
    """A copy of a tokenizer directory with ``edit(spec)`` applied to its tokenizer.json."""
    import shutil

    shutil.copytree(src, dst)
    spec = json.loads((dst / "tokenizer.json").read_text())
    edit(spec)
    (dst / "tokenizer.json").write_text(json.dumps(spec))
    return dst


def _split_then_bytes(pattern: str):
    def edit(spec):
        spec["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": False},
            ],
        }  # fmt: skip

    return edit


def _fuzz_texts(n: int, seed: int) -> list[str]:
    """Texts mixing words, digits runs, contractions, whitespace runs, control characters,
    accented, CJK, emoji and unusual Unicode spaces, and special tokens."""
    import random

    rng = random.Random(seed)
    chars = [chr(c) for c in [*range(0x80), *range(0x80, 0x3000, 7)]]
    chars += ["\U0001f600", "\U00020000", "\ufeff", "\u200b", "\u3000", "\u2028", "\x85", "\xa0"]
    pieces = ["the", " quick", "'s", "'LL", "don't", " 123", "45678", "\n\n", "  ", "\t", " \n ",
              "café", "日本語", "\r\n", "...", "<|im_start|>", "<|im_end|>\n", "<|pad|>"]  # fmt: skip
    out = []
    for _ in range(n):
        parts = [
            rng.choice(pieces)
            if rng.random() < 0.5
            else "".join(rng.choice(chars) for _ in range(rng.randrange(1, 6)))
            for _ in range(rng.randrange(1, 30))
        ]
        out.append("".join(parts))
    return out


@pytest.mark.parametrize("style", ["gpt2", "llama3", "qwen2"])
def test_word_cache_equals_whole_text_tokenization(
    style, tmp_path, tiny_tokenizer_dir, monkeypatch
):
    from megatron.data.formats import chat
    from megatron.tokenizer import load_tokenizer

    monkeypatch.setattr(chat, "WORD_MAX_MISS_RATE", 1.0)  # always through the memo

    directory = tiny_tokenizer_dir
    if style != "gpt2":
        pattern = LLAMA3_SPLIT if style == "llama3" else QWEN2_SPLIT
        directory = _variant(tiny_tokenizer_dir, tmp_path / style, _split_then_bytes(pattern))
    enc = PieceEncoder(load_tokenizer(str(directory)), word_cache_size=50)  # cleared often
    assert enc.word_cache
    texts = _fuzz_texts(600, seed=len(style))
    whole = enc.encode_whole(texts)
    for _ in range(2):  # cold, then warm memo
        assert [t.flat() for t in enc.encode(texts)] == whole


def test_word_cache_steps_aside_for_text_with_few_repeated_words(tiny_tokenizer_dir, monkeypatch):
    """A batch of mostly new words is slower through the memo: the next batches go whole, and
    every WORD_PROBE-th batch tries the memo again; the ids are the same either way."""
    import random

    from megatron.data.formats import chat
    from megatron.tokenizer import load_tokenizer

    monkeypatch.setattr(chat, "WORD_PROBE", 3)
    enc = PieceEncoder(load_tokenizer(str(tiny_tokenizer_dir)), cache_size=1)
    through_memo = []
    plain = enc._encode_by_words
    monkeypatch.setattr(enc, "_encode_by_words", lambda t: through_memo.append(1) or plain(t))
    rng = random.Random(0)

    def fresh(n):  # words never seen before
        return [" ".join("".join(rng.choice("xyzqk") for _ in range(9)) for _ in range(20))
                for _ in range(n)]  # fmt: skip

    for _ in range(6):
        texts = fresh(4)
        assert [t.flat() for t in enc.encode(texts)] == enc.encode_whole(texts)
        assert enc._miss_rate > chat.WORD_MAX_MISS_RATE
    assert len(through_memo) == 3  # the first batch, then the probes of batches 3 and 6
    repeated = ["the river and the model"] * 4
    enc.encode(repeated)  # not a probe: goes whole, the estimate stays
    assert len(through_memo) == 3


def test_word_cache_only_for_byte_level_bpe(tmp_path, tiny_tokenizer_dir):
    from megatron.tokenizer import load_tokenizer

    def with_normalizer(spec):
        spec["normalizer"] = {"type": "NFC"}

    def prefix_space(spec):
        spec["pre_tokenizer"]["add_prefix_space"] = True

    def plain_added_token(spec):
        spec["added_tokens"].append(
            {"id": spec["added_tokens"][-1]["id"] + 1, "content": "<x>", "single_word": False,
             "lstrip": False, "rstrip": False, "normalized": False, "special": False}
        )  # fmt: skip

    plain = PieceEncoder(load_tokenizer(str(tiny_tokenizer_dir)))
    assert plain.word_cache
    assert not PieceEncoder(load_tokenizer(str(tiny_tokenizer_dir)), split_special=False).word_cache
    for i, edit in enumerate((with_normalizer, prefix_space, plain_added_token)):
        directory = _variant(tiny_tokenizer_dir, tmp_path / str(i), edit)
        enc = PieceEncoder(load_tokenizer(str(directory)))
        assert not enc.word_cache, edit.__name__
        texts = _fuzz_texts(50, seed=i)
        assert [t.flat() for t in enc.encode(texts)] == enc.encode_whole(texts)


def test_pieces_equal_whole_texts_and_workers_agree(
    tmp_path, tiny_tokenizer_dir, tokenizer, chatml
):
    texts = [
        "<|im_start|>user\nthe model<|im_end|>\n<|im_start|>assistant\n the river",
        "plain text only",
        "<|im_end|><|im_end|>x<|endoftext|> y",
        "  <|im_start|>  spaced  <|pad|>",
    ]
    enc = PieceEncoder(tokenizer, cache_size=6)  # small: the cache is cleared between batches
    whole = enc.encode_whole(texts)
    for _ in range(2):
        assert enc.piecewise and [t.flat() for t in enc.encode(texts)] == whole
        assert [t.flat() for t in enc.encode(texts[1:])] == whole[1:]
        more = [*texts, "fresh <|pad|> text"]  # cached and new pieces, over the cache size
        assert [t.flat() for t in enc.encode(more)] == enc.encode_whole(more)
    assert enc.encode(texts[:1])[0].pieces[1].startswith("<|im_end|>")

    src = write_jsonl(tmp_path / "p.jsonl", conversational_pairs(40, seed=3))
    outs = []
    for pieces, workers in ((True, 1), (False, 1), (True, 2)):
        opts = PreprocessOptions(
            data_format="pairwise", chat_template=str(chatml), split_special_tokens=pieces,
            workers=workers, chunk_size=7,
        )  # fmt: skip
        preprocess([src], tmp_path / f"o{pieces}{workers}", tiny_tokenizer_dir, opts)
        outs.append(_files(tmp_path / f"o{pieces}{workers}"))
    assert outs[0] == outs[1] == outs[2]
