"""tools/preprocess_data.py and megatron.data.preprocess with --format text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron.data.indexed import DatasetError, IndexedDataset
from megatron.data.meta import check_meta, read_meta
from megatron.data.preprocess import PreprocessError, PreprocessOptions, file_sha256, preprocess
from megatron.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")
    return path


def _bad_corpus(path: Path) -> Path:
    lines = [
        b'{"text": "A good first row."}',
        b'{"text": "unterminated',  # line 2: invalid JSON
        b'{"body": "no text key here"}',  # line 3: missing key
        b'{"text": 42}',  # line 4: not a string
        b'{"text": "bad \xff\xfe bytes"}',  # line 5: invalid UTF-8
        b"",  # line 6: blank lines are not rows
        b'{"text": "The last good row!"}',  # line 7
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _decoded_docs(prefix, tokenizer) -> list[str]:
    ds = IndexedDataset(prefix)
    return [tokenizer.decode(ds[i]) for i in range(len(ds))]


def test_jsonl_round_trip_and_meta(tmp_path, tiny_tokenizer_dir, tokenizer, english_corpus):
    texts = [*english_corpus[:200], "Unicode: café, naïve, 東京, 🙂.", "  spaces  kept \t"]
    src = _write_jsonl(tmp_path / "in.jsonl", texts)
    prefix = tmp_path / "out" / "text"
    summary = preprocess([src], prefix, tiny_tokenizer_dir, PreprocessOptions(chunk_size=64))

    assert _decoded_docs(prefix, tokenizer) == [t + EOS for t in texts]
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16 and all(ds[i][-1] == tokenizer.eos_id for i in range(len(ds)))
    assert summary.rows_read == summary.rows_written == len(texts) and not summary.skipped
    assert summary.num_tokens == ds.num_tokens and summary.doc_length["max"] == ds.sizes.max()
    assert "rows written  202" in summary.format()

    meta = read_meta(prefix)
    assert meta == {
        "format": "text",
        "tokenizer": {
            "name": str(tiny_tokenizer_dir),
            "vocab_size": 512,
            "vocab_hash": tokenizer.vocab_hash(),
        },
        "dtype": "uint16",
        "num_documents": 202,
        "num_tokens": ds.num_tokens,
        "sources": [{"path": str(src), "sha256": file_sha256(src)}],
        "created_by": "tools/preprocess_data.py",
        "version": 1,
        "max_token_id": {"": int(ds.tokens.max())},
    }
    check_meta(prefix, "text", tokenizer.vocab_hash(), vocab_size=512)
    with pytest.raises(DatasetError, match=r"text\.meta\.json: tokenizer\.vocab_hash is '.*--tok"):
        check_meta(prefix, "text", tokenizer_vocab_hash="0" * 64)
    with pytest.raises(DatasetError, match=r"tokenizer\.vocab_size is 512 .* has 1000"):
        check_meta(prefix, "text", vocab_size=1000)
    with pytest.raises(DatasetError, match=r"format is 'text' but a 'pairwise' dataset"):
        check_meta(prefix, "pairwise")


def test_no_append_eod(tmp_path, tiny_tokenizer_dir, tokenizer):
    src = _write_jsonl(tmp_path / "in.jsonl", ["Hello there.", "Bye."])
    options = PreprocessOptions(append_eod=False)
    preprocess([src], tmp_path / "o", tiny_tokenizer_dir, options)
    assert _decoded_docs(tmp_path / "o", tokenizer) == ["Hello there.", "Bye."]


def test_bad_rows_fail(tmp_path, tiny_tokenizer_dir):
    src = _bad_corpus(tmp_path / "bad.jsonl")
    prefix = tmp_path / "out"
    good = _write_jsonl(tmp_path / "good.jsonl", ["Existing dataset."])
    preprocess([good], prefix, tiny_tokenizer_dir)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("out")}

    with pytest.raises(PreprocessError) as info:
        preprocess([src], prefix, tiny_tokenizer_dir)
    assert info.value.errors == [
        f"{src}:2: invalid JSON: Unterminated string starting at (column 10)",
        f"{src}:3: missing key 'text' (keys present: 'body')",
        f"{src}:4: 'text' must be a string, got int",
        f"{src}:5: invalid UTF-8 at byte 14 (b'\\xff\\xfe b')",
    ]
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("out")}
    assert after == before  # nothing written, the old dataset intact, no temporaries
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fail_stops_after_max_errors(tmp_path, tiny_tokenizer_dir):
    src = tmp_path / "many.jsonl"
    src.write_text("not json\n" * 30)
    options = PreprocessOptions(chunk_size=4)
    with pytest.raises(PreprocessError, match="stopped there") as info:
        preprocess([src], tmp_path / "o", tiny_tokenizer_dir, options)
    assert len(info.value.errors) == 10 and info.value.errors[-1].startswith(f"{src}:10: ")


def test_bad_rows_skip_and_workers_byte_identical(tmp_path, tiny_tokenizer_dir, english_corpus):
    bad = _bad_corpus(tmp_path / "bad.jsonl")
    good = _write_jsonl(tmp_path / "good.jsonl", english_corpus)
    outputs = {}
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        options = PreprocessOptions(on_error="skip", workers=workers, chunk_size=37)
        summary = preprocess([bad, good], prefix, tiny_tokenizer_dir, options)
        suffixes = (".bin", ".idx", ".errors.jsonl", ".meta.json")
        outputs[workers] = [Path(f"{prefix}{s}").read_bytes() for s in suffixes]
    assert outputs[1] == outputs[2]

    assert summary.rows_read == 6 + len(english_corpus)
    assert summary.rows_written == 2 + len(english_corpus)
    assert summary.skipped == {
        "invalid_json": 1,
        "missing_key": 1,
        "not_a_string": 1,
        "invalid_utf8": 1,
    }
    errors = [json.loads(line) for line in Path(f"{prefix}.errors.jsonl").read_text().splitlines()]
    assert [e["location"] for e in errors] == [f"{bad}:{n}" for n in (2, 3, 4, 5)]
    assert [e["reason"] for e in errors] == [
        "invalid_json",
        "missing_key",
        "not_a_string",
        "invalid_utf8",
    ]


def test_txt_json_array_parquet_csv_and_disk(tmp_path, tiny_tokenizer_dir, tokenizer):
    import datasets

    texts = ["First doc.", "Second doc, with more words.", "Third!"]
    (tmp_path / "lines.txt").write_text("First doc.\n\n  \nSecond doc, with more words.\r\n")
    (tmp_path / "whole.txt").write_text("Line one.\nLine two.\n")
    (tmp_path / "arr.json").write_text(
        '[\n  {"text": "Third!"},\n  {"text": 5},\n  {"other": 1}\n]\n'
    )
    ds = datasets.Dataset.from_dict({"text": texts, "n": [1, 2, 3]})
    ds.to_parquet(str(tmp_path / "t.parquet"))
    ds.to_csv(str(tmp_path / "t.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "disk"))
    inputs = [tmp_path / n for n in ("lines.txt", "whole.txt", "arr.json")]
    inputs += [tmp_path / n for n in ("t.parquet", "t.csv", "disk")]

    options = PreprocessOptions(on_error="skip")
    summary = preprocess(inputs[:2], tmp_path / "a", tiny_tokenizer_dir, options)
    assert _decoded_docs(tmp_path / "a", tokenizer) == [
        "First doc." + EOS,
        "Second doc, with more words." + EOS,
        "Line one." + EOS,
        "Line two." + EOS,
    ]
    options = PreprocessOptions(on_error="skip", txt_mode="file")
    summary = preprocess(inputs, tmp_path / "b", tiny_tokenizer_dir, options)
    docs = _decoded_docs(tmp_path / "b", tokenizer)
    assert docs[:3] == [
        "First doc.\n\n  \nSecond doc, with more words.\r\n" + EOS,
        "Line one.\nLine two.\n" + EOS,
        "Third!" + EOS,
    ]
    assert docs[3:] == [t + EOS for t in texts] * 3  # parquet, csv, save_to_disk
    errors = Path(f"{tmp_path}/b.errors.jsonl").read_text().splitlines()
    assert [json.loads(e)["location"] for e in errors] == [f"{inputs[2]}:3", f"{inputs[2]}:4"]
    assert summary.rows_written == 12


def test_malformed_json_array_is_a_file_error(tmp_path, tiny_tokenizer_dir):
    src = tmp_path / "arr.json"
    src.write_text('[\n {"text": "a"},\n {"text": oops}\n]\n')
    with pytest.raises(DatasetError, match=r"arr\.json:3: invalid JSON: Expecting value"):
        preprocess([src], tmp_path / "o", tiny_tokenizer_dir, PreprocessOptions(on_error="skip"))


def test_missing_and_unsupported_inputs(tmp_path, tiny_tokenizer_dir):
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(DatasetError, match=r"(?s)nope\.jsonl: input not found.*x\.xml: unsupp"):
        preprocess(
            [tmp_path / "nope.jsonl", tmp_path / "x.xml"], tmp_path / "o", tiny_tokenizer_dir
        )


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "tools/preprocess_data.py", "--no-progress", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli(tmp_path, tiny_tokenizer_dir, english_corpus):
    bad = _bad_corpus(tmp_path / "bad.jsonl")
    prefix = tmp_path / "cli"
    res = _cli("--input", bad, "--output-prefix", prefix, "--tokenizer", tiny_tokenizer_dir)
    assert res.returncode == 1, res.stderr
    assert f"{bad}:2: invalid JSON" in res.stderr and f"{bad}:5: invalid UTF-8" in res.stderr
    assert not list(tmp_path.glob("cli*"))

    good = _write_jsonl(tmp_path / "good.jsonl", english_corpus[:50])
    res = _cli(
        "--input", good, "--input", bad, "--output-prefix", prefix,
        "--tokenizer", tiny_tokenizer_dir, "--on-error", "skip", "--workers", "2",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "rows written  52" in res.stdout and "invalid_utf8: 1" in res.stdout
    assert read_meta(prefix)["num_documents"] == 52
