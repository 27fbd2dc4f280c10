"""``PREFIX.meta.json``: what a preprocessed dataset holds and which tokenizer produced it.

Example::

    {"format": "text",
     "tokenizer": {"name": "tok/", "vocab_size": 512, "vocab_hash": "9f2c..."},
     "dtype": "uint16", "num_documents": 1000, "num_tokens": 123456,
     "sources": [{"path": "data/train.jsonl", "sha256": "ab12..."}],
     "created_by": "tools/preprocess_data.py", "version": 1}

The file is written last and atomically, so its presence means the ``.bin``/``.idx`` pair next to it
was completely written by the same run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from megatron.data.indexed import DatasetError, DatasetNotFoundError

META_VERSION = 1
REQUIRED_KEYS = ("format", "tokenizer", "dtype", "num_documents", "num_tokens", "version")
_HINT = "re-run tools/preprocess_data.py"


def meta_path(prefix: str | Path) -> Path:
    """``PREFIX.meta.json``."""
    return Path(str(prefix) + ".meta.json")


def make_meta(
    *,
    data_format: str,
    tokenizer_name: str,
    vocab_size: int,
    vocab_hash: str,
    dtype: str,
    num_documents: int,
    num_tokens: int,
    sources: list[dict[str, str]],
    created_by: str = "tools/preprocess_data.py",
) -> dict[str, Any]:
    """Build a metadata dict in the current schema (see the module docstring)."""
    return {
        "format": data_format,
        "tokenizer": {"name": tokenizer_name, "vocab_size": vocab_size, "vocab_hash": vocab_hash},
        "dtype": dtype,
        "num_documents": num_documents,
        "num_tokens": num_tokens,
        "sources": sources,
        "created_by": created_by,
        "version": META_VERSION,
    }


def write_meta(prefix: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``PREFIX.meta.json`` atomically (temporary file, fsync, rename).

    Returns:
        The path written.
    """
    path = meta_path(prefix)
    text = json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_meta(prefix: str | Path) -> dict[str, Any]:
    """Read and validate ``PREFIX.meta.json``.

    Raises:
        DatasetNotFoundError: If the file is missing.
        DatasetError: If it is not JSON, lacks a required key, or has an unknown version.
    """
    path = meta_path(prefix)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{path}: metadata not found for dataset {str(prefix)!r}; build the dataset with "
            "tools/preprocess_data.py (it writes PREFIX.bin, PREFIX.idx and PREFIX.meta.json)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc}); {_HINT}") from exc
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(meta).__name__}; {_HINT}")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise DatasetError(f"{path}: missing keys {missing}; {_HINT}")
    if meta["version"] != META_VERSION:
        raise DatasetError(
            f"{path}: metadata version {meta['version']!r} is not supported (this code reads "
            f"{META_VERSION}); {_HINT}"
        )
    return meta


def check_meta(
    prefix: str | Path,
    expected_format: str,
    tokenizer_vocab_hash: str | None = None,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """Check that a dataset has the expected format and was built with the run's tokenizer.

    Args:
        prefix: Dataset prefix.
        expected_format: Format the consumer reads (``"text"``, ...).
        tokenizer_vocab_hash: ``Tokenizer.vocab_hash()`` of the run's tokenizer; skipped if None.
        vocab_size: The run's tokenizer vocabulary size; skipped if None.

    Returns:
        The metadata dict.

    Raises:
        DatasetError: On the first mismatch, naming the prefix, the field, both values and the fix.
    """
    meta = read_meta(prefix)
    path = meta_path(prefix)
    if meta["format"] != expected_format:
        raise DatasetError(
            f"{path}: format is {meta['format']!r} but a {expected_format!r} dataset is needed "
            f"here; point the run at a {expected_format!r} dataset or {_HINT} with "
            f"--format {expected_format}"
        )
    tok = meta["tokenizer"] if isinstance(meta["tokenizer"], dict) else {}
    built_with = tok.get("name", "?")
    if vocab_size is not None and tok.get("vocab_size") != vocab_size:
        raise DatasetError(
            f"{path}: tokenizer.vocab_size is {tok.get('vocab_size')!r} but the run's tokenizer "
            f"has {vocab_size}; use the tokenizer the data was built with ({built_with!r}) or "
            f"{_HINT} with --tokenizer pointing at the run's tokenizer"
        )
    if tokenizer_vocab_hash is not None and tok.get("vocab_hash") != tokenizer_vocab_hash:
        raise DatasetError(
            f"{path}: tokenizer.vocab_hash is {tok.get('vocab_hash')!r} but the run's tokenizer "
            f"hashes to {tokenizer_vocab_hash!r}; use the tokenizer the data was built with "
            f"({built_with!r}) or {_HINT} with --tokenizer pointing at the run's tokenizer"
        )
    return meta
