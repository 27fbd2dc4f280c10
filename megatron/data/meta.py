"""``PREFIX.meta.json``: what a preprocessed dataset holds and which tokenizer produced it.

Example (``text``)::

    {"format": "text",
     "tokenizer": {"name": "tok/", "vocab_size": 512, "vocab_hash": "9f2c..."},
     "dtype": "uint16", "num_documents": 1000, "num_tokens": 123456,
     "sources": [{"path": "data/train.jsonl", "sha256": "ab12..."}],
     "created_by": "tools/preprocess_data.py", "version": 1}

Post-training formats (``sft``, ``pairwise``, ``unpaired``, ``prompt``) add: ``fields`` (tokens
per field file ``PREFIX.<field>``), ``scalars`` (``PREFIX.<name>.npy`` files), ``chat_template``
(``source`` and ``sha256``), ``special_ids``, ``options`` (max length, policies, tokenization),
``rows`` (read / written / skipped and dropped by reason / boundary-adjusted / truncated),
``lengths`` (percentiles) and ``max_sequence_length``. ``num_documents`` counts rows (pairs for
``pairwise``) and ``num_tokens`` the tokens of all token fields.

``max_token_id`` (every format) maps each token field (``""`` for ``text``) to its largest id.

The file is written last and atomically, so its presence means the files next to it were
completely written by the same run. :func:`check_dataset_compat` is the start-up check of a
dataset against the run (batch kind, tokenizer, vocabulary size, token ids below
``model.vocab_size``: :func:`check_token_ids`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from megatron.data.formats import BATCH_KINDS, FORMATS
from megatron.data.indexed import DatasetError, DatasetNotFoundError, IndexedDataset, data_paths
from megatron.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

META_VERSION = 1
REQUIRED_KEYS = ("format", "tokenizer", "dtype", "num_documents", "num_tokens", "version")
_HINT = "re-run tools/preprocess_data.py"


def meta_path(prefix: str | Path) -> Path:
    """``PREFIX.meta.json``."""
    return Path(str(prefix) + ".meta.json")


def field_prefix(prefix: str | Path, name: str) -> str:
    """Indexed-dataset prefix of a field: ``PREFIX.<name>`` (``PREFIX`` itself for ``""``)."""
    return str(prefix) if not name else f"{prefix}.{name}"


def scalar_path(prefix: str | Path, name: str) -> Path:
    """``PREFIX.<name>.npy``."""
    return Path(f"{prefix}.{name}.npy")


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
    **extra: Any,
) -> dict[str, Any]:
    """Build a metadata dict in the current schema (see the module docstring).

    ``extra`` holds the post-training formats' additional keys.
    """
    return {
        **extra,
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


_SCANNED: dict[tuple[str, int, int], tuple[int, int]] = {}
"""Id ranges scanned in this process, keyed by ``(path, size, mtime_ns)`` of the ``.bin``."""


def _scanned_range(ds: IndexedDataset, bin_path: Path) -> tuple[int, int]:
    st = bin_path.stat()
    key = (str(bin_path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SCANNED:
        start = time.perf_counter()
        _SCANNED[key] = ds.id_range()
        logger.info(
            "%s: scanned %.2f GiB of token ids in %.1f s (no up-to-date max_token_id in meta.json)",
            bin_path,
            st.st_size / 2**30,
            time.perf_counter() - start,
        )
    return _SCANNED[key]


def check_token_ids(prefix: str | Path, meta: dict[str, Any], vocab_size: int) -> None:
    """Refuse a dataset holding a token id outside ``[0, vocab_size)`` in any token field.

    why: such an id only fails later, as an ``IndexError`` deep in some rank's embedding. The
    largest id of each field is recorded in ``meta.json`` (``max_token_id``) at preprocessing
    time and trusted while the field's ``.bin`` is not newer than ``meta.json``: meta.json is
    written last, so a ``.bin`` edited after preprocessing is newer. Otherwise (an edited file,
    a copy that did not keep modification times, an older meta.json without ``max_token_id``,
    a legacy dataset without meta.json) the ``.bin`` is scanned once per process: about
    0.07 s/GiB from the page cache, 0.5 s/GiB from a local disk. A stored hash would not avoid
    that scan (sha256 reads every byte too, at about 1.3 s/GiB), so none is kept.

    Args:
        prefix: Dataset prefix.
        meta: Its metadata (``{"format": "text"}`` for a legacy dataset).
        vocab_size: ``model.vocab_size``.

    Raises:
        DatasetError: Naming the file, the field, the first bad id, where it is and the fix.
    """
    path = meta_path(prefix)
    meta_mtime = path.stat().st_mtime_ns if path.is_file() else None
    cached = meta.get("max_token_id")
    cached = cached if isinstance(cached, dict) else {}
    fmt = FORMATS.get(meta["format"])
    for name in [f.name for f in fmt.fields if f.tokens] if fmt else []:
        ds = IndexedDataset(field_prefix(prefix, name))
        bin_path = data_paths(ds.prefix)[0]
        fresh = meta_mtime is not None and bin_path.stat().st_mtime_ns <= meta_mtime
        if fresh and isinstance(cached.get(name), int):
            lo, hi = 0, cached[name]
        else:
            lo, hi = _scanned_range(ds, bin_path)
        if lo >= 0 and hi < vocab_size:
            continue
        found = ds.find_id_outside(vocab_size)
        if found is None:
            continue  # a stale max_token_id; the ids themselves fit
        doc, offset, bad = found
        if meta_mtime is None:
            fix = f"set model.vocab_size above {bad} or rebuild it with tools/preprocess_data.py"
        else:
            fix = f"the file changed after preprocessing; {_HINT}"
        raise DatasetError(
            f"{prefix}: token id {bad} in {bin_path} (field {name or 'text'!r}, document {doc}, "
            f"token {offset}) is outside model.vocab_size {vocab_size}; {fix}"
        )


TOKENIZER_IDENTITY_ENV = "MEGATRON_TOKENIZER_IDENTITY"
"""Environment variable through which a launcher (``deepy.py``) hands the ranks the tokenizer
identities it has just checked: ``{directory: {"hash", "vocab_size", "stamp"}}`` as JSON."""
_IDENTITIES: dict[str, dict[str, Any]] = {}


def _stamp(tokenizer_dir: str) -> str:
    """The name, size and modification time of every file of the directory (a changed
    tokenizer file changes it)."""
    entries = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in Path(tokenizer_dir).iterdir()
        if p.is_file()
    )
    return json.dumps(entries)


@functools.lru_cache(maxsize=8)
def _tokenizer_identity(tokenizer_dir: str) -> tuple[str, int]:
    """``(vocab_hash, vocab_size)`` of a tokenizer directory.

    why the launcher's record: loading the tokenizer imports transformers (1-3 s of every rank's
    start-up); the launcher hashed the same files moments before (their names, sizes and
    modification times must still match, else the tokenizer is loaded again).
    """
    key = str(Path(tokenizer_dir).resolve())
    known = json.loads(os.environ.get(TOKENIZER_IDENTITY_ENV) or "{}").get(key)
    stamp = _stamp(tokenizer_dir)
    if known and known.get("stamp") == stamp:
        return str(known["hash"]), int(known["vocab_size"])
    tok = load_tokenizer(tokenizer_dir)
    _IDENTITIES[key] = {"hash": tok.vocab_hash(), "vocab_size": tok.vocab_size, "stamp": stamp}
    return tok.vocab_hash(), tok.vocab_size


def tokenizer_identities() -> str:
    """The tokenizer identities this process computed, as :data:`TOKENIZER_IDENTITY_ENV`'s value."""
    return json.dumps(_IDENTITIES)


def check_dataset_compat(
    prefix: str | Path, kind: str, tokenizer_dir: str | None, vocab_size: int
) -> dict[str, Any]:
    """Check a dataset against the run before training: batch kind, tokenizer, vocabulary.

    Args:
        prefix: Dataset prefix.
        kind: The objective's batch kind (``sequence``, ``pair``, ``unpaired``, ``prompt``).
        tokenizer_dir: The run's tokenizer (``data.tokenizer``); when given, the dataset must have
            been built with the same vocabulary (``vocab_hash``). None skips that check.
        vocab_size: ``model.vocab_size``; every token id of the dataset must be below it
            (:func:`check_token_ids`).

    Returns:
        The metadata. A legacy ``text`` dataset without ``meta.json`` yields
        ``{"format": "text"}`` (only the ``sequence`` kind reads it).

    Raises:
        DatasetError: Naming the prefix, what differs and how to fix it.
    """
    path = meta_path(prefix)
    if not path.is_file() and kind == "sequence" and data_paths(prefix)[0].is_file():
        logger.warning("%s has no meta.json; reading it as a 'text' dataset", prefix)
        check_token_ids(prefix, {"format": "text"}, vocab_size)
        return {"format": "text"}
    meta = read_meta(prefix)
    fmt = meta["format"]
    serves = BATCH_KINDS.get(fmt)
    if serves != kind:
        wanted = sorted(f for f, k in BATCH_KINDS.items() if k == kind)
        hint = " (--from-pairwise turns pairwise rows into unpaired examples)" * (
            kind == "unpaired"
        )
        raise DatasetError(
            f"{prefix}: format {fmt!r} serves the {serves!r} batch kind, but the objective needs "
            f"{kind!r} data; preprocess with --format {' or '.join(wanted) or '?'}{hint}"
        )
    tok = meta["tokenizer"] if isinstance(meta["tokenizer"], dict) else {}
    if int(tok.get("vocab_size", 0)) > vocab_size:
        raise DatasetError(
            f"{prefix}: tokenized with a vocabulary of {tok.get('vocab_size')} tokens, but "
            f"model.vocab_size is {vocab_size}; set model.vocab_size >= {tok.get('vocab_size')} "
            "or re-tokenize the data"
        )
    if tokenizer_dir is not None:
        run_hash, _ = _tokenizer_identity(str(tokenizer_dir))
        if tok.get("vocab_hash") != run_hash:
            raise DatasetError(
                f"{prefix}: built with tokenizer {tok.get('name')!r} (vocab_hash "
                f"{str(tok.get('vocab_hash'))[:12]}...) but data.tokenizer {str(tokenizer_dir)!r} "
                f"hashes to {run_hash[:12]}...; {_HINT} with --tokenizer {tokenizer_dir}"
            )
    check_token_ids(prefix, meta, vocab_size)
    return meta
