"""The conversions behind ``tools/ckpts/``: Hugging Face -> native, native -> Hugging Face, and
native TP resharding. Each checks its whole input first (config, every tensor's key and shape, the
tokenizer's vocabulary, the TP size) and writes nothing when something is wrong.

A converted native checkpoint ``OUT`` is a weights-only start point for
``checkpoint.load: OUT`` + ``checkpoint.finetune: true``::

    OUT/
      latest                          # "iter_0000000", written last
      iter_0000000/
        mp_rank_{r:02d}_model_states.pt   # TP rank r's GPTModel state dict (DeepSpeed layout)
        (--pp > 1: layer_{i:02d}-model_{r:02d}-model_states.pt per pipeline layer i and TP
        rank r, and mp_rank_{k:02d}_model_states.pt without weights for the PP x TP ranks)
        client_state.json             # {"step": 0, "weights_only": true, "source": {...}}
        config.yml                    # model section (derived keys included) + parallel
      model.yml                       # the `model:` section to merge into run configs
      hf/                             # config.json, generation_config.json, tokenizer files

Reward models: a Hugging Face ``*ForSequenceClassification`` with ``num_labels: 1`` converts to a
``model.head: value`` checkpoint (``score.weight`` -> ``value_head.weight``), and a ``head: value``
checkpoint exports as one, with the ``pad_token_id`` chosen by :func:`reward_pad_token_id`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from megatron.ckpt import ConversionError
from megatron.ckpt.hf_config import (
    HF_CLASS_NAMES,
    HF_VALUE_CLASS_NAMES,
    NEOX_ACTIVATIONS,
    SUPPORTED_ARCHITECTURES,
    architecture_mismatches,
    hf_config_kwargs,
    infer_architecture,
    model_config_from_hf,
    model_config_from_section,
    model_section,
    with_tp_padding,
)
from megatron.ckpt.hf_io import (
    HFWeights,
    SafetensorsWriter,
    check_tokenizer_vocab,
    copy_hf_extras,
    copy_tokenizer,
    read_hf_config,
)
from megatron.ckpt.hf_mapping import (
    check_native_shards,
    check_tp,
    iter_hf_from_native,
    iter_native_from_hf,
    iter_resharded,
    native_shapes,
)
from megatron.ckpt.layout import CheckpointError, resolve_checkpoint, tag_for
from megatron.ckpt.manifest import CHECKPOINT_FORMAT, write_manifest
from megatron.ckpt.native import (
    checkpoint_tp_size,
    read_model_shards,
    write_layer_states,
    write_model_states,
)
from megatron.ckpt.run_tokenizer import (
    is_tokenizer_dir,
    tokenizer_special_ids,
    write_chat_template,
)
from megatron.config import ModelConfig
from megatron.utils import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``--dtype`` choices."""
HF_DIR = "hf"
"""Subdirectory of a converted checkpoint holding the source's config, generation config and
tokenizer (usable as ``data.tokenizer`` and as the template of the way back)."""
MODEL_YAML = "model.yml"
# config.json keys rebuilt from the native model rather than taken from a template.
_TEMPLATE_DROP = frozenset(
    (
        "model_type architectures transformers_version _name_or_path dtype torch_dtype auto_map "
        "rope_parameters rope_scaling rope_theta rotary_pct rotary_emb_base partial_rotary_factor "
        "layer_types use_sliding_window sliding_window max_window_layers head_dim "
        "id2label label2id problem_type"
    ).split()
)


def _progress(items: Iterable[Any], total: int | None, desc: str, show: bool) -> Iterable[Any]:
    from tqdm.auto import tqdm

    return tqdm(
        items, total=total, desc=desc, unit=" tensors", disable=not show, dynamic_ncols=True
    )


def _check_grid(tp_size: int, pp_size: int) -> None:
    if tp_size < 1:
        raise ConversionError(f"--tp {tp_size}: must be >= 1")
    if pp_size < 1:
        raise ConversionError(f"--pp {pp_size}: must be >= 1")


def _check_pp(args: ModelConfig, pp_size: int) -> None:
    if pp_size > args.num_layers:
        raise ConversionError(
            f"--pp {pp_size}: a pipeline stage needs at least one of the model's "
            f"{args.num_layers} transformer layers"
        )


def _fresh_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out} exists and is not empty; choose a new output directory")
    out.mkdir(parents=True, exist_ok=True)


def _yaml(data: Any, header: str) -> str:
    import yaml

    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def _write_native(
    out: Path,
    items: Iterable[tuple[str, list[torch.Tensor]]],
    args: ModelConfig,
    tp_size: int,
    pp_size: int = 1,
    *,
    dtype: torch.dtype | None,
    source: dict[str, Any],
    show_progress: bool,
) -> Path:
    """Collect streamed shards per TP rank and write a weights-only checkpoint; ``latest`` last.

    At ``pp_size > 1`` the weights go into DeepSpeed's per-layer pipeline files.
    """
    tag = tag_for(0)
    tag_dir = out / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    rank_sds: list[OrderedDict[str, torch.Tensor]] = [OrderedDict() for _ in range(tp_size)]
    for key, shards in _progress(items, len(native_shapes(args)), "converting", show_progress):
        for sd, shard in zip(rank_sds, shards, strict=True):
            shard = shard if dtype is None else shard.to(dtype)
            # why: torch.save writes a view's whole storage (e.g. of a tensor loaded with mmap).
            compact = shard.untyped_storage().nbytes() == shard.nbytes
            sd[key] = shard if compact else shard.clone()
    for rank in range(tp_size):
        if pp_size == 1:
            write_model_states(tag_dir, rank, tp_size, rank_sds[rank])
        else:
            write_layer_states(tag_dir, rank, rank_sds[rank], args)
        rank_sds[rank].clear()  # release this rank's tensors before saving the next
    if pp_size > 1:
        # why: DeepSpeed's PipelineEngine.load_checkpoint opens one mp_rank file per model rank
        # (PP x TP of them) and, finding module None there, reads the per-layer files.
        for rank in range(pp_size * tp_size):
            write_model_states(tag_dir, rank, pp_size * tp_size, None)
    section = model_section(args)
    resolved = {**section, "kv_channels": args.kv_channels}
    resolved["padded_vocab_size"] = args.padded_vocab_size
    parallel = {"tensor": tp_size, "pipeline": pp_size}
    header = "# Written by megatron.ckpt.convert; weights-only checkpoint (finetune: true).\n"
    atomic_write_text(
        tag_dir / "config.yml", _yaml({"model": resolved, "parallel": parallel}, header)
    )
    client = {"step": 0, "weights_only": True, "source": source, "format": CHECKPOINT_FORMAT}
    client["dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else "as source"
    atomic_write_json(tag_dir / "client_state.json", client)
    model_header = (
        f"# Model of {source.get('path')}; merge into a run config and set parallel.tensor: "
        f"{tp_size}, parallel.pipeline: {pp_size} (or load at another size) with "
        f"checkpoint.load: {out} and checkpoint.finetune: true.\n"
    )
    atomic_write_text(out / MODEL_YAML, _yaml({"model": section}, model_header))
    write_manifest(tag_dir)  # after every file of the tag, before `latest`
    atomic_write_text(out / "latest", tag + "\n")
    return tag_dir


def _hf_model_config(
    hf_dir: Path, raw: dict[str, Any], tp_size: int, divisible_by: int
) -> ModelConfig:
    arch = raw.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        names = ", ".join(raw.get("architectures") or []) or "no architectures listed"
        raise ConversionError(
            f"{hf_dir / 'config.json'}: architecture {arch!r} ({names}) is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    from transformers import AutoConfig

    try:
        args = model_config_from_hf(AutoConfig.from_pretrained(hf_dir), tp_size, divisible_by)
        model_section(args)
        check_tp(args, tp_size)
    except ValueError as e:
        raise ConversionError(f"{hf_dir}: {e}") from e
    return args


def convert_hf_to_native(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    tp_size: int = 1,
    pp_size: int = 1,
    dtype: str | None = None,
    divisible_by: int = 128,
    show_progress: bool = False,
) -> Path:
    """Convert a Hugging Face ``*ForCausalLM`` directory into a native weights-only checkpoint.

    A ``*ForSequenceClassification`` with ``num_labels: 1`` (a reward model) gives a
    ``model.head: value`` checkpoint, its ``score.weight`` as ``value_head.weight``.

    Args:
        hf_dir: the Hugging Face model directory (config.json, safetensors or .bin weights).
        out_dir: new (or empty) output directory; layout in the module docstring.
        tp_size: tensor-parallel size to shard for.
        pp_size: pipeline-parallel size; above 1 the weights are written in DeepSpeed's
            per-layer pipeline layout (any PP size of the run can load it).
        dtype: ``fp32``, ``bf16`` or ``fp16`` for the written weights; None keeps the source's.
        divisible_by: ``model.make_vocab_size_divisible_by`` (vocabulary padding).
        show_progress: show a progress bar on stderr.

    Returns:
        The ``iter_0000000`` directory.

    Raises:
        ConversionError: unsupported architecture, missing files, shapes or vocabulary that do
            not match the config, a TP size that does not divide the model, or a sequence
            classifier with ``num_labels != 1``.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    _check_grid(tp_size, pp_size)
    raw = read_hf_config(hf_dir)
    args = _hf_model_config(hf_dir, raw, tp_size, divisible_by)
    _check_pp(args, pp_size)
    weights = HFWeights(hf_dir)
    check_tokenizer_vocab(hf_dir, args.vocab_size)
    try:
        for _ in iter_native_from_hf(weights.meta(), args, tp_size):
            pass  # every key and shape is checked before anything is written
    except ValueError as e:
        raise ConversionError(f"{hf_dir}: {e}") from e
    _fresh_dir(out_dir)
    source = {
        "format": "huggingface",
        "path": str(hf_dir.resolve()),
        "model_type": raw["model_type"],
        "architectures": raw.get("architectures"),
    }
    tag_dir = _write_native(
        out_dir,
        iter_native_from_hf(weights, args, tp_size),
        args,
        tp_size,
        pp_size,
        dtype=DTYPES[dtype] if dtype else None,
        source=source,
        show_progress=show_progress,
    )
    copy_hf_extras(hf_dir, out_dir / HF_DIR)
    return tag_dir


def _checkpoint(ckpt: str | Path, config: Mapping[str, Any]) -> tuple[Path, ModelConfig]:
    """``(tag dir, model config padded for the checkpoint's TP)``."""
    try:
        root, tag = resolve_checkpoint(ckpt)
    except CheckpointError as e:
        raise ConversionError(str(e)) from e
    tag_dir = root / tag
    if not isinstance(config.get("model"), Mapping):
        raise ConversionError(f"{tag_dir / 'config.yml'}: has no 'model' section")
    tp = checkpoint_tp_size(tag_dir)
    try:
        args = model_config_from_section(config["model"], tp)
    except ValueError as e:
        raise ConversionError(f"{tag_dir / 'config.yml'}: {e}") from e
    return tag_dir, args


def _read_shards(tag_dir: Path, args: ModelConfig, fp32_master: bool) -> list[dict]:
    shards = read_model_shards(tag_dir, fp32_master)
    try:
        check_native_shards(shards, args)
    except ValueError as e:
        raise ConversionError(f"{tag_dir}: weights do not match config.yml: {e}") from e
    return shards


def build_hf_config(
    args: ModelConfig,
    arch: str,
    template: Mapping[str, Any] | None = None,
    pad_token_id: int | None = None,
    token_ids: Mapping[str, int | None] | None = None,
) -> Any:
    """A transformers config for ``args`` as ``arch``, keeping a template's other fields.

    A ``model.head: value`` model gets ``architectures: [<Arch>ForSequenceClassification]``,
    ``num_labels: 1`` and ``pad_token_id`` (see :func:`reward_pad_token_id`).

    Args:
        args: the native model.
        arch: target ``model_type``.
        template: a ``config.json`` (e.g. the source model's) whose non-architectural fields
            (token ids, ...) are kept when its ``model_type`` is ``arch``.
        pad_token_id: a reward model's ``pad_token_id`` (None: none is written).
        token_ids: ``bos_token_id``/``eos_token_id``/``pad_token_id`` (the tokenizer's), used
            when no template is (instead of transformers' per-architecture defaults).

    Raises:
        ConversionError: ``arch`` cannot express ``args``, or the built config would map back
            to a different model.
    """
    from transformers import AutoConfig

    try:
        kw = hf_config_kwargs(args, arch)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    base = {}
    if template and template.get("model_type") == arch:
        base = {k: v for k, v in template.items() if k not in _TEMPLATE_DROP}
    elif token_ids:
        kw.update(token_ids)
    if NEOX_ACTIVATIONS.get(base.get("hidden_act")) == args.activation:
        kw["hidden_act"] = base["hidden_act"]  # e.g. keep gelu_new: same function, same kernel
    if args.head == "value":
        kw.update(num_labels=1, pad_token_id=pad_token_id)
    cfg = AutoConfig.for_model(arch, **{**base, **kw})
    names = HF_VALUE_CLASS_NAMES if args.head == "value" else HF_CLASS_NAMES
    cfg.architectures = [names[arch]]
    back = model_config_from_hf(cfg, 1, args.make_vocab_size_divisible_by)
    back = dataclasses.replace(back, padded_vocab_size=args.padded_vocab_size)
    mismatches = architecture_mismatches(back, args)
    if mismatches:
        raise ConversionError(
            f"a {arch!r} config would not describe this model: {'; '.join(mismatches)}"
        )
    return cfg


def _token_ids(value: Any) -> set[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, list | tuple):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def _tokenizer_pad_eos(tokenizer_dir: Path | None) -> tuple[int | None, set[int]]:
    """``(pad id or None, eos ids)`` of the Hugging Face tokenizer in ``tokenizer_dir``."""
    if tokenizer_dir is None or not any(
        (tokenizer_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        return None, set()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; the pad is optional
        logger.warning("%s: cannot load the tokenizer for its pad token (%s)", tokenizer_dir, e)
        return None, set()
    return tok.pad_token_id, _token_ids(tok.eos_token_id)


def reward_pad_token_id(
    explicit: int | None,
    tokenizer_dir: Path | None,
    template: Mapping[str, Any] | None,
    vocab_size: int,
) -> int | None:
    """The ``pad_token_id`` a reward model's ``config.json`` gets, and why.

    Hugging Face's ``*ForSequenceClassification`` scores each row at its last token that is not
    ``pad_token_id`` (so right- and left-padded batches both work); our value head scores a
    sequence at its last token (``objective.score_token: last``). The two agree only when the pad
    id never ends a real sequence. The pad id is, first found: ``explicit``; the tokenizer's pad
    token (in ``tokenizer_dir``); the template's ``pad_token_id``. Without one, none is written
    and transformers scores only one unpadded row per batch (it refuses larger batches).

    A pad id equal to an EOS id is written but warned about: string rows end with EOS (the data
    pipeline appends it), so HF would score such rows one token early.

    Raises:
        ConversionError: a pad id outside the vocabulary.
    """
    tok_pad, eos = _tokenizer_pad_eos(tokenizer_dir)
    template = template or {}
    eos |= _token_ids(template.get("eos_token_id"))
    candidates = [
        (explicit, "--pad-token-id"),
        (tok_pad, f"the pad token of {tokenizer_dir}"),
        (template.get("pad_token_id"), "pad_token_id of the template config.json"),
    ]
    found = [(pad, source) for pad, source in candidates if pad is not None]
    if not found:
        logger.warning(
            "reward model export: no pad token id (none given, the tokenizer has no pad token "
            "and the template config none); config.json gets pad_token_id: null, so "
            "transformers scores only batches of one unpadded row. Pass --pad-token-id ID with "
            "an id that never ends a real sequence (e.g. an unused special token)"
        )
        return None
    pad, source = found[0]
    if not isinstance(pad, int) or not 0 <= pad < vocab_size:
        raise ConversionError(
            f"{source}: pad token id {pad!r} is not in the model's vocabulary [0, {vocab_size})"
        )
    if pad in eos:
        logger.warning(
            "reward model export: pad_token_id %d (from %s) is an EOS id. Transformers scores "
            "each row at its last token that is not the pad id, so every sequence ending with "
            "EOS (all string prompt/completion rows: EOS is appended) is scored one token early "
            "and disagrees with training. Pass --pad-token-id with an id that never ends a "
            "real sequence",
            pad,
            source,
        )
    logger.info("reward model export: pad_token_id %d from %s", pad, source)
    return pad


def convert_native_to_hf(
    ckpt: str | Path,
    out_dir: str | Path,
    *,
    config: Mapping[str, Any],
    arch: str | None = None,
    extras_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    chat_template: str | None = None,
    dtype: str | None = None,
    fp32_master: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    pad_token_id: int | None = None,
    show_progress: bool = False,
) -> Path:
    """Convert a native checkpoint (any TP and PP size, any ZeRO stage) to a Hugging Face
    directory.

    A reward model (``model.head: value``) is written as ``<Arch>ForSequenceClassification``
    (``num_labels: 1``, ``score.weight`` = ``value_head.weight``, no ``lm_head``, and a
    ``pad_token_id`` from :func:`reward_pad_token_id`); no generation config is made for it.

    Args:
        ckpt: a checkpoint directory (with ``latest``) or one of its ``iter_*`` directories.
        out_dir: new (or empty) output directory.
        config: the checkpoint's ``config.yml`` as plain data (its ``model`` section is used).
        arch: target ``model_type``; default the template's, else inferred
            (:func:`~megatron.ckpt.hf_config.infer_architecture`).
        extras_dir: a Hugging Face directory (the source model, or a converted checkpoint's
            ``hf/``) whose config fields and generation config are carried over.
        tokenizer_dir: the tokenizer to carry (its files are copied and its vocabulary checked);
            default ``extras_dir``. When no template ``config.json`` applies (none, or one of
            another ``model_type``) its bos/eos/pad ids go into ``config.json`` and the
            generation config (see
            :func:`megatron.ckpt.run_tokenizer.find_run_tokenizer` for finding the run's).
        chat_template: a Jinja chat template to write into the exported tokenizer (see
            :func:`megatron.ckpt.run_tokenizer.training_chat_template`); None: the tokenizer's.
        dtype: ``fp32``, ``bf16`` or ``fp16``; None keeps the checkpoint's.
        fp32_master: ZeRO 1-2: export the fp32 master weights (see
            :func:`megatron.ckpt.native.read_model_shard`).
        max_shard_bytes: safetensors shard size.
        pad_token_id: reward models: the ``pad_token_id`` to write (None: the tokenizer's, else
            the template's; see :func:`reward_pad_token_id`).
        show_progress: show a progress bar on stderr.

    Returns:
        ``out_dir``, loadable with ``AutoModelForCausalLM.from_pretrained`` (reward models:
        ``AutoModelForSequenceClassification``).

    Raises:
        ConversionError: missing files, weights that do not match ``config``, an architecture
            that cannot express the model, or a pad id outside the vocabulary.
    """
    out_dir = Path(out_dir)
    tag_dir, args = _checkpoint(ckpt, config)
    extras = Path(extras_dir) if extras_dir else None
    template = read_hf_config(extras) if extras and (extras / "config.json").is_file() else None
    tokenizer = Path(tokenizer_dir) if tokenizer_dir else extras
    arch = arch or (template or {}).get("model_type") or infer_architecture(args)
    pad = None
    if args.head == "value":
        pad = reward_pad_token_id(pad_token_id, tokenizer, template, args.vocab_size)
    token_ids = None
    if (template or {}).get("model_type") != arch and is_tokenizer_dir(tokenizer):
        token_ids = tokenizer_special_ids(tokenizer)
    hf_config = build_hf_config(args, arch, template, pad_token_id=pad, token_ids=token_ids)
    if tokenizer:
        check_tokenizer_vocab(tokenizer, args.vocab_size)
    shards = _read_shards(tag_dir, args, fp32_master)
    out_dtype = DTYPES[dtype] if dtype else shards[0]["embedding.weight"].dtype
    meta = [{k: torch.empty(t.shape, device="meta") for k, t in sd.items()} for sd in shards]
    total = sum(1 for _ in iter_hf_from_native(meta, args, arch))
    _fresh_dir(out_dir)
    writer = SafetensorsWriter(out_dir, max_shard_bytes)
    for name, t in _progress(
        iter_hf_from_native(shards, args, arch), total, "exporting", show_progress
    ):
        writer.add(name, t.to(out_dtype))
    writer.close()
    hf_config.dtype = out_dtype
    hf_config.save_pretrained(out_dir)
    copied = copy_hf_extras(extras, out_dir, with_config=False) if extras else []
    if tokenizer and tokenizer != extras:
        copy_tokenizer(tokenizer, out_dir)  # replaces the template's tokenizer files
    if chat_template is not None:
        write_chat_template(out_dir, chat_template)
    if "generation_config.json" not in copied and args.head != "value":
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(hf_config).save_pretrained(out_dir)
    return out_dir


def reshard(
    ckpt: str | Path,
    out_dir: str | Path,
    *,
    config: Mapping[str, Any],
    tp_size: int,
    pp_size: int = 1,
    show_progress: bool = False,
) -> Path:
    """Write the weights of a native checkpoint (any TP and PP size) at another TP and PP size
    (weights only).

    Args:
        ckpt: a checkpoint directory (with ``latest``) or one of its ``iter_*`` directories.
        out_dir: new (or empty) output directory (same layout as :func:`convert_hf_to_native`).
        config: the checkpoint's ``config.yml`` as plain data.
        tp_size: the new TP size.
        pp_size: the new pipeline-parallel size (above 1: DeepSpeed's per-layer layout).
        show_progress: show a progress bar on stderr.

    Returns:
        The new ``iter_0000000`` directory.

    Raises:
        ConversionError: missing files, weights that do not match ``config``, or a TP size that
            does not divide the model.
    """
    _check_grid(tp_size, pp_size)
    out_dir = Path(out_dir)
    tag_dir, old = _checkpoint(ckpt, config)
    new = with_tp_padding(old, tp_size)
    try:
        check_tp(new, tp_size)
    except ValueError as e:
        raise ConversionError(f"--tp {tp_size}: {e}") from e
    _check_pp(new, pp_size)
    shards = _read_shards(tag_dir, old, fp32_master=False)
    client_path = tag_dir / "client_state.json"
    step = json.loads(client_path.read_text()).get("step") if client_path.is_file() else None
    _fresh_dir(out_dir)
    source = {"format": "native", "path": str(tag_dir.resolve()), "tp": len(shards), "step": step}
    new_tag = _write_native(
        out_dir,
        iter_resharded(shards, old, new, tp_size),
        new,
        tp_size,
        pp_size,
        dtype=None,
        source=source,
        show_progress=show_progress,
    )
    if (tag_dir.parent / HF_DIR).is_dir():
        shutil.copytree(tag_dir.parent / HF_DIR, out_dir / HF_DIR)
    return new_tag
