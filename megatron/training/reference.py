"""Reference log-probabilities for objectives that compare the policy with a reference.

Three sources (``reference.source``, see :func:`megatron.config.validate.reference_source`):

* ``model`` — :class:`ReferenceModel`: a frozen copy of the policy's architecture on the same TP
  layout, evaluated under ``no_grad`` on every micro-batch (no optimizer state, never trained).
  Its weights come from ``reference.load``, else from the policy's *initial* weights: the
  ``checkpoint.load`` of a ``finetune`` start, or the seeded initialisation. A resumed run reuses
  what the run started from (recorded in the checkpoint), never the resumed policy weights.
* ``cache`` — :class:`ReferenceCache`: values precomputed by ``tools/precompute_reference.py``
  for every example of the run's train/valid data, looked up by the batch's ``example_ids``.
  The cache records a fingerprint of everything that determines the values (reference weights,
  tokenizer and data, the objective's reduction of token log-probs); a mismatch is an error
  naming what differs, never a silent reuse.
* ``none``.

In each case the objective turns reference token log-probs into what its loss consumes
(``objective.reference_log_probs(token_logps, batch, extra_logps=...)`` -> dict of ``[n]``
tensors), so the cache stores exactly those per-example values. They do not depend on how the
collator lays the examples out in rows (``data.layout``: padded, packed, prefix-shared, whose
extra targets reach the objective as ``extra_logps``), so neither does the cache key: a cache
computed under one layout serves them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron.ckpt.hf_config import ARCHITECTURE_FIELDS
from megatron.config import config_to_dict, read_config_file
from megatron.data.batch import Batch
from megatron.model import DTYPES, GPTModel
from megatron.model.gpt import build_loaded
from megatron.parallel import ParallelState
from megatron.training.checkpointing import CheckpointError, resolve_checkpoint
from megatron.training.step import forward_outputs
from megatron.utils import atomic_write_json, log_rank0, update_hash

CACHE_VERSION = 2
"""2: the data fingerprint leaves out the fields that only arrange rows (:data:`LAYOUT_FIELDS`)."""
LAYOUT_FIELDS = ("layout", "pad_to_multiple_of", "num_workers")
"""``data`` fields left out of the data fingerprint: they arrange (or load) the same examples
into rows differently but change no example's reference values (up to fp32 round-off of the
forward), so a cache computed under ``data.layout: padded`` is valid for ``packed`` and
``prefix_shared`` too."""


def initial_weights(cfg: Any, client_state: dict[str, Any] | None) -> str | None:
    """The reference checkpoint: explicit, recorded at the run's start, or the finetune source."""
    if cfg.reference.load:
        return cfg.reference.load
    if client_state is not None:  # a resumed run: whatever it started from
        return client_state.get("reference_load")
    return cfg.checkpoint.load if cfg.checkpoint.finetune else None


def architecture(model_cfg: Any) -> dict[str, Any]:
    """The fields of a ``model`` section (or its dict) that shape the weights and outputs."""
    d = config_to_dict(model_cfg) if not isinstance(model_cfg, dict) else dict(model_cfg)
    out = {k: d.get(k) for k in ARCHITECTURE_FIELDS}
    out["head"] = out["head"] or "lm"  # configs saved before model.head existed
    if out["norm"] != "layernorm":
        out["norm_bias"] = None  # RMSNorm has no bias: the flag does not change the model
    return out


def _check_architecture(tag_dir: Path, model_cfg: Any) -> None:
    """Refuse a reference checkpoint whose recorded architecture differs from the policy's."""
    cfg_file = tag_dir / "config.yml"
    if not cfg_file.is_file():
        return  # no recorded config: shapes are still checked when the weights load
    saved = read_config_file(cfg_file).get("model")
    if not saved:
        return
    want, got = architecture(model_cfg), architecture(saved)
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if diff:
        detail = ", ".join(
            f"model.{k}: policy {want.get(k)!r} vs reference {got.get(k)!r}" for k in diff
        )
        raise CheckpointError(
            f"reference.load: {tag_dir} holds a different architecture than the policy ({detail})"
        )


class ReferenceModel:
    """Frozen reference model beside the policy (same TP layout; see module docstring).

    Args:
        cfg: the run config.
        state: the parallel grid (TP only; pipeline runs use the cache).
        device: where to run it.
        load: native checkpoint to read (any ZeRO stage, any TP size: resharded on load), or
            ``None`` for the seeded initialisation of the policy.
        logprob_temperature: score targets under ``softmax(logits / T)`` (online RL, as the
            policy does).
    """

    def __init__(
        self,
        cfg: Any,
        state: ParallelState,
        device: torch.device,
        load: str | None,
        logprob_temperature: float = 1.0,
    ):
        dtype = DTYPES[cfg.training.precision]
        kwargs = {"seed": cfg.training.seed, "logprob_temperature": logprob_temperature}
        if load:
            from megatron.ckpt.native import load_tp_shard

            root, tag = resolve_checkpoint(load)
            _check_architecture(root / tag, cfg.model)
            shard = load_tp_shard(root / tag, cfg.model, state.tp_size, state.tp_rank, mmap=False)
            # built on the meta device and given the loaded tensors: one copy of the weights
            self.model = build_loaded(cfg.model, state, shard, **kwargs)
            del shard
            log_rank0("reference model: %s", root / tag)
        else:
            self.model = GPTModel(cfg.model, state, **kwargs)
            log_rank0("reference model: the policy's seeded initialisation")
        self.model.to(device=device, dtype=dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.load = load

    @torch.no_grad()
    def outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Reference log-probs of the batch's targets: ``{"token_logps": [b, s] fp32}``, plus
        ``"extra_logps": [k] fp32`` when the batch has extra targets (prefix-shared rows)."""
        out = forward_outputs(self.model, batch)
        keep = ("token_logps", "extra_logps")
        return {k: out[k] for k in keep if k in out}

    @torch.no_grad()
    def kl_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(final hidden states [b, s, h], this rank's output rows [v/p, h])`` over the batch:
        what the policy's forward needs for the exact KL to this model (``kl_reference``)."""
        hidden = self.model(batch.tokens, batch.layout)  # [b, s, h]
        return hidden, self.model.output_weight()


@dataclasses.dataclass(frozen=True)
class ReferenceKL:
    """The step's reference for objectives whose loss is the exact KL to a frozen model
    (``needs_reference_hidden``): no log-probs (``__call__`` gives ``None``), the reference's
    hidden states and output rows for the policy's forward instead."""

    model: ReferenceModel

    def __call__(self, batch: Batch, split: str) -> None:
        return None

    def kl_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.kl_inputs(batch)


# ---- cache ------------------------------------------------------------------------------------
def weights_fingerprint(cfg: Any, load: str | None) -> str:
    """sha256 of the reference weights' files, or of the architecture + seed when seeded."""
    h = hashlib.sha256()
    if load is None:
        h.update(
            json.dumps(
                # every model field: the seeded weights also depend on e.g. init_method_std
                {"seeded": cfg.training.seed, **config_to_dict(cfg.model)},
                sort_keys=True,
                default=str,
            ).encode()
        )
        return h.hexdigest()
    root, tag = resolve_checkpoint(load)
    files = sorted(p for p in (root / tag).iterdir() if p.name.endswith("model_states.pt"))
    for p in files:
        h.update(p.name.encode())
        update_hash(h, p)
    return h.hexdigest()


def data_fingerprint(cfg: Any, split: str) -> str:
    """sha256 over the data config (less :data:`LAYOUT_FIELDS`) and every source's meta.json
    (which holds source hashes)."""
    from megatron.data.meta import read_meta

    d = config_to_dict(cfg.data)
    kept = {k: v for k, v in d.items() if k not in LAYOUT_FIELDS}
    h = hashlib.sha256(json.dumps({"split": split, **kept}, sort_keys=True, default=str).encode())
    for key in ("train", "valid", "test"):
        for src in d.get(key) or []:
            h.update(json.dumps(read_meta(src["path"]), sort_keys=True).encode())
    return h.hexdigest()


def cache_key(cfg: Any, objective: Any, load: str | None) -> dict[str, str]:
    """What a cache's values depend on, field by field (compared one by one on load)."""
    reduction = getattr(objective, "reference_cache_params", lambda: {})()
    return {
        "version": str(CACHE_VERSION),
        "weights": weights_fingerprint(cfg, load),
        "data": data_fingerprint(cfg, "all"),
        "objective": json.dumps({"name": cfg.objective.name, **reduction}, sort_keys=True),
    }


def check_cache(path: str | Path, expected: dict[str, str]) -> dict[str, Any]:
    """The cache's ``meta.json`` after checking it was computed for ``expected`` (:func:`cache_key`).

    Raises:
        CheckpointError: no cache there, or one computed for other weights, data or objective.
    """
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(
            f"reference.cache: {path} holds no meta.json; write the cache with "
            "tools/precompute_reference.py"
        )
    meta = json.loads(meta_file.read_text())
    diff = [k for k in expected if meta.get("key", {}).get(k) != expected[k]]
    if diff:
        raise CheckpointError(
            f"reference.cache: {path} was computed for different {', '.join(diff)} than "
            "this run (the fingerprints differ); recompute it with tools/precompute_reference.py"
        )
    return meta


def expected_cache_key(cfg: Any, objective: Any) -> dict[str, str]:
    """:func:`cache_key` of the run before it starts: the reference weights it will use come
    from ``reference.load``, the resumed checkpoint's record, or the finetune source."""
    client = None
    if cfg.checkpoint.load and not cfg.checkpoint.finetune:
        root, tag = resolve_checkpoint(cfg.checkpoint.load)
        state = root / tag / "client_state.json"
        client = json.loads(state.read_text()) if state.is_file() else None
    return cache_key(cfg, objective, initial_weights(cfg, client))


class ReferenceCache:
    """Per-example reference values (``SPLIT.npz``: one array per key, row = example id)."""

    def __init__(self, path: str | Path, expected: dict[str, str]) -> None:
        self.path = Path(path)
        meta = check_cache(self.path, expected)
        self.splits = {s: dict(np.load(self.path / f"{s}.npz")) for s in meta["splits"]}

    def lookup(self, batch: Batch, split: str) -> dict[str, torch.Tensor]:
        """The cached values of the batch's examples (``batch.example_ids``) in ``split``."""
        if batch.example_ids is None:
            raise ValueError("a reference-cache lookup needs the batch's example_ids")
        ids = batch.example_ids.cpu().numpy()
        device = batch.example_ids.device
        return {k: torch.from_numpy(v[ids]).to(device) for k, v in self.splits[split].items()}


def write_cache(
    path: str | Path, key: dict[str, str], splits: dict[str, dict[str, np.ndarray]]
) -> None:
    """Write a cache atomically enough: arrays first, ``meta.json`` (the commit point) last."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "meta.json").unlink(missing_ok=True)
    for split, arrays in splits.items():
        tmp = path / f".{split}.tmp.npz"
        np.savez(tmp, **arrays)
        tmp.replace(path / f"{split}.npz")
    atomic_write_json(
        path / "meta.json", {"key": key, "splits": sorted(splits), "version": CACHE_VERSION}
    )


@dataclasses.dataclass(frozen=True)
class ReferenceProvider:
    """Gives ``objective.loss`` its ``reference`` argument for a micro-batch."""

    objective: Any
    model: ReferenceModel | None = None
    cache: ReferenceCache | None = None

    def __call__(self, batch: Batch, split: str) -> dict[str, torch.Tensor] | None:
        """Reference values of ``batch``, whose examples are rows of ``split`` (the cache is
        indexed by split; the reference model ignores it)."""
        if self.cache is not None:
            return self.cache.lookup(batch, split)
        if self.model is not None:
            return reference_values(self.model, self.objective, batch)
        return None


def reference_values(
    model: ReferenceModel, objective: Any, batch: Batch
) -> dict[str, torch.Tensor]:
    """``objective.reference_log_probs`` of a batch through the reference model, its side
    sub-batches (``objective.side_batches``) and extra targets included.

    Args:
        model: anything with ``outputs(batch) -> {"token_logps": [b, s], "extra_logps": [k]?}``
            (a :class:`ReferenceModel`).
        objective: the registered objective.
        batch: the micro-batch.

    Returns:
        The objective's per-example reference values (e.g. DPO's ``chosen_logps [P]``).
    """
    out = model.outputs(batch)
    side = {
        name: model.outputs(batch.sub_batches[name])
        for name in objective.side_batches
        if name in batch.sub_batches
    }
    kwargs: dict[str, Any] = {"side": side} if side else {}
    if "extra_logps" in out:
        kwargs["extra_logps"] = out["extra_logps"]
    return objective.reference_log_probs(out["token_logps"], batch, **kwargs)


def _rank_rows(n: int, state: ParallelState) -> np.ndarray:
    return np.array_split(np.arange(n), state.dp_size)[state.dp_rank]


@torch.no_grad()
def _compute_split(
    dataset: Any,
    collate: Any,
    model: ReferenceModel,
    objective: Any,
    state: ParallelState,
    micro: int,
    device: torch.device,
    progress: Any,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rows = _rank_rows(len(dataset), state)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(rows), micro):
        ids = rows[start : start + micro].tolist()
        batch = collate([dataset[i] for i in ids]).replace(
            example_ids=torch.tensor(ids, dtype=torch.long)
        )
        batch = batch.to(device)
        for k, v in reference_values(model, objective, batch).items():
            parts.setdefault(k, []).append(v.float().cpu().numpy())
        progress.update(len(ids))
    return rows, {k: np.concatenate(v) for k, v in parts.items()}


def precompute_reference(cfg: Any) -> Path:
    """Compute the reference cache of ``cfg``'s train/valid data into ``reference.cache``.

    Collective over the launched ranks: data-parallel ranks share the examples, tensor-parallel
    ranks share each forward; any TP x DP grid gives the same values (to fp32 round-off).

    Returns:
        The cache directory.
    """
    import torch.distributed as dist
    from tqdm import tqdm

    from megatron.data.builders import build_data
    from megatron.objectives import get_objective
    from megatron.training.distributed import init_distributed
    from megatron.utils import global_rank

    if cfg.parallel.pipeline != 1:
        raise ValueError("precompute the reference with parallel.pipeline=1 (any TP x DP grid)")
    device = init_distributed().device
    state = ParallelState.build(cfg.parallel.tensor, 1)
    objective = get_objective(cfg.objective.name)(cfg.objective.params)
    load = initial_weights(cfg, None)
    model = ReferenceModel(cfg, state, device, load)
    kind = type(objective).batch_kind
    data = build_data(
        kind, cfg.data, cfg.model.vocab_size, objective.collate_options(pipeline=False)
    )
    splits: dict[str, dict[str, np.ndarray]] = {}
    for name, ds in (("train", data.train), ("valid", data.valid)):
        if ds is None:
            continue
        bar = tqdm(total=len(ds), desc=f"reference {name}", disable=global_rank() != 0)
        bar.update(0)
        mine = _compute_split(
            ds,
            data.collate,
            model,
            objective,
            state,
            cfg.training.micro_batch_size,
            device,
            _Progress(bar, state.dp_size),
        )
        bar.close()
        gathered = [mine]
        if dist.is_initialized() and state.dp_size > 1:
            gathered = [None] * state.dp_size
            dist.all_gather_object(gathered, mine, group=state.dp_group)
        keys = sorted(gathered[0][1])
        splits[name] = {
            k: np.concatenate([g[1][k] for g in gathered])[
                np.argsort(np.concatenate([g[0] for g in gathered]))
            ]
            for k in keys
        }
    path = Path(cfg.reference.cache)
    if global_rank() == 0:
        write_cache(path, cache_key(cfg, objective, load), splits)
        log_rank0(
            "reference cache written to %s (%s)",
            path,
            ", ".join(f"{k}: {len(next(iter(v.values())))} examples" for k, v in splits.items()),
        )
    if dist.is_initialized():
        dist.barrier()
    return path


class _Progress:
    """Counts this rank's examples as the whole grid's (ranks progress at the same pace)."""

    def __init__(self, bar: Any, dp: int) -> None:
        self.bar, self.dp = bar, dp

    def update(self, n: int) -> None:
        self.bar.update(n * self.dp)
