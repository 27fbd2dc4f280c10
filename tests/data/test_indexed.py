"""Indexed mmap dataset: round trips, O(1) access, validation errors, atomic writes."""

from __future__ import annotations

import os
import stat
import struct

import numpy as np
import pytest

from megatron.data.indexed import (
    MAGIC,
    DatasetError,
    DatasetNotFoundError,
    IndexedDataset,
    IndexedDatasetWriter,
    best_dtype,
)


def _docs(rng: np.random.Generator, n: int, high: int) -> list[np.ndarray]:
    return [rng.integers(0, high, size=rng.integers(0, 50)) for _ in range(n)]


def _write(prefix, docs, dtype) -> None:
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)


@pytest.mark.parametrize(("dtype", "high"), [(np.uint16, 65536), (np.int32, 200_000)])
def test_round_trip(tmp_path, dtype, high):
    rng = np.random.default_rng(0)
    docs = _docs(rng, 100, high)
    docs[3] = np.array([high - 1, 0])  # the extremes of the vocabulary
    prefix = tmp_path / "ds"
    _write(prefix, docs, dtype)

    ds = IndexedDataset(prefix)
    assert len(ds) == 100 and ds.dtype == np.dtype(dtype)
    assert ds.num_tokens == sum(d.size for d in docs)
    np.testing.assert_array_equal(ds.sizes, [d.size for d in docs])
    assert ds.doc_offsets[0] == 0 and ds.doc_offsets[-1] == ds.num_tokens
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds[-1], docs[-1])
    np.testing.assert_array_equal(ds.get(3, offset=1), [0])
    np.testing.assert_array_equal(ds.get(5, offset=2, length=3), docs[5][2:5])
    with pytest.raises(IndexError):
        ds[100]
    # no leftover temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]


def test_add_documents_bulk_matches_add_document(tmp_path):
    docs = [[1, 2, 3], [], [4], [5, 6]]
    _write(tmp_path / "a", docs, np.uint16)
    with IndexedDatasetWriter(tmp_path / "b", np.uint16) as w:
        w.add_documents(np.array([1, 2, 3, 4, 5, 6]), [3, 0, 1, 2])
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes()


def test_best_dtype():
    assert best_dtype(50_257) == np.uint16
    assert best_dtype(65_536) == np.uint16  # ids 0..65535
    assert best_dtype(65_537) == np.int32
    assert best_dtype(128_256) == np.int32


def test_token_out_of_range_rejected(tmp_path):
    with pytest.raises(ValueError, match="do not fit uint16"):
        with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as w:
            w.add_document([70_000])
    assert list(tmp_path.iterdir()) == []


def test_item_access_is_o1_view(tmp_path):
    """A random item is a zero-copy slice of the mapped bin (no read of the whole file)."""
    prefix = tmp_path / "big"
    rng = np.random.default_rng(1)
    with IndexedDatasetWriter(prefix, np.int32) as w:
        w.add_documents(rng.integers(0, 1000, size=200_000), np.full(20_000, 10))
    ds = IndexedDataset(prefix)
    i = 12_345
    item = ds[i]
    assert np.shares_memory(item, ds.tokens) and item.size == 10
    np.testing.assert_array_equal(item, ds.tokens[i * 10 : i * 10 + 10])


def test_read_only_files(tmp_path):
    prefix = tmp_path / "ro"
    _write(prefix, [[1, 2], [3]], np.uint16)
    for suffix in (".bin", ".idx"):
        os.chmod(f"{prefix}{suffix}", stat.S_IRUSR)
    ds = IndexedDataset(prefix)
    np.testing.assert_array_equal(ds[1], [3])


def test_missing_file(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"nope\.idx.*tools/preprocess_data\.py"):
        IndexedDataset(tmp_path / "nope")
    _write(tmp_path / "ds", [[1]], np.uint16)
    os.remove(tmp_path / "ds.bin")
    with pytest.raises(FileNotFoundError, match=r"ds\.bin"):
        IndexedDataset(tmp_path / "ds")


def test_truncated_idx(tmp_path):
    prefix = tmp_path / "ds"
    _write(prefix, [[1, 2], [3, 4, 5]], np.uint16)
    idx = tmp_path / "ds.idx"
    idx.write_bytes(idx.read_bytes()[:-4])
    with pytest.raises(DatasetError, match=r"ds\.idx: index truncated"):
        IndexedDataset(prefix)
    idx.write_bytes(idx.read_bytes()[:10])
    with pytest.raises(DatasetError, match=r"ds\.idx: truncated index"):
        IndexedDataset(prefix)


def test_truncated_bin(tmp_path):
    prefix = tmp_path / "ds"
    _write(prefix, [[1, 2], [3, 4, 5]], np.uint16)
    binf = tmp_path / "ds.bin"
    binf.write_bytes(binf.read_bytes()[:-2])
    with pytest.raises(DatasetError, match=r"ds\.bin: size 8 bytes does not match .*5 tokens"):
        IndexedDataset(prefix)


def test_foreign_file_and_unknown_version(tmp_path):
    prefix = tmp_path / "ds"
    _write(prefix, [[1, 2]], np.uint16)
    idx = tmp_path / "ds.idx"
    good = idx.read_bytes()
    idx.write_bytes(b"MMIDIDX\x00\x00" + good[9:])  # Megatron-LM's magic
    with pytest.raises(DatasetError, match=r"ds\.idx: not a megatron indexed dataset"):
        IndexedDataset(prefix)
    idx.write_bytes(MAGIC + struct.pack("<Q", 99) + good[16:])
    with pytest.raises(DatasetError, match="unsupported index format version 99"):
        IndexedDataset(prefix)


def test_exception_in_writer_keeps_existing_dataset(tmp_path):
    prefix = tmp_path / "ds"
    _write(prefix, [[7, 8, 9]], np.uint16)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([1, 2, 3, 4])
            raise RuntimeError("boom")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # same files, same bytes, no temporaries left
    np.testing.assert_array_equal(IndexedDataset(prefix)[0], [7, 8, 9])


def test_empty_dataset(tmp_path):
    _write(tmp_path / "e", [], np.uint16)
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_tokens == 0
