"""The start-up token-id check of a dataset (``check_token_ids``): a ``.bin`` edited after
preprocessing is refused, naming the dataset, the field and the bad id vs ``model.vocab_size``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron.config import DataConfig, DataSource
from megatron.data import meta as meta_mod
from megatron.data.builders import build_data
from megatron.data.indexed import DatasetError, IndexedDataset, IndexedDatasetWriter
from megatron.data.meta import check_dataset_compat, meta_path
from megatron.data.preprocess import preprocess


def _text_dataset(tmp: Path, tokenizer_dir: Path) -> Path:
    src = tmp / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"row {i} of words"}) + "\n" for i in range(4)))
    preprocess([src], tmp / "d", tokenizer_dir)
    return tmp / "d"


def _poke(bin_path: Path, position: int, value: int, newer_than: Path | None) -> None:
    """Overwrite one uint16 token in place, as a later edit would (its mtime after meta.json)."""
    with open(bin_path, "r+b") as f:
        f.seek(2 * position)
        f.write(np.uint16(value).tobytes())
    if newer_than is not None:  # why: file times are coarse (a tick); make "later" certain
        later = newer_than.stat().st_mtime_ns + 10**9
        os.utime(bin_path, ns=(later, later))


def _no_scan(monkeypatch) -> None:
    def refuse(self):
        raise AssertionError(f"{self.prefix} was scanned")

    monkeypatch.setattr(IndexedDataset, "id_range", refuse)


def test_an_untouched_dataset_is_trusted_without_a_scan(tmp_path, tiny_tokenizer_dir, monkeypatch):
    prefix = _text_dataset(tmp_path, tiny_tokenizer_dir)
    _no_scan(monkeypatch)
    assert check_dataset_compat(prefix, "sequence", None, 512)["format"] == "text"


def test_an_edited_bin_is_refused_naming_dataset_field_and_id(tmp_path, tiny_tokenizer_dir):
    prefix = _text_dataset(tmp_path, tiny_tokenizer_dir)
    ds = IndexedDataset(prefix)
    position = int(ds.doc_offsets[1]) + 2  # document 1, token 2
    _poke(Path(f"{prefix}.bin"), position, 600, newer_than=meta_path(prefix))
    cfg = DataConfig(train=[DataSource(path=str(prefix))], seq_length=16)
    with pytest.raises(DatasetError) as info:
        build_data("sequence", cfg, 512)
    assert str(info.value) == (
        f"data.train[0]: {prefix}: token id 600 in {prefix}.bin (field 'text', document 1, "
        "token 2) is outside model.vocab_size 512; the file changed after preprocessing; "
        "re-run tools/preprocess_data.py"
    )
    check_dataset_compat(prefix, "sequence", None, 601)  # fits a larger model vocabulary


def test_a_copy_without_times_is_scanned_and_a_field_is_named(
    pairwise_prefix, tmp_path, monkeypatch
):
    for p in pairwise_prefix.parent.glob(pairwise_prefix.name + ".*"):
        shutil.copy(p, tmp_path / p.name)  # no times kept: .bin files newer than meta.json
    prefix = tmp_path / pairwise_prefix.name
    os.utime(meta_path(prefix), ns=(0, 0))
    check_dataset_compat(prefix, "pair", None, 512)  # scanned: all ids fit
    _poke(Path(f"{prefix}.chosen.bin"), 0, 9999, newer_than=None)
    meta_mod._SCANNED.clear()
    with pytest.raises(
        DatasetError,
        match=r"token id 9999 in \S+pairs\.chosen\.bin \(field 'chosen', document 0, token 0\) "
        r"is outside model\.vocab_size 512",
    ):
        check_dataset_compat(prefix, "pair", None, 512)


def test_legacy_dataset_without_meta_is_scanned(tmp_path):
    with IndexedDatasetWriter(tmp_path / "legacy", np.uint16) as w:
        w.add_document([1, 2, 3])
        w.add_document([4, 130, 5])
    check_dataset_compat(tmp_path / "legacy", "sequence", None, 131)
    with pytest.raises(
        DatasetError,
        match=r"token id 130 in .*legacy\.bin \(field 'text', document 1, token 1\) is outside "
        r"model\.vocab_size 120; set model\.vocab_size above 130 or rebuild it with",
    ):
        check_dataset_compat(tmp_path / "legacy", "sequence", None, 120)


def test_id_range_and_find_id_outside_cross_chunks(tmp_path):
    with IndexedDatasetWriter(tmp_path / "s", np.int32) as w:
        w.add_document([3, 7])
        w.add_document([])
        w.add_document([2, -1, 9])
    ds = IndexedDataset(tmp_path / "s")
    assert ds.id_range(chunk_tokens=2) == (-1, 9)
    assert ds.find_id_outside(10, chunk_tokens=2) == (2, 1, -1)
    assert ds.find_id_outside(5, chunk_tokens=2) == (0, 1, 7)


def test_tokenizer_identity_from_the_launcher(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """A rank takes the tokenizer identity the launcher recorded (no tokenizer load), unless a
    file of the directory changed since: then it loads the tokenizer again."""
    tok = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, tok)
    meta_mod._tokenizer_identity.cache_clear()
    want = meta_mod._tokenizer_identity(str(tok))
    record = meta_mod.tokenizer_identities()
    assert json.loads(record)[str(tok.resolve())]["hash"] == want[0]
    meta_mod._tokenizer_identity.cache_clear()
    loads = []
    real = meta_mod.load_tokenizer
    monkeypatch.setattr(meta_mod, "load_tokenizer", lambda d: loads.append(d) or real(d))
    monkeypatch.setenv(meta_mod.TOKENIZER_IDENTITY_ENV, record)
    assert meta_mod._tokenizer_identity(str(tok)) == want and loads == []
    meta_mod._tokenizer_identity.cache_clear()
    config = tok / "tokenizer_config.json"
    config.write_text(config.read_text() + " ")  # touched: the record no longer applies
    assert meta_mod._tokenizer_identity(str(tok)) == want and loads == [str(tok)]
    meta_mod._tokenizer_identity.cache_clear()
