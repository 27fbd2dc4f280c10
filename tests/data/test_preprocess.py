"""Preprocessing inputs and outputs: empty inputs, the errors report on re-runs, bad prefixes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.data.indexed import DatasetError, IndexedDataset
from megatron.data.meta import read_meta
from megatron.data.preprocess import PreprocessOptions, preprocess

REPO = Path(__file__).resolve().parents[2]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_empty_input_file_is_an_error_naming_it(tmp_path, tiny_tokenizer_dir):
    good = _jsonl(tmp_path / "good.jsonl", [{"text": "hello there"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    for inputs, named in (([empty], empty), ([good, blank], blank)):
        with pytest.raises(
            DatasetError, match=rf"^{named}: input has no rows .*--allow-empty to accept it$"
        ):
            preprocess(inputs, tmp_path / "o", tiny_tokenizer_dir)
        assert not list(tmp_path.glob("o.*"))  # nothing written

    summary = preprocess(
        [empty], tmp_path / "o", tiny_tokenizer_dir, PreprocessOptions(allow_empty=True)
    )
    assert summary.rows_written == 0 and len(IndexedDataset(tmp_path / "o")) == 0
    assert read_meta(tmp_path / "o")["num_documents"] == 0


def test_no_row_written_is_an_error_unless_allowed(tmp_path, tiny_tokenizer_dir):
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": 5}, {"other": "x"}])
    skip = PreprocessOptions(on_error="skip")
    with pytest.raises(
        DatasetError,
        match=r"no rows written: all 2 rows read from .*bad\.jsonl were skipped or dropped "
        r"\(missing_key: 1, not_a_string: 1; first: .*bad\.jsonl:1: .*--allow-empty",
    ):
        preprocess([bad], tmp_path / "o", tiny_tokenizer_dir, skip)
    opts = PreprocessOptions(on_error="skip", allow_empty=True)
    assert preprocess([bad], tmp_path / "o", tiny_tokenizer_dir, opts).rows_written == 0


def test_errors_report_is_rewritten_or_removed_on_every_run(tmp_path, tiny_tokenizer_dir):
    src = _jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, {"text": 5}, {"text": "also fine"}])
    report = Path(f"{tmp_path / 'o'}.errors.jsonl")
    skip = PreprocessOptions(on_error="skip")
    preprocess([src], tmp_path / "o", tiny_tokenizer_dir, skip)
    assert [json.loads(x)["location"] for x in report.read_text().splitlines()] == [f"{src}:2"]

    _jsonl(src, [{"text": 6}, {"text": "fine"}])  # another bad row: the report is rewritten
    preprocess([src], tmp_path / "o", tiny_tokenizer_dir, skip)
    assert [json.loads(x)["location"] for x in report.read_text().splitlines()] == [f"{src}:1"]

    _jsonl(src, [{"text": "fine"}])  # fixed input, default fail mode: no stale report
    summary = preprocess([src], tmp_path / "o", tiny_tokenizer_dir)
    assert not report.exists() and summary.errors_path is None


def test_meta_records_the_largest_token_id_per_field(tmp_path, tiny_tokenizer_dir):
    src = _jsonl(tmp_path / "in.jsonl", [{"text": "some words"}, {"text": "more words here"}])
    preprocess([src], tmp_path / "o", tiny_tokenizer_dir)
    ds = IndexedDataset(tmp_path / "o")
    assert read_meta(tmp_path / "o")["max_token_id"] == {"": int(ds.tokens.max())}


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)


def test_unwritable_output_prefix_is_one_line_naming_it(tmp_path, tiny_tokenizer_dir):
    src = _jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    (tmp_path / "afile").write_text("x")
    tok = str(tiny_tokenizer_dir)
    res = _cli(
        "--input", str(src), "--output-prefix", f"{tmp_path}/afile/sub/o", "--tokenizer", tok
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == (
        f"error: --output-prefix '{tmp_path}/afile/sub/o': {tmp_path}/afile is a file, not a "
        "directory; choose another --output-prefix"
    )
    with pytest.raises(
        DatasetError, match=r"ends in a directory separator; give a path prefix inside"
    ):
        preprocess([src], f"{tmp_path}/", tiny_tokenizer_dir)
    with pytest.raises(DatasetError, match=r"cannot write in /proc/\S+ \(.*\); choose a writable"):
        preprocess([src], "/proc/no_such_dir/o", tiny_tokenizer_dir)

    res = _cli("--input", str(tmp_path / "none.jsonl"), "--input", str(src), "--allow-empty",
               "--output-prefix", str(tmp_path / "o"), "--tokenizer", tok)  # fmt: skip
    assert res.returncode == 1 and res.stderr.strip().endswith("none.jsonl: input not found")


def test_permission_denied_names_the_directory(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """(Tests run as root here, which chmod cannot stop: the denial is simulated.)"""
    pre = sys.modules["megatron.data.preprocess"]  # the package re-exports a function of this name

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pre.tempfile, "TemporaryFile", denied)
    src = _jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    with pytest.raises(
        DatasetError,
        match=rf"^--output-prefix '{tmp_path}/out/o': cannot write in {tmp_path}/out "
        r"\(Permission denied\); choose a writable location or fix the directory's permissions$",
    ):
        preprocess([src], tmp_path / "out" / "o", tiny_tokenizer_dir)
