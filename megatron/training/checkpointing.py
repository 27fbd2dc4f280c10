"""Checkpoints: DeepSpeed's model/optimizer shards plus our client state, ``latest`` last.

Layout of ``checkpoint.save``::

    DIR/
      latest                       # tag of the newest *complete* checkpoint, written atomically last
      iter_0000010/
        mp_rank_00_model_states.pt ...   # DeepSpeed (model, optimizer/ZeRO partitions)
        client_state.json           # step, consumed samples, sampler state (human-readable)
        config.yml                  # the resolved run config
        rng_state_rank{r}.pt        # python, numpy, torch (cpu/cuda) and TP-tracker RNG per rank
        source_state_rank{r}.pt     # the batch source's own state per rank, when it has one
                                    # (an online RL rollout not yet trained on to its end)
        manifest.json               # every file's size and sha256, written after all of them

Finding the tag (``latest`` or an ``iter_*`` directory) is :mod:`megatron.ckpt.layout`; the model
files are :mod:`megatron.ckpt.native`. A crash at any point leaves ``latest`` naming the previous
complete checkpoint, so a resume never sees a partial one; ``manifest.json``
(:mod:`megatron.ckpt.manifest`) lets the pre-launch check name a truncated or missing file. Every
file is loaded with ``weights_only=True`` (:mod:`megatron.ckpt.safety`), DeepSpeed's only after
the same check. DeepSpeed's own ``latest`` file is not
written (``save_latest=False``).

``checkpoint.finetune`` loads weights only (:func:`load_weights`): from any ZeRO stage, at any TP
and PP size (pipeline and non-pipeline layouts both ways), and from the weights-only checkpoints ``tools/ckpts/`` writes (their ``client_state.json``
says ``"weights_only": true``; a full resume of them is refused).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron.ckpt import ConversionError
from megatron.ckpt.hf_config import model_config_from_section, with_tp_padding
from megatron.ckpt.hf_mapping import pipeline_layer_of
from megatron.ckpt.layout import LATEST, CheckpointError, resolve_checkpoint, tag_for
from megatron.ckpt.manifest import CHECKPOINT_FORMAT as CKPT_FORMAT
from megatron.ckpt.manifest import MANIFEST, manifest_entries, read_manifest, write_manifest
from megatron.ckpt.native import checkpoint_tp_size, load_tp_shard, read_checkpoint_config
from megatron.ckpt.safety import NUMPY_GLOBALS, check_loadable, safe_load, torch_files
from megatron.config import read_config_file, save_config
from megatron.model import GPTModel
from megatron.model.gpt import build_loaded
from megatron.parallel.random import RNGStatesTracker
from megatron.training.distributed import import_deepspeed
from megatron.utils import atomic_write_bytes, atomic_write_json, atomic_write_text, log_rank0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


RNG_FORMAT = 2
"""Version of ``rng_state_rank{r}.pt``: 2 holds tensors and plain data only (loads with
``weights_only=True``); 1 (no ``format`` key) pickled numpy's state tuple."""


def rng_state(tracker: RNGStatesTracker) -> dict[str, Any]:
    """Every RNG stream this rank uses, as tensors and plain Python data.

    why plain data: the file then loads with ``torch.load(weights_only=True)``, which runs no code
    from it (numpy's state would otherwise be a pickled ``ndarray``).
    """
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "format": RNG_FORMAT,
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {
            "kind": str(kind),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "tracker": tracker.state_dict(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], tracker: RNGStatesTracker) -> None:
    """Restore what :func:`rng_state` returned (also the format-1 dict of older checkpoints)."""
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
        keys = np.asarray(npy["keys"], dtype=np.uint32)
        np.random.set_state(
            (npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
        )
    else:
        random.setstate(py)
        np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    tracker.load_state_dict(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    engine: Any,
    save_dir: str | Path,
    step: int,
    client_state: dict[str, Any],
    config: Any,
    tracker: RNGStatesTracker,
    keep_last: int | None = None,
    rank_state: dict[str, Any] | None = None,
) -> Path:
    """Save a complete checkpoint for ``step`` (collective: every rank calls it).

    ``rank_state``: this rank's batch-source state (tensors and plain data), saved as
    ``source_state_rank{r}.pt`` when not ``None`` (:func:`load_rank_state`).

    Returns:
        The tag directory.
    """
    save_dir = Path(save_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(save_dir), tag=tag, client_state={}, save_latest=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag_dir = save_dir / tag
    buf = _torch_bytes(rng_state(tracker))
    atomic_write_bytes(tag_dir / f"rng_state_rank{rank}.pt", buf)
    if rank_state is not None:
        atomic_write_bytes(tag_dir / f"{SOURCE_STATE}{rank}.pt", _torch_bytes(rank_state))
    if rank == 0:
        # "format" tells an interrupted save (no manifest yet) from one that predates manifests
        atomic_write_json(tag_dir / "client_state.json", {**client_state, "format": CKPT_FORMAT})
        save_config(config, tag_dir / "config.yml")
    _barrier()  # every shard and RNG file is on disk before the manifest lists them
    # why: every rank hashes a share of the files (rank 0 alone would read the whole checkpoint)
    world = dist.get_world_size() if dist.is_initialized() else 1
    shares = [manifest_entries(tag_dir, rank, world)]
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, manifest_entries(tag_dir, rank, world))
    if rank == 0:
        write_manifest(tag_dir, {k: v for share in shares for k, v in share.items()})
        atomic_write_text(save_dir / LATEST, tag + "\n")
        if keep_last:
            _prune(save_dir, keep_last, keep=tag)
    _barrier()
    log_rank0("saved checkpoint %s", tag_dir)
    return tag_dir


SOURCE_STATE = "source_state_rank"
"""Prefix of the per-rank batch-source state files (``source_state_rank{r}.pt``)."""


def load_rank_state(load: str | Path) -> dict[str, Any] | None:
    """This rank's batch-source state saved with the checkpoint ``load`` (``None``: none saved)."""
    root, tag = resolve_checkpoint(load)
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = root / tag / f"{SOURCE_STATE}{rank}.pt"
    return safe_load(path) if path.is_file() else None


def _torch_bytes(obj: Any) -> bytes:
    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()


def _step_was_finite(tag_dir: Path) -> bool:
    """Whether ``tag_dir`` is a saved checkpoint whose step had a finite loss and gradient norm.

    The trainer records ``"finite"`` in the client state (see :mod:`megatron.training.guards`);
    checkpoints from before that record count as finite, a directory without client state (an
    interrupted save) does not.
    """
    try:
        client = json.loads((tag_dir / "client_state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(client, dict) and client.get("finite", True) is not False


def newest_finite_checkpoint(save_dir: Path) -> Path | None:
    """The newest checkpoint under ``save_dir`` (not past ``latest``) whose step was finite."""
    latest = save_dir / LATEST
    try:
        newest = latest.read_text().strip() if latest.is_file() else None
    except OSError:
        newest = None
    tags = sorted((p for p in save_dir.glob("iter_*") if p.is_dir()), reverse=True)
    return next(
        (t for t in tags if (newest is None or t.name <= newest) and _step_was_finite(t)), None
    )


def _prune(save_dir: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, ``keep``, and the newest finite one.

    why the finite one: under ``training.on_nonfinite: skip_step`` the newest ``keep_last``
    checkpoints may all come from skipped (non-finite) steps; the last finite one is what a user
    resumes from.
    """
    tags = sorted(p for p in save_dir.glob("iter_*") if p.is_dir())
    finite = newest_finite_checkpoint(save_dir)
    protect = {keep, finite.name if finite is not None else keep}
    for old in tags[:-keep_last]:
        if old.name not in protect:
            shutil.rmtree(old, ignore_errors=True)


def _client_state(tag_dir: Path) -> dict[str, Any]:
    path = tag_dir / "client_state.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {tag_dir} is not a complete checkpoint")
    return json.loads(path.read_text())


def _pipeline_state_dict(
    module: Any, tag_dir: Path, tp_size: int, tp_rank: int, fresh_value_head: bool = False
) -> dict[str, torch.Tensor]:
    """This pipeline stage's weights from ``tag_dir`` (any layout, TP and PP), keyed as in
    ``module.state_dict()`` (``"{layer}.{key}"``, ``tied_modules.embedding.*``).
    ``fresh_value_head``: the run's value head is not in the (lm-head) checkpoint.

    why the checkpoint's config.yml: a ``PipelineModule`` does not carry the run's model config;
    the shapes the run needs are checked by the strict load instead, and the run's padded
    vocabulary is read off this stage's vocabulary layer (if it has one).
    """
    config_path = tag_dir / "config.yml"
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint.load: {config_path} is missing (it holds the model)")
    try:
        section = read_config_file(config_path)["model"]
        args = model_config_from_section(section, checkpoint_tp_size(tag_dir))
    except (ConversionError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint.load: {config_path}: {e}") from e
    own = module.state_dict()
    n = args.num_layers
    vocab_keys = ("0.weight", "tied_modules.embedding.weight", f"{n + 2}.weight")
    rows = next((own[k].shape[0] for k in vocab_keys if k in own), None)
    if rows:
        run_args = dataclasses.replace(args, padded_vocab_size=rows * tp_size)
    else:
        run_args = with_tp_padding(args, tp_size)
    try:
        shard = load_tp_shard(tag_dir, run_args, tp_size, tp_rank)
    except ConversionError as e:
        raise CheckpointError(f"checkpoint.load: {e}") from e
    sd: dict[str, torch.Tensor] = {}
    for key, tensor in shard.items():
        layer, inner = pipeline_layer_of(key, args)
        for name in (f"{layer}.{inner}", f"tied_modules.embedding.{inner}" if layer == 0 else ""):
            if name not in own:
                continue
            if own[name].shape != tensor.shape:
                raise CheckpointError(
                    f"checkpoint.load: {tag_dir} does not fit the run's model: {key} has shape "
                    f"{tuple(tensor.shape)} at TP={tp_size}, the run's {name} "
                    f"{tuple(own[name].shape)}"
                )
            sd[name] = tensor
    missing = sorted(set(own) - set(sd))
    if fresh_value_head:
        missing = [k for k in missing if k != f"{n + 2}.value.weight"]
    if missing:
        raise CheckpointError(
            f"checkpoint.load: {tag_dir} does not fit the run's model: no weights for "
            f"{missing[:5]} of this pipeline stage"
        )
    return sd


def load_weights(engine: Any, tag_dir: Path) -> None:
    """Load only the model weights of ``tag_dir`` into ``engine`` (any ZeRO stage, TP and PP).

    The weights come from :func:`megatron.ckpt.native.load_tp_shard`: this rank's TP shard
    (resharded when the checkpoint was written at another TP size; ZeRO-3 shards consolidated
    with DeepSpeed's ``zero_to_fp32`` one TP rank at a time; pipeline checkpoints read from their
    per-layer files). A pipeline run takes its stage's layers from the same shard, so it starts
    from pipeline and non-pipeline checkpoints alike, at any TP and PP size. Under ZeRO-3 the
    parameters are gathered, filled and re-partitioned; the optimizer's fp32 copies are then
    refreshed from them, as DeepSpeed's own ``load_module_only`` does.

    why not ``engine.load_checkpoint(load_module_only=True)``: at ZeRO-3 it rebuilds the weights
    with ``zero_to_fp32`` over the whole directory, which mixes the TP ranks' partitions (fails at
    TP > 1), needs optimizer partitions (a converted checkpoint has none) and reads ``latest``
    instead of the tag; a pipeline engine's per-layer load needs the checkpoint's own TP size and
    pipeline layout.

    Raises:
        CheckpointError: missing files, or weights that do not fit the model.
    """
    module = engine.module
    pipelined = not isinstance(module, GPTModel)
    run_head = getattr(module, "model_head", "lm") if pipelined else module.cfg.head
    swap = checkpoint_head(tag_dir) != run_head
    if swap and run_head != "value":
        raise CheckpointError(
            f"checkpoint.load: {tag_dir} is a reward model (model.head: value); a run with "
            "model.head: lm cannot start from it"
        )
    if swap:
        # an SFT / base model starts a reward model: its lm_head is dropped and the value head
        # keeps its initialisation (GPTModel / ValueHeadPipe)
        log_rank0("value head initialised N(0, 1/(h+1)); the checkpoint's lm head is unused")
    if not pipelined:
        args = dataclasses.replace(module.cfg, head="lm") if swap else module.cfg
        try:
            sd = load_tp_shard(tag_dir, args, module.state.tp_size, module.state.tp_rank)
        except ConversionError as e:
            raise CheckpointError(f"checkpoint.load: {e}") from e
        if swap:
            sd.pop("lm_head.weight", None)
    else:
        grid = engine.grid
        tp_size, tp_rank = grid.get_slice_parallel_world_size(), grid.get_slice_parallel_rank()
        sd = _pipeline_state_dict(module, tag_dir, tp_size, tp_rank, fresh_value_head=swap)
    # the value head's key on this rank, if it keeps its initialisation
    fresh = sorted(k for k in module.state_dict() if swap and k not in sd)
    deepspeed = import_deepspeed()
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0, enabled=bool(partitioned)):
        try:
            result = module.load_state_dict(sd, strict=not fresh)
        except RuntimeError as e:
            msg = f"checkpoint.load: {tag_dir} does not fit the run's model: {e}"
            raise CheckpointError(msg) from e
        if sorted(result.missing_keys) != fresh or result.unexpected_keys:
            raise CheckpointError(
                f"checkpoint.load: {tag_dir} does not fit the run's model (missing "
                f"{result.missing_keys}, unexpected {result.unexpected_keys})"
            )
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()


def preload_policy(cfg: Any, state: Any, **model_kwargs: Any) -> GPTModel | None:
    """The policy of a finetune start built from its checkpoint's weights, or ``None``.

    A non-pipeline run starting (``checkpoint.finetune``) from a checkpoint with the run's own
    head builds its model on the meta device and gives it this rank's TP shard
    (:func:`megatron.model.gpt.build_loaded`): no random initialisation to overwrite, and never
    a second copy of the weights at set-up. The weights are those :func:`load_weights` would
    load; :func:`load_checkpoint` is then told so (``weights_loaded``). Resumes, pipeline runs
    and head changes (a reward model from an SFT checkpoint) return ``None`` and load as before.

    Raises:
        CheckpointError: missing files, or weights that do not fit the model.
    """
    ck = cfg.checkpoint
    if not (ck.load and ck.finetune) or state.pp_size > 1:
        return None
    root, tag = resolve_checkpoint(ck.load)
    if checkpoint_head(root / tag) != cfg.model.head:
        return None
    try:
        shard = load_tp_shard(root / tag, cfg.model, state.tp_size, state.tp_rank, mmap=False)
        return build_loaded(cfg.model, state, shard, **model_kwargs)
    except (ConversionError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint.load: {root / tag} does not fit the run's model: {e}"
        ) from e


def checkpoint_head(tag_dir: Path) -> str:
    """``model.head`` of a checkpoint, from its saved ``config.yml`` (``lm`` when unset)."""
    try:
        _, config = read_checkpoint_config(tag_dir)
    except ConversionError as e:
        raise CheckpointError(f"checkpoint.load: {e}") from e
    return str((config.get("model") or {}).get("head") or "lm")


def load_checkpoint(
    engine: Any,
    load: str | Path,
    finetune: bool,
    tracker: RNGStatesTracker,
    config: Any | None = None,
    weights_loaded: bool = False,
) -> dict[str, Any] | None:
    """Load weights (``finetune``) or everything (full resume) from ``load``.

    ``weights_loaded``: a finetune start whose model was built from these weights
    (:func:`preload_policy`); only the checks and logs remain.

    The checkpoint was verified before launch (``megatron.training.checkpoint_verify``); this
    logs what that check accepted: a missing manifest (a checkpoint older than manifests) and,
    given the run's ``config``, each change a resume with ``checkpoint.allow_changes`` accepts.

    Returns:
        The client state for a full resume, ``None`` for ``finetune``.
    """
    root, tag = resolve_checkpoint(load)
    if not (root / tag / MANIFEST).is_file():
        log_rank0(
            "checkpoint.load: %s has no %s (saved before manifests existed): its files' sizes "
            "and checksums are not verified",
            root / tag,
            MANIFEST,
            level=logging.WARNING,
        )
    if config is not None and not finetune:
        from megatron.training.checkpoint_verify import accepted_changes

        for change in accepted_changes(config, root / tag):
            log_rank0("resume accepts a change (checkpoint.allow_changes): %s", change)
    if finetune:
        if not weights_loaded:
            load_weights(engine, root / tag)
        log_rank0("loaded checkpoint %s (weights only)", root / tag)
        return None
    client = _client_state(root / tag)
    if client.get("weights_only"):
        raise CheckpointError(
            f"{root / tag} holds weights only (written by tools/ckpts); it cannot be resumed: "
            "set checkpoint.finetune: true to start a run from it"
        )
    # why: DeepSpeed loads its files with weights_only=False; each is first proven to hold
    # tensors and plain data only (megatron.ckpt.safety), so a crafted file runs no code
    check_loadable(torch_files(root / tag))
    load_path, _ = engine.load_checkpoint(
        str(root),
        tag=tag,
        load_module_strict=True,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
        load_module_only=False,
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {root / tag}")
    log_rank0("loaded checkpoint %s (full resume)", root / tag)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    rng_file = root / tag / f"rng_state_rank{rank}.pt"
    if not rng_file.is_file():
        raise CheckpointError(_missing_rng_message(root / tag, rng_file, world))
    set_rng_state(safe_load(rng_file, allowed=NUMPY_GLOBALS), tracker)
    return client


def _missing_rng_message(tag_dir: Path, rng_file: Path, world: int) -> str:
    """Why ``rng_file`` is missing: an incomplete save, or a checkpoint of fewer ranks."""
    ranks = sorted(
        int(p.stem.removeprefix("rng_state_rank")) for p in tag_dir.glob("rng_state_rank*.pt")
    )
    try:
        listed = rng_file.name in (read_manifest(tag_dir) or {})
    except ValueError:
        listed = False
    if listed or not ranks or ranks != list(range(len(ranks))) or len(ranks) >= world:
        return (
            f"{rng_file} is missing: incomplete save ({tag_dir} holds the RNG files of ranks "
            f"{ranks}); resume from an earlier checkpoint, or set checkpoint.finetune: true to "
            "load weights only"
        )
    return (
        f"{rng_file} is missing: {tag_dir} was written by {len(ranks)} ranks, this run has "
        f"{world}; resume with the same number of ranks, or set checkpoint.finetune: true to "
        "load weights only"
    )
