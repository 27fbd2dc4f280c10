"""Hugging Face checkpoint directories: lazy weight reading, streaming sharded writing, extras.

A Hugging Face model directory holds ``config.json``, the weights as ``model.safetensors`` or
shards named by ``model.safetensors.index.json`` (legacy: ``pytorch_model.bin`` and its index),
and optionally ``generation_config.json`` and tokenizer files. :class:`HFWeights` reads tensors one
at a time (safetensors with plain reads, ``.bin`` files loaded with ``mmap=True``), and
:class:`SafetensorsWriter` writes shards as tensors arrive, so neither direction needs the model
twice in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron.ckpt import ConversionError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
"""Tokenizer files copied along with a model (whichever exist)."""
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The raw ``config.json`` of a Hugging Face model directory.

    Raises:
        ConversionError: the directory or its ``config.json`` is missing or unreadable.
    """
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir}: no such directory (expected a Hugging Face model dir)")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} is missing: not a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot read it ({e})") from e


def _weight_files(hf_dir: Path) -> dict[str, Path]:
    """``{tensor name: file}`` from the index file, or from the single weights file."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = hf_dir / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = {name: hf_dir / f for name, f in weight_map.items()}
            for f in sorted(set(files.values())):
                if not f.is_file():
                    raise ConversionError(f"{index} names {f.name}, which is missing")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (hf_dir / name).is_file():
            return {"": hf_dir / name}  # keys read from the file itself
    raise ConversionError(
        f"{hf_dir} holds no weights: expected model.safetensors, {SAFETENSORS_INDEX}, "
        f"pytorch_model.bin or {BIN_INDEX}"
    )


class SafetensorsFile:
    """One safetensors file, each tensor read into fresh memory on request (no memory map).

    why not ``safetensors.safe_open``: its tensors are views of a memory map that stays open, so
    every page a conversion touches stays in the process's resident set until the end; plain reads
    keep the resident set to the tensors actually alive (the kernel's page cache still helps).

    Format: an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
    data_offsets: [begin, end]}}`` (offsets from the end of the header), then the data.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        self.entries: dict[str, dict[str, Any]] = header
        self.data_start = 8 + length

    def shape_dtype(self, key: str) -> tuple[list[int], torch.dtype]:
        entry = self.entries[key]
        if entry["dtype"] not in _ST_DTYPES:
            raise ConversionError(f"{self.path}: {key} has unsupported dtype {entry['dtype']}")
        return entry["shape"], _ST_DTYPES[entry["dtype"]]

    def read(self, key: str) -> torch.Tensor:
        shape, dtype = self.shape_dtype(key)
        begin, end = self.entries[key]["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(memoryview(buf.numpy())) != end - begin:
                raise ConversionError(f"{self.path}: truncated file (reading {key})")
        return buf.view(dtype).reshape(shape)


class HFWeights(Mapping[str, torch.Tensor]):
    """The tensors of a Hugging Face model directory, read on access.

    Args:
        hf_dir: the model directory.

    Raises:
        ConversionError: no weights file, or an index naming a missing shard or tensor.
    """

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        files = _weight_files(self.dir)
        single = "" in files
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        for path in sorted(set(files.values())):
            if path.suffix == ".safetensors":
                self._handles[path] = SafetensorsFile(path)
                names = list(self._handles[path].entries)
            else:
                self._handles[path] = torch.load(
                    path, map_location="cpu", mmap=True, weights_only=True
                )
                names = list(self._handles[path])
            for name in names:
                if single or files.get(name) == path:
                    self._where[name] = path
        lost = sorted(set(files) - set(self._where)) if not single else []
        if lost:
            raise ConversionError(
                f"{self.dir}: the index names tensors its shard files lack: {lost[:5]}"
            )

    def __getitem__(self, key: str) -> torch.Tensor:
        handle = self._handles[self._where[key]]
        return handle.read(key) if isinstance(handle, SafetensorsFile) else handle[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def meta(self) -> dict[str, torch.Tensor]:
        """Every tensor as a ``meta`` tensor of the same shape and dtype (reads no data)."""
        out = {}
        for key, path in self._where.items():
            handle = self._handles[path]
            if isinstance(handle, SafetensorsFile):
                shape, dtype = handle.shape_dtype(key)
            else:
                shape, dtype = handle[key].shape, handle[key].dtype
            out[key] = torch.empty(shape, dtype=dtype, device="meta")
        return out

    def nbytes(self) -> int:
        """Total size of all tensors in bytes."""
        return sum(t.numel() * t.element_size() for t in self.meta().values())


class SafetensorsWriter:
    """Writes tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards as they arrive.

    Shards are written when they reach ``max_shard_bytes``; :meth:`close` renames them to their
    final names and writes ``model.safetensors.index.json`` (or a single ``model.safetensors``).

    Args:
        out_dir: the output directory (must exist).
        max_shard_bytes: target shard size (a larger single tensor gets a shard of its own).
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
        self.dir, self.max_bytes = Path(out_dir), max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``name``; may write a shard."""
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.dir / f".shard-{len(self._shards):05d}.safetensors.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, name the shards and write the index; returns the shard paths."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        for i, name in enumerate(names):
            os.replace(self.dir / f".shard-{i:05d}.safetensors.tmp", self.dir / name)
        if n > 1:
            weight_map = {k: names[i] for i, keys in enumerate(self._shards) for k in keys}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return [self.dir / name for name in names]


def tokenizer_vocab_size(tokenizer_dir: str | Path) -> int | None:
    """One more than the largest token id of ``tokenizer.json`` (None without that file)."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    ids = [int(i) for i in (data.get("model", {}).get("vocab") or {}).values()]
    ids += [int(t["id"]) for t in data.get("added_tokens", [])]
    return max(ids) + 1 if ids else None


def check_tokenizer_vocab(tokenizer_dir: str | Path, vocab_size: int) -> None:
    """Raise if the tokenizer in ``tokenizer_dir`` has ids the model's vocabulary lacks.

    Raises:
        ConversionError: a token id >= ``vocab_size``.
    """
    size = tokenizer_vocab_size(tokenizer_dir)
    if size is not None and size > vocab_size:
        raise ConversionError(
            f"{Path(tokenizer_dir) / 'tokenizer.json'}: token ids go up to {size - 1}, but the "
            f"model's vocab_size is {vocab_size}: tokenizer and weights do not belong together"
        )


def copy_hf_extras(src: str | Path, dst: str | Path, with_config: bool = True) -> list[str]:
    """Copy tokenizer files, ``generation_config.json`` and (optionally) ``config.json``.

    Returns:
        The names of the files copied.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    names = [*TOKENIZER_FILES, "generation_config.json"]
    if with_config:
        names.append("config.json")
    return _copy_existing(src, dst, names)


def _copy_existing(src: Path, dst: Path, names: Sequence[str]) -> list[str]:
    """Copy each of ``names`` that exists in ``src`` to ``dst``; the names copied."""
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files of ``src`` into ``dst``, removing any other tokenizer's there.

    Returns:
        The names of the files copied.
    """
    src, dst = Path(src), Path(dst)
    for name in TOKENIZER_FILES:
        (dst / name).unlink(missing_ok=True)
    return _copy_existing(src, dst, TOKENIZER_FILES)
