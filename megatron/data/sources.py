"""Reading raw corpora row by row, each row located as ``file:line`` or ``file[row i]``.

Sources (by suffix): ``.jsonl`` (one JSON object per line, read by a streaming reader here so
errors name ``file:line``), ``.json`` (a JSON array of objects, or JSON Lines), ``.txt`` (one
document per non-empty line, or the whole file with ``txt_mode="file"``), and through the
``datasets`` library ``.parquet``, ``.csv`` and ``save_to_disk`` directories (rows are named
``file[row i]``, 0-based like ``ds[i]``).

Rows are returned undecoded (:class:`RawRow`) so that JSON parsing and UTF-8 decoding happen in
the tokenizer workers; :func:`decode_record` turns one into a mapping or raises
:class:`RowError`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from megatron.data.indexed import DatasetError

TEXT_SUFFIXES = (".jsonl", ".json", ".txt")
HF_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}
_SUPPORTED = "supported: .jsonl, .json, .txt, .parquet, .csv, or a datasets.save_to_disk directory"


class RowError(Exception):
    """One input row is unusable; ``reason`` is a short key for the summary counts."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class RawRow(NamedTuple):
    """A row as read: ``kind`` is ``json`` (bytes of one JSON line), ``text`` (bytes of a text
    document) or ``record`` (an already-parsed object). A tuple: it pickles cheaply to workers."""

    location: str
    kind: str
    payload: Any


def decode_utf8(raw: bytes) -> str:
    """``raw`` as UTF-8 text; :class:`RowError` ``invalid_utf8`` naming the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 4]
        raise RowError("invalid_utf8", f"invalid UTF-8 at byte {exc.start} ({bad!r})") from None


def decode_record(row: RawRow, text_key: str = "text") -> Mapping[str, Any]:
    """Parse one row into a mapping (``text`` rows become ``{text_key: document}``).

    Raises:
        RowError: ``invalid_utf8``, ``invalid_json`` or ``not_an_object``.
    """
    if row.kind == "text":
        return {text_key: decode_utf8(row.payload)}
    if row.kind == "json":
        try:
            record = json.loads(decode_utf8(row.payload))
        except json.JSONDecodeError as exc:
            msg = f"invalid JSON: {exc.msg} (column {exc.colno})"
            raise RowError("invalid_json", msg) from None
    else:
        record = row.payload
    if not isinstance(record, Mapping):
        raise RowError("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    return record


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


def iter_rows(path: str | Path, txt_mode: str = "line") -> Iterator[RawRow]:
    """Rows of one source, in file order (see the module docstring for the supported kinds).

    Args:
        path: A file or a ``datasets.save_to_disk`` directory.
        txt_mode: ``.txt`` inputs: ``line`` (one row per non-empty line) or ``file``.

    Raises:
        DatasetError: If the source is of an unsupported kind.
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
    elif suffix == ".txt" and txt_mode == "file":
        raw = path.read_bytes()
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        yield RawRow(str(path), "text", raw)
    elif suffix == ".txt":
        for lineno, raw in _iter_lines(path):
            yield RawRow(f"{path}:{lineno}", "text", raw)
    else:
        raise DatasetError(f"{path}: unsupported input kind {suffix!r}; {_SUPPORTED}")


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
