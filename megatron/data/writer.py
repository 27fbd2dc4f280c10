"""Writing a preprocessed dataset: aligned fields, scalars, the error report, meta.json, summary.

The layout of a dataset at ``PREFIX`` (see :mod:`megatron.data.formats` for each format's fields):

* ``PREFIX.<field>.bin`` / ``.idx``: one indexed dataset per token field, rows aligned (``text``
  uses ``PREFIX.bin`` / ``.idx``);
* ``PREFIX.<scalar>.npy``: one value per row (``float32`` or ``bool``);
* ``PREFIX.errors.jsonl``: bad and dropped rows, one JSON object each (rewritten by every run
  that writes the dataset, removed when it has none);
* ``PREFIX.meta.json``: written last (:mod:`megatron.data.meta`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from megatron.data.formats import RowFormat
from megatron.data.formats.chat import PieceEncoder, describe_template, template_sha256
from megatron.data.indexed import DatasetError, IndexedDatasetWriter, best_dtype
from megatron.data.meta import field_prefix, make_meta, meta_path, scalar_path, write_meta
from megatron.data.options import PreprocessOptions
from megatron.data.sources import file_sha256

if TYPE_CHECKING:
    from megatron.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

ErrorEntry = tuple[str, str, str, bool]
"""``(location, reason, message, dropped)``."""


@dataclass
class ChunkResult:
    """Output of one chunk, rows in input order (made by the workers of
    :mod:`megatron.data.preprocess`, appended by :meth:`DatasetWriter.add`).

    ``arrays[field]`` is the chunk's rows of that field concatenated (``lengths[field]`` per
    row); ``scalars[name]`` holds one value per written row (NaN where a row lacks an optional
    scalar) and ``scalar_seen[name]`` the first locations with and without it; ``errors`` one
    ``(location, reason, message, dropped)`` per bad or dropped row.
    """

    arrays: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    scalars: dict[str, np.ndarray]
    scalar_seen: dict[str, tuple[str | None, str | None]]
    stats: dict[str, np.ndarray]
    flags: Counter
    errors: list[tuple[str, str, str, bool]]
    rows: int
    written: int


def _atomic_write(path: Path, write: Any, mode: str = "wb") -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DatasetWriter:
    """Writes the fields and scalars of one format; commit with ``close`` (or ``with``).

    Args:
        prefix: Output prefix; its directory must exist.
        fmt: The row format (its fields and scalars).
        vocab_size: Tokenizer vocabulary size (chooses the token dtype).
    """

    def __init__(self, prefix: str, fmt: RowFormat, vocab_size: int) -> None:
        self.prefix = prefix
        self.fmt = fmt
        self.token_dtype = best_dtype(vocab_size)
        self.writers: dict[str, IndexedDatasetWriter] = {}
        try:
            for f in fmt.fields:
                dtype = self.token_dtype if f.tokens else np.uint8
                self.writers[f.name] = IndexedDatasetWriter(field_prefix(prefix, f.name), dtype)
        except BaseException:
            self.abort()
            raise
        self.scalar_values: dict[str, list[np.ndarray]] = {s.name: [] for s in fmt.scalars}
        self.first_with: dict[str, str] = {}
        self.first_without: dict[str, str] = {}
        self.stats: dict[str, array] = {}
        self.flags: Counter = Counter()
        self.rows = 0

    def add(self, result: ChunkResult) -> None:
        """Append a chunk's rows to every field and scalar."""
        for name, writer in self.writers.items():
            writer.add_documents(result.arrays[name], result.lengths[name])
        for name, values in result.scalars.items():
            self.scalar_values[name].append(values)
            have, lack = result.scalar_seen[name]
            if have is not None:
                self.first_with.setdefault(name, have)
            if lack is not None:
                self.first_without.setdefault(name, lack)
        for key, values in result.stats.items():
            self.stats.setdefault(key, array("q")).extend(values.tolist())
        self.flags.update(result.flags)
        self.rows += result.written

    def check_scalars(self) -> None:
        """Raise :class:`DatasetError` if an optional scalar is in some rows but not all."""
        for name in self.scalar_values:
            if name in self.first_with and name in self.first_without:
                have = int((~np.isnan(np.concatenate(self.scalar_values[name]))).sum())
                raise DatasetError(
                    f"{name!r} is given in {have} of {self.rows} rows (e.g. "
                    f"{self.first_with[name]}) but missing in others (e.g. "
                    f"{self.first_without[name]}); give it in every row or in none"
                )

    def present_scalars(self) -> list[str]:
        """Scalars written (present in every row)."""
        return [n for n in self.scalar_values if n in self.first_with]

    def close(self) -> None:
        """Remove the old meta.json, then commit every field and scalar."""
        try:
            meta_path(self.prefix).unlink(missing_ok=True)
            for writer in self.writers.values():
                writer.close()
            specs = {s.name: s for s in self.fmt.scalars}
            for name in self.present_scalars():
                dtype = np.bool_ if specs[name].dtype == "bool" else np.float32
                arr = np.concatenate(self.scalar_values[name]).astype(dtype)
                _atomic_write(scalar_path(self.prefix, name), lambda f, a=arr: np.save(f, a))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard what was written; existing files are untouched."""
        for writer in self.writers.values():
            writer.abort()

    @property
    def num_tokens(self) -> dict[str, int]:
        """Tokens written per field."""
        return {name: w.num_tokens for name, w in self.writers.items()}

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ----------------------------------------------------------------------------- summary


def length_stats(values: array | list[int]) -> dict[str, int]:
    """``p50``, ``p90``, ``p99`` (nearest rank) and ``max`` of integer lengths; ``{}`` if none."""
    if not len(values):
        return {}
    arr = np.asarray(values, dtype=np.int64)
    pct = np.percentile(arr, [50, 90, 99], method="nearest")
    return {"p50": int(pct[0]), "p90": int(pct[1]), "p99": int(pct[2]), "max": int(arr.max())}


@dataclass
class PreprocessSummary:
    """What a preprocessing run read and wrote."""

    output_prefix: str
    data_format: str = "text"
    rows_read: int = 0
    rows_written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Bad rows left out, by reason."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Valid rows left out by the length policy, by reason."""
    flags: dict[str, int] = field(default_factory=dict)
    """``boundary_adjusted`` and ``prompt_truncated`` row counts."""
    num_tokens: int = 0
    field_tokens: dict[str, int] = field(default_factory=dict)
    lengths: dict[str, dict[str, int]] = field(default_factory=dict)
    """Percentiles per named length (``sequence``, ``prompt``, ``chosen``, ...)."""
    elapsed_s: float = 0.0
    """Wall time of the whole run (tokenizer loading and hashing included)."""
    pipeline_s: float = 0.0
    """Wall time of reading, tokenizing and writing (what ``rows_per_s`` divides by)."""
    errors_path: str | None = None
    rows_per_input: dict[str, int] = field(default_factory=dict)
    """Rows read from each input (in reading order)."""
    tokenization: str = "whole"
    """``pieces`` (cut at special tokens) or ``whole`` texts."""

    @property
    def doc_length(self) -> dict[str, int]:
        """Percentiles of the whole sequence length."""
        return self.lengths.get("sequence", {})

    @property
    def rows_per_s(self) -> float:
        """Rows read per second of pipeline time."""
        return self.rows_read / self.pipeline_s if self.pipeline_s > 0 else 0.0

    def format(self) -> str:
        """Human-readable multi-line report."""

        def counts(d: dict[str, int]) -> str:
            return ", ".join(f"{k}: {v}" for k, v in sorted(d.items())) or "none"

        per_field = ", ".join(f"{k or 'text'} {v}" for k, v in self.field_tokens.items())
        lines = [
            f"output        {self.output_prefix} (format {self.data_format})",
            f"rows read     {self.rows_read}",
            f"rows written  {self.rows_written}",
            f"rows skipped  {sum(self.skipped.values())} ({counts(self.skipped)})",
            f"rows dropped  {sum(self.dropped.values())} ({counts(self.dropped)})",
            f"adjusted      {self.flags.get('boundary_adjusted', 0)} prompt/completion "
            "boundaries resolved as TRL does",
            f"truncated     {self.flags.get('prompt_truncated', 0)} prompts cut from the left",
            f"tokens        {self.num_tokens} ({per_field})",
        ]
        for name, st in self.lengths.items():
            stats = " ".join(f"{k}={v}" for k, v in st.items())
            lines.append(f"length        {name:<9} {stats}")
        lines.append(f"throughput    {self.rows_per_s:.0f} rows/s ({self.elapsed_s:.1f} s in all)")
        if self.errors_path:
            lines.append(f"bad rows      listed in {self.errors_path}")
        return "\n".join(lines)


def _write_errors(path: Path, errors: list[ErrorEntry]) -> None:
    def write(f: Any) -> None:
        for location, reason, message, dropped in errors:
            entry = {"location": location, "reason": reason, "message": message}
            if dropped:
                entry["dropped"] = True
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    _atomic_write(path, write, mode="w")


def _format_meta_extra(
    writer: DatasetWriter, tokenizer: Tokenizer, options: PreprocessOptions, summary: Any
) -> dict[str, Any]:
    source, template = describe_template(tokenizer, options.chat_template)
    return {
        "fields": {
            name: {"num_tokens": n, "dtype": str(w.dtype)}
            for (name, n), w in zip(writer.num_tokens.items(), writer.writers.values(), strict=True)
        },
        "scalars": writer.present_scalars(),
        "chat_template": {"source": source, "sha256": template_sha256(template)},
        "special_ids": {"eos": tokenizer.eos_id, "pad": tokenizer.pad_id},
        "options": {
            "max_length": options.max_length,
            "length_policy": options.length_policy,
            "loss_on": options.loss_on,
            "boundary": options.boundary,
            "from_pairwise": options.from_pairwise,
            "tokenization": summary.tokenization,
        },
        "rows": {
            "read": summary.rows_read,
            "written": summary.rows_written,
            "skipped": summary.skipped,
            "dropped": summary.dropped,
            **{k: summary.flags.get(k, 0) for k in ("boundary_adjusted", "prompt_truncated")},
        },
        "lengths": summary.lengths,
        "max_sequence_length": summary.doc_length.get("max", 0),
    }


def finish_dataset(
    writer: DatasetWriter,
    tokenizer: Tokenizer,
    options: PreprocessOptions,
    inputs: list[Path],
    errors: list[ErrorEntry],
    summary: PreprocessSummary,
) -> None:
    """Fill ``summary``, write the error report and ``PREFIX.meta.json`` (last)."""
    prefix = writer.prefix
    summary.rows_written = writer.rows
    summary.skipped = dict(Counter(e[1] for e in errors if not e[3]))
    summary.dropped = dict(Counter(e[1] for e in errors if e[3]))
    summary.flags = dict(writer.flags)
    token_fields = [f.name for f in writer.fmt.fields if f.tokens]
    summary.field_tokens = {k: writer.num_tokens[k] for k in token_fields}
    summary.num_tokens = sum(summary.field_tokens.values())
    summary.lengths = {k: length_stats(v) for k, v in writer.stats.items()}
    summary.tokenization = "whole"
    if options.split_special_tokens:
        words = PieceEncoder(tokenizer).word_cache
        summary.tokenization = "pieces, word cache" if words else "pieces"
    errors_path = Path(prefix + ".errors.jsonl")
    if errors:
        _write_errors(errors_path, errors)
        summary.errors_path = str(errors_path)
    else:  # why: a report left by an earlier run would describe rows this dataset never had
        errors_path.unlink(missing_ok=True)
    extra = {}
    if writer.fmt.name != "text":
        extra = _format_meta_extra(writer, tokenizer, options, summary)
    extra["max_token_id"] = {
        f.name: writer.writers[f.name].max_id for f in writer.fmt.fields if f.tokens
    }
    main = writer.writers[writer.fmt.fields[0].name]
    meta = make_meta(
        data_format=writer.fmt.name,
        tokenizer_name=tokenizer.name,
        vocab_size=tokenizer.vocab_size,
        vocab_hash=tokenizer.vocab_hash(),
        dtype=str(writer.token_dtype),
        num_documents=main.num_documents,
        num_tokens=summary.num_tokens,
        sources=[{"path": str(p), "sha256": file_sha256(p)} for p in inputs],
        **extra,
    )
    write_meta(prefix, meta)
    logger.info("wrote %s (%d rows)", meta_path(prefix), writer.rows)
