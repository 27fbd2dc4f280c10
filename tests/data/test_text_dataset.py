"""TextDataset: fixed windows over the concatenated token stream."""

from __future__ import annotations

import numpy as np
import pytest

from megatron.data.indexed import DatasetError, IndexedDatasetWriter
from megatron.data.meta import make_meta, write_meta
from megatron.data.text_dataset import TextDataset


def _write(prefix, docs):
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(d)


def test_windows_span_documents(tmp_path):
    docs = [[1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9, 10, 0], [11, 0]]  # 15 tokens, EOS = 0
    _write(tmp_path / "t", docs)
    stream = np.concatenate(docs)
    ds = TextDataset(tmp_path / "t", seq_length=4)
    assert len(ds) == (15 - 1) // 4 == 3
    for i in range(len(ds)):
        sample = ds[i]["tokens"]
        assert sample.dtype == np.int64 and sample.shape == (5,)
        np.testing.assert_array_equal(sample, stream[i * 4 : i * 4 + 5])
    np.testing.assert_array_equal(ds[1]["tokens"], [4, 5, 0, 6, 7])  # docs 1 and 2
    with pytest.raises(IndexError):
        ds[3]
    long = TextDataset(tmp_path / "t", seq_length=8)
    assert len(long) == 1
    np.testing.assert_array_equal(long[0]["tokens"], [1, 2, 3, 0, 4, 5, 0, 6, 7])  # docs 0-2


def test_too_few_tokens(tmp_path):
    _write(tmp_path / "t", [[1, 2, 0]])
    with pytest.raises(DatasetError, match=r"'.*t' has 3 tokens but seq_length 8 needs at least 9"):
        TextDataset(tmp_path / "t", seq_length=8)


def test_wrong_format_in_meta(tmp_path):
    _write(tmp_path / "t", [[1, 2, 3, 4, 0]])
    meta = make_meta(
        data_format="sft",
        tokenizer_name="tok",
        vocab_size=10,
        vocab_hash="x",
        dtype="uint16",
        num_documents=1,
        num_tokens=5,
        sources=[],
    )
    write_meta(tmp_path / "t", meta)
    with pytest.raises(DatasetError, match=r"t\.meta\.json: format is 'sft' but a 'text'"):
        TextDataset(tmp_path / "t", seq_length=2)
