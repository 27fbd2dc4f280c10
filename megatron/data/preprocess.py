"""Tokenize raw corpora into indexed datasets (the library behind ``tools/preprocess_data.py``).

Pipeline: sources (:mod:`megatron.data.sources`) → rows (``RawRow``: a location ``file:line``
plus undecoded payload) → chunks of ``chunk_size`` rows → workers parse, validate and tokenize
each chunk (:class:`ChunkEncoder`, with the row format from :mod:`megatron.data.formats`) → the
main process writes every field in input order (:class:`DatasetWriter`). Output bytes depend
only on the inputs, the tokenizer and the options, never on the number of workers.

Bad rows (invalid UTF-8 or JSON, missing keys, wrong types, empty or identical completions,
non-boolean labels, ...) are reported as ``file:line: message``. ``on_error="fail"`` collects up
to ``max_errors`` of them, writes nothing and raises :class:`PreprocessError`; ``"skip"`` drops
them. Rows left out by the length policy are *dropped*, never a failure. Every bad or dropped row
is listed in ``PREFIX.errors.jsonl`` (written when there are any bad or dropped rows; a run
that writes the dataset without any removes a stale one). A ``.json`` array that does not parse
as a whole is a file-level :class:`DatasetError`, and so are an input file without rows and a
run that would write no rows (unless ``allow_empty``), and an output prefix that cannot be
written (checked before tokenizing).

Files are committed in this order: the old ``PREFIX.meta.json`` is removed, every field's
``.bin``/``.idx`` and scalar ``.npy`` is renamed into place, then the new ``meta.json`` is written
last — so a dataset with a ``meta.json`` is complete.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from megatron.data.formats import (
    FORMATS,
    EncodeContext,
    Encoded,
    RowDropped,
    RowFormat,
    get_format,
)
from megatron.data.formats.chat import disable_rust_threads_for_fork
from megatron.data.indexed import DatasetError
from megatron.data.options import PreprocessOptions
from megatron.data.sources import (
    RawRow,
    RowError,
    check_inputs,
    decode_record,
    file_sha256,
    iter_rows,
)
from megatron.data.writer import (
    ChunkResult,
    DatasetWriter,
    ErrorEntry,
    PreprocessSummary,
    finish_dataset,
)
from megatron.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "ChunkEncoder",
    "ChunkResult",
    "PreprocessError",
    "PreprocessOptions",
    "PreprocessSummary",
    "RowError",
    "check_inputs",
    "check_output_prefix",
    "file_sha256",
    "iter_rows",
    "preprocess",
]


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


# ----------------------------------------------------------------------------- encoding


class ChunkEncoder:
    """Parses, validates and tokenizes chunks of rows (runs in the workers).

    Args:
        tokenizer: Tokenizer to encode with.
        options: Format and key options.
    """

    def __init__(self, tokenizer: Tokenizer, options: PreprocessOptions) -> None:
        self.fmt: RowFormat = get_format(options.data_format)
        self.options = options
        self.ctx = EncodeContext(tokenizer, options)

    def _items(self, chunk: list[RawRow]) -> tuple[list[Any], list[str], list[tuple]]:
        items, where, errors = [], [], []
        for row in chunk:
            try:
                record = decode_record(row, self.options.text_key)
                for item in self.fmt.extract(record, self.options):
                    items.append(item)
                    where.append(row.location)
            except RowError as exc:
                errors.append((row.location, exc.reason, exc.message, False))
        return items, where, errors

    def __call__(self, chunk: list[RawRow]) -> ChunkResult:
        items, where, errors = self._items(chunk)
        encoded = self.fmt.encode(items, self.ctx) if items else []
        good: list[Encoded] = []
        locations: list[str] = []
        for location, enc in zip(where, encoded, strict=True):
            if isinstance(enc, RowError):
                errors.append((location, enc.reason, enc.message, isinstance(enc, RowDropped)))
            else:
                good.append(enc)
                locations.append(location)
        order = {loc: i for i, loc in enumerate(dict.fromkeys(r.location for r in chunk))}
        errors.sort(key=lambda e: order[e[0]])
        return self._collect(good, locations, errors, len(chunk))

    def _collect(
        self, good: list[Encoded], locations: list[str], errors: list[tuple], rows: int
    ) -> ChunkResult:
        result = ChunkResult({}, {}, {}, {}, {}, Counter(), errors, rows, len(good))
        for f in self.fmt.fields:
            parts = [e.arrays[f.name] for e in good]
            dtype = np.int64 if f.tokens else np.uint8
            result.arrays[f.name] = np.concatenate(parts) if parts else np.empty(0, dtype)
            result.lengths[f.name] = np.fromiter((p.size for p in parts), np.int64, len(parts))
        for spec in self.fmt.scalars:
            values = [e.scalars.get(spec.name, np.nan) for e in good]
            result.scalars[spec.name] = np.asarray(values, dtype=np.float64)
            have = [loc for loc, e in zip(locations, good, strict=True) if spec.name in e.scalars]
            lack = [
                loc for loc, e in zip(locations, good, strict=True) if spec.name not in e.scalars
            ]
            result.scalar_seen[spec.name] = (next(iter(have), None), next(iter(lack), None))
        for key in dict.fromkeys(k for e in good for k in e.lengths):
            result.stats[key] = np.asarray([e.lengths.get(key, 0) for e in good], dtype=np.int64)
        for e in good:
            result.flags.update(e.flags)
        return result


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


def _same_results(a: ChunkResult, b: ChunkResult) -> bool:
    return a.errors == b.errors and all(
        np.array_equal(a.arrays[k], b.arrays[k]) and np.array_equal(a.lengths[k], b.lengths[k])
        for k in a.arrays
    )


def choose_tokenization(
    first: list[RawRow], tokenizer: Tokenizer, options: PreprocessOptions
) -> PreprocessOptions:
    """Keep piecewise tokenization only if it matches whole-text tokenization on ``first``.

    why: the piece rule relies on how ``tokenizers`` treats added tokens; one disagreement on
    the run's own rows turns it off for the whole run (slower, never wrong).
    """
    if not options.split_special_tokens or options.data_format == "text" or not first:
        return options
    fast = ChunkEncoder(tokenizer, options)
    if not fast.ctx.pieces.piecewise:
        return replace(options, split_special_tokens=False)
    whole = replace(options, split_special_tokens=False)
    if _same_results(fast(first), ChunkEncoder(tokenizer, whole)(first)):
        return options
    logger.warning(
        "tokenizer %s: tokenizing at special-token pieces differs from whole-text tokenization "
        "on the first rows; tokenizing whole texts (slower)",
        tokenizer.name,
    )
    return whole


# ----------------------------------------------------------------------------- driver


def _run_pipeline(
    inputs: Sequence[Path],
    writer: DatasetWriter,
    tokenizer: Tokenizer,
    options: PreprocessOptions,
    summary: PreprocessSummary,
) -> tuple[PreprocessOptions, list[tuple[str, str, str, bool]]]:
    """Stream all inputs through the encoders into ``writer``; returns (options used, bad rows)."""
    from tqdm.auto import tqdm

    chunks_in = _chunked(_counted_rows(inputs, options, summary), options.chunk_size)
    first = next(chunks_in, [])
    if options.workers > 1:
        disable_rust_threads_for_fork()
    options = choose_tokenization(first, tokenizer, options)
    errors: list[tuple[str, str, str, bool]] = []
    chunks = encode_chunks(_prepend(first, chunks_in), tokenizer, options)
    bar = tqdm(unit=" rows", file=sys.stderr, disable=not options.show_progress, dynamic_ncols=True)
    with contextlib.closing(chunks), bar:  # closing the generator stops the worker pool
        for result in chunks:
            summary.rows_read += result.rows
            bar.update(result.rows)
            errors.extend(result.errors)
            failing = options.on_error == "fail" and any(not e[3] for e in errors)
            if failing:
                if sum(not e[3] for e in errors) >= options.max_errors:
                    break
                continue  # keep reading only to report more bad rows
            writer.add(result)
    return options, errors


_ALLOW_EMPTY = "or pass --allow-empty to accept it"


def _counted_rows(
    inputs: Sequence[Path], options: PreprocessOptions, summary: PreprocessSummary
) -> Iterator[RawRow]:
    """The rows of every input in order, counted in ``summary.rows_per_input``.

    Raises:
        DatasetError: An input has no rows (unless ``options.allow_empty``), as soon as it is read.
    """
    for path in inputs:
        summary.rows_per_input[str(path)] = 0
        for row in iter_rows(path, options.txt_mode):
            summary.rows_per_input[str(path)] += 1
            yield row
        if not summary.rows_per_input[str(path)] and not options.allow_empty:
            raise DatasetError(
                f"{path}: input has no rows (an empty file?); nothing was written. Check the "
                f"--input path {_ALLOW_EMPTY}"
            )


def _check_rows_written(
    inputs: Sequence[Path], writer: DatasetWriter, errors: list[ErrorEntry], summary: Any
) -> None:
    """No row written at all (every row skipped or dropped) is an error."""
    if writer.rows:
        return
    reasons = Counter(e[1] for e in errors)
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
    first = f"; first: {errors[0][0]}: {errors[0][2]}" if errors else ""
    raise DatasetError(
        f"no rows written: all {summary.rows_read} rows read from "
        f"{', '.join(map(str, inputs))} were skipped or dropped ({counts}{first}); nothing was "
        f"written. Fix the input or the length options, {_ALLOW_EMPTY} (a 0-row dataset)"
    )


def check_output_prefix(prefix: str | Path) -> None:
    """Create the prefix's directory and check that files can be written there.

    Raises:
        DatasetError: Naming the prefix, the cause and what to do.
    """
    what = f"--output-prefix {str(prefix)!r}"
    if str(prefix).endswith(("/", os.sep)):  # the files would be hidden: DIR/.bin, DIR/.idx
        raise DatasetError(
            f"{what} ends in a directory separator; give a path prefix inside the directory, "
            f"e.g. {Path(prefix) / 'train'}"
        )
    parent = Path(prefix).parent
    existing = next((a for a in (parent, *parent.parents) if a.exists()), None)
    if existing is not None and not existing.is_dir():
        raise DatasetError(
            f"{what}: {existing} is a file, not a directory; choose another --output-prefix"
        )
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise DatasetError(
            f"{what}: cannot write in {parent} ({exc.strerror or exc}); choose a writable "
            "location or fix the directory's permissions"
        ) from None


def _prepend(first: list[RawRow], rest: Iterator[list[RawRow]]) -> Iterator[list[RawRow]]:
    if first:
        yield first
    yield from rest


def preprocess(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    tokenizer_dir: str | Path,
    options: PreprocessOptions | None = None,
) -> PreprocessSummary:
    """Tokenize ``inputs`` into the format's files and write ``PREFIX.meta.json``.

    Args:
        inputs: Source files/directories, read in this order.
        output_prefix: Output path without suffix; parent directories are created.
        tokenizer_dir: Local Hugging Face tokenizer directory.
        options: Reading, format and error options (defaults: text, fail on bad rows).

    Returns:
        Counts by reason, token totals, length percentiles and timing.

    Raises:
        PreprocessError: ``on_error="fail"`` and bad rows were found; nothing is written and an
            existing dataset at the prefix is left intact.
        DatasetError: Missing/unsupported inputs, an unwritable ``output_prefix``, a malformed
            ``.json`` array, conversational rows without a chat template, an optional scalar
            given in some rows only, or (unless ``allow_empty``) an input without rows or no row
            written; nothing is written then.
    """
    options = options or PreprocessOptions()
    fmt = get_format(options.data_format)
    start = time.perf_counter()
    paths = [Path(p) for p in inputs]
    check_inputs(paths)
    check_output_prefix(output_prefix)
    tokenizer = load_tokenizer(tokenizer_dir)
    prefix = str(output_prefix)
    summary = PreprocessSummary(output_prefix=prefix, data_format=options.data_format)

    pipeline_start = time.perf_counter()
    with DatasetWriter(prefix, fmt, tokenizer.vocab_size) as writer:
        used, errors = _run_pipeline(paths, writer, tokenizer, options, summary)
        bad = [e for e in errors if not e[3]]
        if bad and options.on_error == "fail":
            shown = [f"{loc}: {msg}" for loc, _, msg, _ in bad[: options.max_errors]]
            raise PreprocessError(shown, limit_hit=len(bad) >= options.max_errors)
        if not options.allow_empty:
            _check_rows_written(paths, writer, errors, summary)
        writer.check_scalars()
    summary.pipeline_s = time.perf_counter() - pipeline_start
    finish_dataset(writer, tokenizer, used, paths, errors, summary)
    summary.elapsed_s = time.perf_counter() - start
    return summary
