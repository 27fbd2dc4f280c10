"""``manifest.json`` of a checkpoint's tag directory: every file's path, size and sha256.

Rank 0 writes it at save time, after a barrier (every rank's files exist) and before ``latest``
moves, atomically; :func:`verify_manifest` compares the directory against it before a launch.

Cost: sha256 runs at about 1 GB/s per core (measured: hashlib 1.06 GB/s, blake2b 0.81, zlib
crc32 2.05 on one core of the development machine), and the files are hashed on a thread pool
(hashlib releases the GIL), so a checkpoint of N GB adds about N / min(8, cores) seconds to its
save and to the pre-launch check — small next to writing the files, and a crc would not catch a
deliberate change.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from megatron.utils import atomic_write_json, update_hash

MANIFEST = "manifest.json"
"""Name of the manifest in a tag directory."""

MANIFEST_VERSION = 1
CHECKPOINT_FORMAT = 2
"""``client_state.json``'s ``format``: checkpoints from 2 on are complete only with a manifest
(older ones, without the key, predate manifests)."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    return update_hash(hashlib.sha256(), path).hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    workers = max(1, min(8, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(sha256_file, paths))


def _listed(tag_dir: Path) -> list[Path]:
    """The checkpoint's files: regular, not hidden (temporaries), not the manifest itself."""
    return sorted(
        p
        for p in tag_dir.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST
    )


def manifest_entries(tag_dir: str | Path, share: int = 0, shares: int = 1) -> dict[str, Any]:
    """``{relative path: {size, sha256}}`` of every ``shares``-th file of ``tag_dir`` from
    ``share`` on (the files in sorted order), so that several ranks can hash one checkpoint
    together: each its own share, the union is the whole directory.
    """
    tag_dir = Path(tag_dir)
    files = _listed(tag_dir)[share::shares]
    digests = _hash_all(files)
    return {
        p.relative_to(tag_dir).as_posix(): {"size": p.stat().st_size, "sha256": d}
        for p, d in zip(files, digests, strict=True)
    }


def write_manifest(tag_dir: str | Path, entries: dict[str, Any] | None = None) -> Path:
    """Write ``tag_dir/manifest.json`` (call on one rank, once all ranks' files are on disk).

    Args:
        tag_dir: the ``iter_XXXXXXX`` directory.
        entries: the files' :func:`manifest_entries` when the ranks hashed them together;
            ``None``: hash every file here.

    Returns:
        The manifest's path.
    """
    tag_dir = Path(tag_dir)
    if entries is None:
        entries = manifest_entries(tag_dir)
    path = tag_dir / MANIFEST
    atomic_write_json(path, {"version": MANIFEST_VERSION, "files": entries})
    return path


def read_manifest(tag_dir: str | Path) -> dict[str, Any] | None:
    """The manifest's ``files`` entry (``{relative path: {size, sha256}}``); None when absent.

    Raises:
        ValueError: the manifest exists but is not valid JSON of the expected shape.
    """
    path = Path(tag_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        files = data["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid manifest: {e}") from e
    if not isinstance(files, dict):
        raise ValueError(f"{path} is not a valid manifest: 'files' is not a mapping")
    return files


def verify_manifest(tag_dir: str | Path, checksums: bool = True) -> list[str] | None:
    """Compare ``tag_dir`` with its manifest: one line per missing, resized or changed file.

    Args:
        tag_dir: the ``iter_XXXXXXX`` directory.
        checksums: also compare sha256 (sizes are always compared).

    Returns:
        The problems (empty when the directory matches), or None when there is no manifest.
    """
    tag_dir = Path(tag_dir)
    try:
        files = read_manifest(tag_dir)
    except ValueError as e:
        return [str(e)]
    if files is None:
        return None
    problems = []
    present = []
    for rel, entry in sorted(files.items()):
        path = tag_dir / rel
        want = int(entry.get("size", -1))
        if not path.is_file():
            problems.append(f"{path} is missing (the manifest lists it, {want} bytes)")
        elif (size := path.stat().st_size) != want:
            problems.append(
                f"{path} is truncated or changed: {size} bytes, the manifest says {want}"
            )
        else:
            present.append((path, str(entry.get("sha256", ""))))
    if checksums and present:
        digests = _hash_all([p for p, _ in present])
        for (path, want), got in zip(present, digests, strict=True):
            if got != want:
                problems.append(
                    f"{path} was changed since it was saved: sha256 {got[:12]}…, "
                    f"the manifest says {want[:12]}…"
                )
    return problems
