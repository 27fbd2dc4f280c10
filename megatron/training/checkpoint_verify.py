"""What ``checkpoint.load`` will find, checked before any rank starts (run by ``preflight``).

Each problem is one line naming the file or the config key:

* the tag directory against its ``manifest.json`` (:mod:`megatron.ckpt.manifest`): a missing,
  truncated or changed file, with the expected and actual size;
* an *incomplete save*: a tag directory without its manifest although its ``client_state.json``
  says it was written by a version that writes one (a save interrupted before ``latest`` moved),
  or without ``client_state.json`` at all;
* the model architecture (:data:`ARCHITECTURE_FIELDS`) against the checkpoint's ``config.yml``,
  for a resume and for ``checkpoint.finetune``: ``model.hidden_size: checkpoint 32, config 64``;
* for a resume, a changed seed, learning rate, batch size or data (:data:`RESUME_FIELDS`):
  refused unless ``checkpoint.allow_changes: true``, and then logged at start-up
  (:func:`accepted_changes`).

A checkpoint saved before manifests existed is checked as far as its ``config.yml`` allows; the
missing manifest is logged at start-up, not refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron.ckpt.layout import CheckpointError, resolve_checkpoint
from megatron.ckpt.manifest import CHECKPOINT_FORMAT, MANIFEST, verify_manifest
from megatron.config import config_to_dict, read_config_file
from megatron.errors import ConfigError

ARCHITECTURE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_kv_heads",
    "kv_channels",
    "ffn_hidden_size",
    "vocab_size",
    "norm",
    "activation",
    "parallel_residual",
    "qkv_bias",
    "proj_bias",
    "mlp_bias",
    "norm_bias",
    "tie_word_embeddings",
)
"""``model.*`` fields that decide the weights' shapes and meaning: they must match the checkpoint
(``model.head`` too on a resume; a finetune may start a value head from an lm checkpoint)."""

RESUME_FIELDS = (
    "training.seed",
    "optimizer.lr",
    "schedule.min_lr",
    "training.micro_batch_size",
    "training.global_batch_size",
    "data.seq_length",
    "data.train",
    "data.valid",
)
"""Settings a resume keeps unless ``checkpoint.allow_changes: true`` (changing them breaks the
exact continuation: another sample order, step size or batch)."""


def _get(data: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _tag_dir(load: str) -> Path:
    root, tag = resolve_checkpoint(load)
    return root / tag


def _saved_config(tag_dir: Path) -> dict[str, Any]:
    path = tag_dir / "config.yml"
    if not path.is_file():
        raise CheckpointError(f"checkpoint.load: {path} is missing (it holds the model config)")
    try:
        return read_config_file(path)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint.load: {path}: {e}") from e


def _differences(saved: dict, run: dict, keys: list[str]) -> list[tuple[str, Any, Any]]:
    out = []
    for key in keys:
        found, old = _get(saved, key)
        if found and old != _get(run, key)[1]:
            out.append((key, old, _get(run, key)[1]))
    return out


def architecture_problems(saved: dict[str, Any], run: dict[str, Any], finetune: bool) -> list[str]:
    """``model.<field>: checkpoint X, config Y`` for each architecture field that differs."""
    keys = [f"model.{f}" for f in ARCHITECTURE_FIELDS]
    lines = [
        f"{key}: checkpoint {old!r}, config {new!r} (checkpoint.load holds another architecture)"
        for key, old, new in _differences(saved, run, keys)
    ]
    for key, old, new in _differences(saved, run, ["model.head"]):
        if not finetune or (old or "lm") == "value":
            lines.append(
                f"{key}: checkpoint {old!r}, config {new!r} (a resume keeps the head; a finetune "
                "can only start a value head from an lm checkpoint)"
            )
    return lines


def resume_changes(saved: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """``key: checkpoint X, config Y`` for each of :data:`RESUME_FIELDS` a resume would change."""
    return [
        f"{k}: checkpoint {old!r}, config {new!r}"
        for k, old, new in _differences(saved, run, list(RESUME_FIELDS))
    ]


def _completeness(tag_dir: Path, checksums: bool = True) -> list[str]:
    client = tag_dir / "client_state.json"
    if not client.is_file():
        return [f"checkpoint.load: incomplete save: {client} is missing"]
    problems = verify_manifest(tag_dir, checksums)
    if problems is not None:
        return [f"checkpoint.load: {p}" for p in problems]
    import json

    try:
        fmt = json.loads(client.read_text()).get("format", 1)
    except (json.JSONDecodeError, AttributeError) as e:
        return [f"checkpoint.load: {client} is not valid JSON: {e}"]
    if fmt >= CHECKPOINT_FORMAT:
        return [
            f"checkpoint.load: incomplete save: {tag_dir / MANIFEST} is missing (the save was "
            "interrupted before it finished); resume from the directory's 'latest' or an "
            "earlier iter_*"
        ]
    return []


def verify_checkpoint(cfg: Any, checksums: bool = True) -> list[str]:
    """Problems of ``cfg.checkpoint.load`` for this run, each one line; empty when it is usable.

    ``checksums`` also compares every file's sha256 with the manifest (sizes always are).

    Raises:
        CheckpointError: nothing loadable at ``checkpoint.load`` (the caller reports it).
    """
    ck = cfg.checkpoint
    tag_dir = _tag_dir(ck.load)
    problems = _completeness(tag_dir, checksums)
    try:
        saved = _saved_config(tag_dir)
    except CheckpointError as e:
        return [*problems, str(e)]
    run = config_to_dict(cfg)
    problems += architecture_problems(saved, run, ck.finetune)
    if not ck.finetune and not ck.allow_changes:
        problems += [
            f"{line} (resume of {tag_dir} refused: set checkpoint.allow_changes: true to accept "
            "the change)"
            for line in resume_changes(saved, run)
        ]
    return problems


def accepted_changes(cfg: Any, tag_dir: Path) -> list[str]:
    """The changes a resume with ``checkpoint.allow_changes: true`` accepts (for the log)."""
    try:
        saved = _saved_config(tag_dir)
    except CheckpointError:
        return []
    return resume_changes(saved, config_to_dict(cfg))
