"""Tokenize raw corpora into indexed datasets (the library behind ``tools/preprocess_data.py``).

Pipeline: sources → rows (``RawRow``: a location ``file:line`` plus undecoded payload) → chunks of
``chunk_size`` rows → workers parse, validate and tokenize each chunk (``ChunkEncoder``) → the main
process writes documents in input order. Output bytes depend only on the inputs, the tokenizer and
the options, never on the number of workers.

Sources (by suffix): ``.jsonl`` (one JSON object per line, read by a streaming reader here so
errors name ``file:line``), ``.json`` (a JSON array of objects, or JSON Lines), ``.txt`` (one
document per non-empty line, or the whole file with ``txt_mode="file"``), and through the
``datasets`` library ``.parquet``, ``.csv`` and ``save_to_disk`` directories (rows are named
``file[row i]``, 0-based like ``ds[i]``).

Formats: ``FORMATS`` maps a ``--format`` name to a :class:`RowFormat` (validate one record, then
tokenize a batch). Only ``text`` exists now; formats with several token fields will extend
``RowFormat`` with their field list.

Bad rows (invalid UTF-8, invalid JSON, not an object, missing key, non-string value) are reported
as ``file:line: message``. ``on_error="fail"`` collects up to ``max_errors`` of them, writes nothing
and raises :class:`PreprocessError`; ``"skip"`` drops them and lists every one in
``PREFIX.errors.jsonl``. A ``.json`` array that does not parse as a whole is a file-level
:class:`DatasetError` in either mode (its later rows cannot be located).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron.data.indexed import DatasetError, IndexedDatasetWriter, best_dtype, data_paths
from megatron.data.meta import make_meta, meta_path, write_meta
from megatron.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".jsonl", ".json", ".txt")
HF_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class PreprocessOptions:
    """How to read and tokenize the inputs (the CLI flags of ``tools/preprocess_data.py``)."""

    data_format: str = "text"
    """Row format, a key of ``FORMATS``."""
    text_key: str = "text"
    """Key (column) holding the document text."""
    append_eod: bool = True
    """Append the tokenizer's EOS id to every document."""
    txt_mode: str = "line"
    """``.txt`` inputs: ``line`` = one document per non-empty line, ``file`` = whole file."""
    on_error: str = "fail"
    """``fail``: write nothing and raise on bad rows; ``skip``: drop them, list them in errors.jsonl."""
    max_errors: int = 10
    """With ``on_error="fail"``: stop after this many bad rows and report them."""
    workers: int = 1
    """Tokenizer processes; 1 tokenizes in this process."""
    chunk_size: int = 512
    """Rows per work item."""
    show_progress: bool = False
    """Show a tqdm progress bar on stderr."""

    def __post_init__(self) -> None:
        if self.data_format not in FORMATS:
            raise ValueError(f"format {self.data_format!r} unknown; choose from {sorted(FORMATS)}")
        if self.txt_mode not in ("line", "file"):
            raise ValueError(f"txt_mode must be 'line' or 'file', got {self.txt_mode!r}")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {self.on_error!r}")
        for name in ("workers", "chunk_size", "max_errors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class RowError(Exception):
    """One input row is unusable; ``reason`` is a short key for the summary counts."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class PreprocessError(DatasetError):
    """Bad rows with ``on_error="fail"``; ``errors`` holds the ``file:line: message`` lines."""

    def __init__(self, errors: list[str], limit_hit: bool) -> None:
        self.errors = errors
        more = " (stopped there)" if limit_hit else ""
        head = (
            f"{len(errors)} bad row(s) found{more}; no output was written. Fix the input or "
            "pass --on-error skip to drop bad rows (they are listed in PREFIX.errors.jsonl):"
        )
        super().__init__("\n".join([head, *("  " + e for e in errors)]))


@dataclass(frozen=True)
class RawRow:
    """A row as read: ``kind`` is ``json`` (bytes of one JSON line), ``text`` (bytes of a text
    document) or ``record`` (an already-parsed object)."""

    location: str
    kind: str
    payload: Any


@dataclass(frozen=True)
class RowFormat:
    """How a ``--format`` turns records into documents.

    ``extract(record, options)`` validates one record and returns what ``encode`` needs, raising
    :class:`RowError`; ``encode(items, tokenizer, options)`` tokenizes a batch of them into one
    int64 ``[n_i]`` array per item.
    """

    name: str
    extract: Callable[[Mapping[str, Any], PreprocessOptions], Any]
    encode: Callable[[list[Any], Tokenizer, PreprocessOptions], list[np.ndarray]]


def _extract_text(record: Mapping[str, Any], options: PreprocessOptions) -> str:
    key = options.text_key
    if key not in record:
        keys = ", ".join(repr(k) for k in sorted(map(str, record))[:10]) or "none"
        raise RowError("missing_key", f"missing key {key!r} (keys present: {keys})")
    value = record[key]
    if not isinstance(value, str):
        raise RowError("not_a_string", f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _encode_text(
    texts: list[str], tokenizer: Tokenizer, options: PreprocessOptions
) -> list[np.ndarray]:
    eod = [tokenizer.eos_id] if options.append_eod else []
    return [np.asarray(ids + eod, dtype=np.int64) for ids in tokenizer.encode_batch(texts)]


FORMATS: dict[str, RowFormat] = {
    "text": RowFormat("text", _extract_text, _encode_text),
}


# ----------------------------------------------------------------------------- reading sources


def _decode_utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 4]
        raise RowError("invalid_utf8", f"invalid UTF-8 at byte {exc.start} ({bad!r})") from None


def _strip_eol(raw: bytes) -> bytes:
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(1-based line number, line without EOL)`` for non-blank lines; drops a UTF-8 BOM."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            raw = _strip_eol(raw)
            if raw.strip():
                yield lineno, raw


def _iter_json_array(path: Path) -> Iterator[RawRow]:
    """Elements of a top-level JSON array, each located by the line it starts on."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: invalid UTF-8 at byte {exc.start}; fix the file") from None
    decoder, ws = json.JSONDecoder(), re.compile(r"\s*")

    def fail(pos: int, msg: str) -> DatasetError:
        line = text.count("\n", 0, pos) + 1
        return DatasetError(
            f"{path}:{line}: invalid JSON: {msg}; a .json array must parse as a whole "
            "(use JSON Lines to skip bad rows)"
        )

    pos = ws.match(text, ws.match(text).end() + 1).end()  # just after '['
    line, last = 1, 0
    if text.startswith("]", pos):
        return
    while True:
        line, last = line + text.count("\n", last, pos), pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise fail(exc.pos, f"{exc.msg} (column {exc.colno})") from None
        yield RawRow(f"{path}:{line}", "record", obj)
        pos = ws.match(text, end).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            if text[pos + 1 :].strip():
                raise fail(pos + 1, "extra data after the closing ']'")
            return
        else:
            raise fail(pos, "expected ',' or ']' after an array element")


def _starts_with_bracket(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"[")


def _iter_hf_rows(path: Path) -> Iterator[RawRow]:
    import datasets

    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise DatasetError(
                f"{path}: is a DatasetDict with splits {sorted(ds)}; pass one split's directory "
                f"(e.g. {path / sorted(ds)[0]})"
            )
    else:
        builder = HF_SUFFIXES[path.suffix.lower()]
        ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True)
    for i, row in enumerate(ds):
        yield RawRow(f"{path}[row {i}]", "record", row)


def iter_rows(path: str | Path, options: PreprocessOptions) -> Iterator[RawRow]:
    """Rows of one source, in file order (see the module docstring for the supported kinds).

    Raises:
        DatasetError: If the source is missing or of an unsupported kind.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in HF_SUFFIXES:
        yield from _iter_hf_rows(path)
    elif suffix == ".json" and _starts_with_bracket(path):
        yield from _iter_json_array(path)
    elif suffix in (".jsonl", ".json"):
        for lineno, raw in _iter_lines(path):
            yield RawRow(f"{path}:{lineno}", "json", raw)
    elif suffix == ".txt" and options.txt_mode == "file":
        raw = path.read_bytes()
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        yield RawRow(str(path), "text", raw)
    elif suffix == ".txt":
        for lineno, raw in _iter_lines(path):
            yield RawRow(f"{path}:{lineno}", "text", raw)
    else:
        raise DatasetError(f"{path}: unsupported input kind {suffix!r}; {_SUPPORTED}")


_SUPPORTED = "supported: .jsonl, .json, .txt, .parquet, .csv, or a datasets.save_to_disk directory"


def check_inputs(inputs: Sequence[str | Path]) -> None:
    """Raise one :class:`DatasetError` listing every missing or unsupported input."""
    problems = []
    for p in map(Path, inputs):
        if not p.exists():
            problems.append(f"{p}: input not found")
        elif p.is_file() and p.suffix.lower() not in (*TEXT_SUFFIXES, *HF_SUFFIXES):
            problems.append(f"{p}: unsupported input kind {p.suffix!r}; {_SUPPORTED}")
    if not inputs:
        problems.append("no input given")
    if problems:
        raise DatasetError("\n".join(problems))


# ----------------------------------------------------------------------------- tokenizing


@dataclass
class ChunkResult:
    """Output of one chunk: documents as one flat array, and the bad rows in input order."""

    tokens: np.ndarray
    """int64 ``[sum(lengths)]``, the chunk's documents concatenated."""
    lengths: list[int]
    errors: list[tuple[str, str, str]]
    """``(location, reason, message)`` per bad row."""
    rows: int


class ChunkEncoder:
    """Parses, validates and tokenizes chunks of rows (runs in the workers).

    Args:
        tokenizer: Tokenizer to encode with.
        options: Format and key options.
    """

    def __init__(self, tokenizer: Tokenizer, options: PreprocessOptions) -> None:
        self.tokenizer = tokenizer
        self.options = options
        self.fmt = FORMATS[options.data_format]

    def _record(self, row: RawRow) -> Mapping[str, Any]:
        if row.kind == "text":
            return {self.options.text_key: _decode_utf8(row.payload)}
        if row.kind == "json":
            try:
                record = json.loads(_decode_utf8(row.payload))
            except json.JSONDecodeError as exc:
                msg = f"invalid JSON: {exc.msg} (column {exc.colno})"
                raise RowError("invalid_json", msg) from None
        else:
            record = row.payload
        if not isinstance(record, Mapping):
            raise RowError("not_an_object", f"expected a JSON object, got {type(record).__name__}")
        return record

    def __call__(self, chunk: list[RawRow]) -> ChunkResult:
        items, errors = [], []
        for row in chunk:
            try:
                items.append(self.fmt.extract(self._record(row), self.options))
            except RowError as exc:
                errors.append((row.location, exc.reason, exc.message))
        docs = self.fmt.encode(items, self.tokenizer, self.options)
        tokens = np.concatenate(docs) if docs else np.empty(0, dtype=np.int64)
        return ChunkResult(tokens, [d.size for d in docs], errors, len(chunk))


_WORKER_ENCODER: ChunkEncoder | None = None


def _init_worker(tokenizer_dir: str, options: PreprocessOptions) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _WORKER_ENCODER = ChunkEncoder(load_tokenizer(tokenizer_dir), options)


def _encode_in_worker(chunk: list[RawRow]) -> ChunkResult:
    assert _WORKER_ENCODER is not None, "worker not initialised"
    return _WORKER_ENCODER(chunk)


def _chunked(rows: Iterable[RawRow], size: int) -> Iterator[list[RawRow]]:
    chunk: list[RawRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def encode_chunks(
    chunks: Iterable[list[RawRow]], tokenizer: Tokenizer, options: PreprocessOptions
) -> Iterator[ChunkResult]:
    """Encode chunks, in order, in this process or in ``options.workers`` processes.

    With several workers at most ``2 * workers`` chunks are in flight (an ordered window of
    ``apply_async`` calls; ``Pool.imap`` would read the whole input ahead into memory).
    """
    if options.workers == 1:
        yield from map(ChunkEncoder(tokenizer, options), chunks)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    init_args = (tokenizer.name, options)
    with ctx.Pool(options.workers, initializer=_init_worker, initargs=init_args) as pool:
        pending: deque[Any] = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * options.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- driver


@dataclass
class PreprocessSummary:
    """What a preprocessing run read and wrote."""

    output_prefix: str
    rows_read: int = 0
    rows_written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    num_tokens: int = 0
    doc_length: dict[str, int] = field(default_factory=dict)
    """Document length in tokens: ``p50``, ``p90``, ``p99``, ``max``."""
    elapsed_s: float = 0.0
    """Wall time of the whole run (tokenizer loading and hashing included)."""
    pipeline_s: float = 0.0
    """Wall time of reading, tokenizing and writing (what ``rows_per_s`` divides by)."""
    errors_path: str | None = None

    @property
    def rows_per_s(self) -> float:
        """Rows read per second of pipeline time."""
        return self.rows_read / self.pipeline_s if self.pipeline_s > 0 else 0.0

    def format(self) -> str:
        """Human-readable multi-line report."""
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        lengths = " ".join(f"{k}={v}" for k, v in self.doc_length.items()) or "n/a"
        lines = [
            f"output        {self.output_prefix}.{{bin,idx,meta.json}}",
            f"rows read     {self.rows_read}",
            f"rows written  {self.rows_written}",
            f"rows skipped  {sum(self.skipped.values())} ({skipped})",
            f"tokens        {self.num_tokens}",
            f"doc length    {lengths}",
            f"throughput    {self.rows_per_s:.0f} rows/s ({self.elapsed_s:.1f} s in all)",
        ]
        if self.errors_path:
            lines.append(f"bad rows      listed in {self.errors_path}")
        return "\n".join(lines)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            digest.update(str(p.relative_to(path)).encode("utf-8") + b"\0")
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _write_errors(path: Path, errors: list[tuple[str, str, str]]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for location, reason, message in errors:
                entry = {"location": location, "reason": reason, "message": message}
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _length_stats(lengths: array) -> dict[str, int]:
    if not len(lengths):
        return {}
    arr = np.frombuffer(lengths, dtype=np.int64)
    pct = np.percentile(arr, [50, 90, 99], method="nearest")
    return {"p50": int(pct[0]), "p90": int(pct[1]), "p99": int(pct[2]), "max": int(arr.max())}


def _run_pipeline(
    inputs: Sequence[Path],
    writer: IndexedDatasetWriter,
    tokenizer: Tokenizer,
    options: PreprocessOptions,
    summary: PreprocessSummary,
) -> tuple[list[tuple[str, str, str]], array]:
    """Stream all inputs through the encoders into ``writer``; returns (bad rows, doc lengths)."""
    from tqdm.auto import tqdm

    rows = (row for path in inputs for row in iter_rows(path, options))
    errors: list[tuple[str, str, str]] = []
    lengths = array("q")
    chunks = encode_chunks(_chunked(rows, options.chunk_size), tokenizer, options)
    bar = tqdm(unit=" rows", file=sys.stderr, disable=not options.show_progress, dynamic_ncols=True)
    with contextlib.closing(chunks), bar:  # closing the generator stops the worker pool
        for result in chunks:
            summary.rows_read += result.rows
            bar.update(result.rows)
            errors.extend(result.errors)
            if options.on_error == "fail" and errors:
                if len(errors) >= options.max_errors:
                    break
                continue  # keep reading only to report more bad rows
            writer.add_documents(result.tokens, result.lengths)
            lengths.extend(result.lengths)
    return errors, lengths


def preprocess(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    tokenizer_dir: str | Path,
    options: PreprocessOptions | None = None,
) -> PreprocessSummary:
    """Tokenize ``inputs`` into ``PREFIX.bin``/``.idx`` and write ``PREFIX.meta.json``.

    Args:
        inputs: Source files/directories, read in this order.
        output_prefix: Output path without suffix; parent directories are created.
        tokenizer_dir: Local Hugging Face tokenizer directory.
        options: Reading, format and error options (defaults: text, fail on bad rows).

    Returns:
        Counts, token totals, document-length percentiles and timing.

    Raises:
        PreprocessError: ``on_error="fail"`` and bad rows were found; nothing is written and an
            existing dataset at the prefix is left intact.
        DatasetError: Missing/unsupported inputs or a malformed ``.json`` array.
    """
    options = options or PreprocessOptions()
    start = time.perf_counter()
    paths = [Path(p) for p in inputs]
    check_inputs(paths)
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = best_dtype(tokenizer.vocab_size)
    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    summary = PreprocessSummary(output_prefix=prefix)

    pipeline_start = time.perf_counter()
    with IndexedDatasetWriter(prefix, dtype) as writer:
        errors, lengths = _run_pipeline(paths, writer, tokenizer, options, summary)
        if errors and options.on_error == "fail":
            shown = [f"{loc}: {msg}" for loc, _, msg in errors[: options.max_errors]]
            raise PreprocessError(shown, limit_hit=len(errors) >= options.max_errors)

    summary.pipeline_s = time.perf_counter() - pipeline_start
    summary.rows_written = len(lengths)
    summary.num_tokens = writer.num_tokens
    summary.skipped = dict(Counter(reason for _, reason, _ in errors))
    summary.doc_length = _length_stats(lengths)
    if options.on_error == "skip":
        errors_path = Path(prefix + ".errors.jsonl")
        _write_errors(errors_path, errors)
        summary.errors_path = str(errors_path) if errors else None
    meta = make_meta(
        data_format=options.data_format,
        tokenizer_name=tokenizer.name,
        vocab_size=tokenizer.vocab_size,
        vocab_hash=tokenizer.vocab_hash(),
        dtype=str(dtype),
        num_documents=writer.num_documents,
        num_tokens=writer.num_tokens,
        sources=[{"path": str(p), "sha256": file_sha256(p)} for p in paths],
    )
    write_meta(prefix, meta)
    summary.elapsed_s = time.perf_counter() - start
    logger.info("wrote %s and %s", data_paths(prefix)[0], meta_path(prefix))
    return summary
