"""Model files of a native checkpoint: written per TP rank, read back from any ZeRO stage.

One tag directory (``DIR/iter_XXXXXXX``, see :mod:`megatron.ckpt.layout`) holds the
model as DeepSpeed wrote it:

* ZeRO 0-2, and checkpoints written by the converters: ``mp_rank_{r:02d}_model_states.pt`` whose
  ``module`` entry is TP rank r's ``GPTModel`` state dict.
* ZeRO-3: ``zero_pp_rank_{d}_mp_rank_{r:02d}_model_states.pt`` whose ``module`` holds empty
  placeholders; the weights are the fp32 partitions in ``*_mp_rank_{r:02d}_optim_states.pt``.
  They are consolidated with DeepSpeed's ``zero_to_fp32``, one TP rank at a time (given the whole
  directory it would mix the TP ranks' partitions and refuse).
* Pipeline runs (DeepSpeed's ``PipelineModule``, and the converters at ``--pp > 1``): one file per
  pipeline layer and TP rank, ``layer_{i:02d}-model_{r:02d}-model_states.pt`` (a plain state dict
  of that layer, keys as in :mod:`megatron.model.pipeline`; see
  :func:`megatron.ckpt.hf_mapping.pipeline_layer_of`), plus ``mp_rank_{k:02d}_model_states.pt``
  for each of the PP x TP model ranks whose ``module`` is ``None``. The per-layer files do not
  depend on the PP size, so they are read the same way at any PP.

:func:`load_tp_shard` returns one rank's weights at any TP size: when the checkpoint was written at
another TP size it gathers the shards and splits them again (exact; vocabulary padding redone).

Every file is read with ``weights_only=True`` (:func:`megatron.ckpt.safety.safe_load`): tensors,
plain data and DeepSpeed's few data classes only; ``zero_to_fp32`` (which loads unsafely) gets its
files only after the same check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import io
import logging
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from megatron.ckpt import ConversionError, safety
from megatron.ckpt.hf_mapping import (
    check_native_shards,
    iter_resharded,
    native_key_of,
    pipeline_layer_of,
)
from megatron.ckpt.layout import CheckpointError, resolve_checkpoint
from megatron.config import ModelConfig, read_config_file
from megatron.errors import ConfigError
from megatron.training.distributed import import_deepspeed
from megatron.utils import log_rank0

logger = logging.getLogger(__name__)
_MODEL_FILE = re.compile(r"(?:^|_)mp_rank_(\d+)_model_states\.pt$")
_LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")


def _safe_load(path: Path, mmap: bool = True) -> Any:
    """``torch.load(path, weights_only=True)``, memory-mapped unless ``mmap`` is False (see
    :mod:`megatron.ckpt.safety`).

    Raises:
        ConversionError: the file is unreadable, or names code outside the allowed set.
    """
    try:
        return safety.safe_load(path, map_location="cpu", mmap=mmap)
    except CheckpointError as e:
        raise ConversionError(str(e)) from e


def model_states_name(tp_rank: int) -> str:
    """File name of TP rank ``tp_rank``'s model states (ZeRO 0-2 layout)."""
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def layer_states_name(layer: int, tp_rank: int) -> str:
    """File name of pipeline layer ``layer``'s weights for TP rank ``tp_rank`` (DeepSpeed's
    ``PipelineModule.ckpt_layer_path`` with its default ``model`` axis)."""
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def _save(obj: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def write_model_states(
    tag_dir: str | Path,
    tp_rank: int,
    tp_size: int,
    state_dict: Mapping[str, torch.Tensor] | None,
) -> Path:
    """Write one model rank's file as DeepSpeed's ZeRO 0-2 ``mp_rank_XX_model_states.pt``.

    Besides ``module``, the file carries the entries DeepSpeed's ``load_checkpoint(...,
    load_module_only=True)`` and ``zero_to_fp32`` read, so DeepSpeed itself can load it too.
    The file is written under a temporary name and renamed.

    Args:
        tag_dir: the ``iter_XXXXXXX`` directory.
        tp_rank: the model rank (for a pipeline checkpoint: ``pp_rank * tp_size + tp_rank``).
        tp_size: the number of model ranks (pipeline: PP x TP, DeepSpeed's ``mp_world_size``).
        state_dict: the rank's ``GPTModel`` weights; ``None`` for a pipeline checkpoint, whose
            weights are in the per-layer files (:func:`write_layer_states`).

    Returns:
        The file's path.
    """
    tag_dir = Path(tag_dir)
    module = OrderedDict(state_dict) if state_dict is not None else None
    payload = {
        "module": module,
        "buffer_names": [],
        "param_shapes": [OrderedDict((k, v.shape) for k, v in (module or {}).items())],
        "frozen_param_shapes": None,
        "frozen_param_fragments": None,
        "shared_params": {},
        "optimizer": None,
        "lr_scheduler": None,
        "data_sampler": None,
        "random_ltd": None,
        "global_steps": 0,
        "global_samples": 0,
        "skipped_steps": 0,
        "dp_world_size": 1,
        "mp_world_size": tp_size,
        "ds_version": importlib.metadata.version("deepspeed"),
    }
    return _save(payload, tag_dir / model_states_name(tp_rank))


def write_layer_states(
    tag_dir: str | Path, tp_rank: int, state_dict: Mapping[str, torch.Tensor], args: ModelConfig
) -> list[Path]:
    """Write one TP rank's weights as DeepSpeed's per-layer pipeline files.

    Each ``layer_XX-model_YY-model_states.pt`` is the plain state dict of one pipeline layer, as
    ``PipelineModule.save_state_dict`` writes it and ``load_state_dir`` reads it.

    Args:
        tag_dir: the ``iter_XXXXXXX`` directory.
        tp_rank: the TP rank.
        state_dict: the rank's ``GPTModel`` weights (native keys).
        args: the model (its ``num_layers`` places the final norm and ``lm_head``).

    Returns:
        The written files, in layer order.
    """
    layers: dict[int, OrderedDict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        layer, inner = pipeline_layer_of(key, args)
        layers.setdefault(layer, OrderedDict())[inner] = tensor
    tag_dir = Path(tag_dir)
    return [_save(layers[i], tag_dir / layer_states_name(i, tp_rank)) for i in sorted(layers)]


def _layer_files(tag_dir: Path) -> dict[int, dict[int, Path]]:
    """``{tp_rank: {layer: path}}`` of a pipeline checkpoint's per-layer files."""
    out: dict[int, dict[int, Path]] = {}
    for p in tag_dir.iterdir():
        if m := _LAYER_FILE.match(p.name):
            out.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    return out


def is_pipeline_checkpoint(tag_dir: str | Path) -> bool:
    """Whether ``tag_dir`` holds DeepSpeed pipeline layer files (``layer_XX-model_YY-...``)."""
    tag_dir = Path(tag_dir)
    return tag_dir.is_dir() and any(_LAYER_FILE.match(p.name) for p in tag_dir.iterdir())


def _pipeline_tp_size(tag_dir: Path) -> int:
    files = _layer_files(tag_dir)
    size = max(files) + 1
    layers = set().union(*(set(f) for f in files.values()))
    for rank in range(size):
        missing = sorted(set(range(max(layers) + 1)) - set(files.get(rank, {})))
        if missing:
            raise ConversionError(
                f"{tag_dir}: pipeline checkpoint written at TP={size}, but the layer files "
                f"layer_XX-model_{rank:02d}-model_states.pt of layers {missing} are missing"
            )
    return size


def _read_layer_shard(tag_dir: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """TP rank ``tp_rank``'s weights (native keys) from a pipeline checkpoint's layer files."""
    files = _layer_files(tag_dir).get(tp_rank)
    if not files:
        raise ConversionError(f"{tag_dir}: no pipeline layer files of TP rank {tp_rank}")
    layers = {i: _safe_load(files[i]) for i in sorted(files)}
    # why: the files do not record the layer count; the final norm is the one layer whose keys
    # are all norm.* (the transformer layers' norms are input_norm / post_attention_norm).
    norms = [i for i, sd in layers.items() if sd and all(k.startswith("norm.") for k in sd)]
    if len(norms) != 1 or norms[0] < 1:
        raise ConversionError(
            f"{tag_dir}: cannot find the final norm's layer file (keys norm.*) among layers "
            f"{sorted(layers)} of TP rank {tp_rank}"
        )
    try:
        return {
            native_key_of(i, k, norms[0] - 1): t for i, sd in layers.items() for k, t in sd.items()
        }
    except ValueError as e:
        raise ConversionError(f"{tag_dir}: {e}") from e


def checkpoint_tp_size(tag_dir: str | Path) -> int:
    """The TP size a checkpoint was written at (from its model-state file names).

    Raises:
        ConversionError: no model files, or TP ranks missing.
    """
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        raise ConversionError(f"{tag_dir}: no such checkpoint directory")
    if is_pipeline_checkpoint(tag_dir):
        return _pipeline_tp_size(tag_dir)
    files = {int(m.group(1)): p for p in tag_dir.iterdir() if (m := _MODEL_FILE.search(p.name))}
    if not files:
        raise ConversionError(
            f"{tag_dir} holds no model files (mp_rank_XX_model_states.pt or "
            "zero_pp_rank_D_mp_rank_XX_model_states.pt)"
        )
    # DeepSpeed records the TP size in every model file; trust it over the files that are left.
    first = _safe_load(files[min(files)])
    size = int(first.get("mp_world_size") or 0) if isinstance(first, dict) else 0
    size = max(size, max(files) + 1)
    missing = sorted(set(range(size)) - set(files))
    if missing:
        raise ConversionError(
            f"{tag_dir}: written at TP={size}, but the model files of TP ranks {missing} are missing"
        )
    return size


def _zero_fp32(tag_dir: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """fp32 weights of one TP rank from its ZeRO partitions, by DeepSpeed's ``zero_to_fp32``."""
    import_deepspeed()  # deepspeed itself is imported only here: an optional, heavy dependency
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    mp = f"mp_rank_{tp_rank:02d}"
    files = [*tag_dir.glob(f"{mp}_model_states.pt"), *tag_dir.glob(f"*_{mp}_*_states.pt")]
    if not any(f.name.endswith("optim_states.pt") for f in files):
        raise ConversionError(
            f"{tag_dir}: no ZeRO optimizer partitions (*_{mp}_optim_states.pt) to take fp32 "
            f"weights of TP rank {tp_rank} from (fp32 master weights exist only for ZeRO >= 1)"
        )
    # why: zero_to_fp32 loads with weights_only=False; the files are first proven safe
    for f in files:
        _safe_load(f)
    with tempfile.TemporaryDirectory() as view:
        # why: zero_to_fp32 globs a whole directory; a view with one TP rank's files keeps it
        # from mixing (and counting) the partitions of the other TP ranks.
        (Path(view) / tag_dir.name).mkdir()
        for f in files:
            (Path(view) / tag_dir.name / f.name).symlink_to(f.resolve())
        noise = io.StringIO()
        with contextlib.redirect_stdout(noise):
            sd = get_fp32_state_dict_from_zero_checkpoint(view, tag=tag_dir.name)
        logger.debug("zero_to_fp32 for TP rank %d:\n%s", tp_rank, noise.getvalue())
    return dict(sd)


def read_model_shard(
    tag_dir: str | Path, tp_rank: int, fp32_master: bool = False, mmap: bool = True
) -> dict[str, torch.Tensor]:
    """TP rank ``tp_rank``'s weights (native keys) from a checkpoint directory written at any
    ZeRO stage, with or without pipeline parallelism (any PP size).

    Args:
        tag_dir: the ``iter_XXXXXXX`` directory.
        tp_rank: which TP shard.
        fp32_master: take ZeRO 1-2's fp32 master weights (from the optimizer partitions)
            instead of the module's (bf16/fp16 when the run trained in those). ZeRO-3 always
            uses the fp32 partitions: its module files hold no weights.
        mmap: memory-map the module file (pages read on use; for reading and converting) or
            read it into memory (for weights a model keeps: anonymous memory, no file pages
            to fault in or copy on write during training).

    Returns:
        The state dict.

    Raises:
        ConversionError: the files for that rank are missing or unusable.
    """
    tag_dir = Path(tag_dir)
    if is_pipeline_checkpoint(tag_dir):
        if fp32_master:
            raise ConversionError(
                f"{tag_dir} was written by a pipeline-parallel run: exporting its fp32 master "
                "weights is not supported; export the module weights (no --fp32-master)"
            )
        return _read_layer_shard(tag_dir, tp_rank)
    path = tag_dir / model_states_name(tp_rank)
    if path.is_file() and not fp32_master:
        states = _safe_load(path, mmap)
        module = states.get("module") if isinstance(states, dict) else None
        if not isinstance(module, Mapping):
            raise ConversionError(f"{path} has no 'module' state dict")
        if all(t.numel() for t in module.values()):
            return dict(module)
    return _zero_fp32(tag_dir, tp_rank)


def read_model_shards(
    tag_dir: str | Path, fp32_master: bool = False, mmap: bool = True
) -> list[dict]:
    """Every TP rank's weights, in rank order (see :func:`read_model_shard`)."""
    ranks = range(checkpoint_tp_size(tag_dir))
    return [read_model_shard(tag_dir, r, fp32_master, mmap) for r in ranks]


def load_tp_shard(
    tag_dir: str | Path, args: ModelConfig, tp_size: int, tp_rank: int, mmap: bool = True
) -> dict[str, torch.Tensor]:
    """TP rank ``tp_rank`` of ``tp_size``'s weights, resharding when the checkpoint's TP differs.

    Args:
        tag_dir: the checkpoint's ``iter_XXXXXXX`` directory.
        args: the model config of the run (``padded_vocab_size`` for ``tp_size``).
        tp_size: the run's TP size.
        tp_rank: this rank.
        mmap: see :func:`read_model_shard`.

    Raises:
        ConversionError: missing files, or weights that do not fit the model config.
    """
    ckpt_tp = checkpoint_tp_size(tag_dir)
    if ckpt_tp == tp_size:
        shards = [read_model_shard(tag_dir, tp_rank, mmap=mmap)]
        try:
            check_native_shards(shards, args, tp_size=tp_size)
        except ValueError as e:
            raise ConversionError(f"{tag_dir} does not fit the run's model config: {e}") from e
        return shards[0]
    log_rank0("resharding %s from TP=%d to TP=%d while loading", tag_dir, ckpt_tp, tp_size)
    shards = read_model_shards(tag_dir, mmap=mmap)
    rows = shards[0]["embedding.weight"].shape[0] * ckpt_tp
    old = dataclasses.replace(args, padded_vocab_size=rows)
    try:
        return {k: s[tp_rank] for k, s in iter_resharded(shards, old, args, tp_size)}
    except ValueError as e:
        raise ConversionError(f"{tag_dir} does not fit the run's model config: {e}") from e


def read_checkpoint_config(ckpt: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(checkpoint root, its config.yml as plain data)`` for a run dir or an ``iter_*`` dir.

    Raises:
        ConversionError: no checkpoint there, or its ``config.yml`` is missing or unreadable.
    """
    try:
        root, tag = resolve_checkpoint(ckpt)
    except CheckpointError as e:
        raise ConversionError(str(e)) from e
    path = root / tag / "config.yml"
    if not path.is_file():
        raise ConversionError(f"{path} is missing: the model config cannot be known")
    try:
        return root, read_config_file(path)
    except ConfigError as e:
        raise ConversionError(str(e)) from e
