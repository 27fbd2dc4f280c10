"""Hugging Face config <-> native ``model`` section (:class:`~megatron.config.ModelConfig`).

Supported ``model_type`` values: ``llama``, ``mistral``, ``qwen2`` and ``gpt_neox``. Checked against
transformers 5.24 (``tests/ckpt/test_hf_parity.py``, ``tests/ckpt/test_convert.py``).

* :func:`model_config_from_hf`: a transformers config -> :class:`~megatron.config.ModelConfig`
  (what :class:`~megatron.model.gpt.GPTModel` reads), its derived fields filled for a TP size.
  A ``*ForSequenceClassification`` config with ``num_labels: 1`` is a reward model:
  ``head: value``.
* :func:`hf_config_kwargs`: a ``ModelConfig`` -> keyword arguments of the transformers config
  class, refusing anything the target architecture cannot express.
* :func:`model_section` / :func:`model_config_from_section`: ``ModelConfig`` <-> the ``model:``
  YAML section (plain data) that :func:`megatron.config.load_config` reads.

Everything here works on plain objects and dicts; transformers is never imported.

A converted model may hold what a YAML ``model:`` section cannot set: ``kv_channels`` (Hugging
Face's ``head_dim``) other than hidden_size / num_attention_heads. The converters keep it on the
``ModelConfig`` they build in code; :func:`model_section` refuses to write such a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from megatron.config import ModelConfig, RopeScaling
from megatron.config.sections import is_derived, padded_vocab_size

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt_neox")
_LLAMA_LIKE = ("llama", "mistral", "qwen2")
HF_CLASS_NAMES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
}
"""The ``architectures`` entry written to ``config.json`` per ``model_type`` (``model.head: lm``)."""
HF_VALUE_CLASS_NAMES = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "gpt_neox": "GPTNeoXForSequenceClassification",
}
"""The ``architectures`` entry of a reward model (``model.head: value``, ``num_labels: 1``)."""
NEOX_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
"""GPT-NeoX ``hidden_act`` -> native ``model.activation``."""


# Fields that change the function the model computes (compared after a config round trip).
ARCHITECTURE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_kv_heads",
    "ffn_hidden_size",
    "kv_channels",
    "vocab_size",
    "max_position_embeddings",
    "norm",
    "norm_eps",
    "norm_bias",
    "activation",
    "rotary_pct",
    "rotary_base",
    "rotary_interleaved",
    "rope_scaling",
    "parallel_residual",
    "qkv_bias",
    "proj_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "head",
    "sliding_window",
)


def with_tp_padding(cfg: ModelConfig, tp_size: int) -> ModelConfig:
    """``cfg`` with ``padded_vocab_size`` derived for ``tp_size`` (as the loader derives it)."""
    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp_size)
    return dataclasses.replace(cfg, padded_vocab_size=padded)


def _unsupported(arch: Any) -> ValueError:
    return ValueError(
        f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
    )


# --- Hugging Face -> native ----------------------------------------------------------------------


def _rope(hf: Any) -> tuple[float, float, RopeScaling | None]:
    """``(rotary_base, rotary_pct, rope_scaling)`` from ``rope_parameters`` (transformers >= 5)
    or the older ``rope_theta`` / ``rope_scaling`` / ``rotary_pct`` / ``rotary_emb_base``."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    base = params.get("rope_theta") or getattr(hf, "rope_theta", None)
    base = base or getattr(hf, "rotary_emb_base", None) or 10000.0
    pct = params.get("partial_rotary_factor")
    pct = (
        pct or getattr(hf, "partial_rotary_factor", None) or getattr(hf, "rotary_pct", None) or 1.0
    )
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(base), float(pct), None
    if kind == "linear":
        return float(base), float(pct), RopeScaling(type="linear", factor=float(params["factor"]))
    if kind == "llama3":
        scaling = RopeScaling(
            type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
        return float(base), float(pct), scaling
    raise ValueError(f"rope type {kind!r} is not supported (supported: default, linear, llama3)")


def _sliding_window(hf: Any) -> int | None:
    window = getattr(hf, "sliding_window", None)
    if hf.model_type == "llama" or window is None:
        return None
    if hf.model_type == "qwen2":
        # Qwen2 slides only in the layers marked so (those >= max_window_layers).
        kinds = set(getattr(hf, "layer_types", None) or ["full_attention"])
        if kinds == {"full_attention"}:
            return None
        if kinds != {"sliding_attention"}:
            raise ValueError(
                "qwen2 with sliding attention in only some layers (max_window_layers="
                f"{hf.max_window_layers} < num_hidden_layers={hf.num_hidden_layers}) is not supported"
            )
    return int(window)


def _activation(hf: Any) -> str:
    act = hf.hidden_act
    if hf.model_type in _LLAMA_LIKE:
        if act != "silu":
            raise ValueError(f"{hf.model_type}: hidden_act {act!r} is not supported (only 'silu')")
        return "swiglu"
    if act not in NEOX_ACTIVATIONS:
        raise ValueError(
            f"gpt_neox: hidden_act {act!r} is not supported (supported: {list(NEOX_ACTIVATIONS)})"
        )
    return NEOX_ACTIVATIONS[act]


def is_sequence_classifier(hf_config: Any) -> bool:
    """Whether a transformers config's ``architectures`` names a ``*ForSequenceClassification``."""
    names = getattr(hf_config, "architectures", None) or []
    return any(str(n).endswith("ForSequenceClassification") for n in names)


def _head(hf: Any) -> str:
    if not is_sequence_classifier(hf):
        return "lm"
    labels = getattr(hf, "num_labels", 1)
    if labels != 1:
        raise ValueError(
            f"{hf.architectures[0]} with num_labels {labels}: only a single-score sequence "
            "classifier (num_labels: 1, a reward model) converts, to model.head: value"
        )
    return "value"


def model_config_from_hf(hf_config: Any, tp_size: int = 1, divisible_by: int = 128) -> ModelConfig:
    """The native model config of a transformers config.

    Args:
        hf_config: a ``LlamaConfig``, ``MistralConfig``, ``Qwen2Config`` or ``GPTNeoXConfig``;
            ``architectures`` naming a ``*ForSequenceClassification`` gives ``head: value``.
        tp_size: tensor-parallel size the vocabulary padding must divide.
        divisible_by: ``make_vocab_size_divisible_by``: the padded vocabulary is a multiple of
            ``divisible_by * tp_size``.

    Returns:
        The matching :class:`~megatron.config.ModelConfig`, ``padded_vocab_size`` for
        ``tp_size``.

    Raises:
        ValueError: unsupported architecture, activation, rope type or sliding-window pattern,
            a sequence classifier with ``num_labels != 1``, or values the model config refuses
            (:class:`~megatron.errors.ConfigError`).
    """
    hf = hf_config
    arch = getattr(hf, "model_type", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise _unsupported(arch)
    base, pct, scaling = _rope(hf)
    heads = hf.num_attention_heads
    common = dict(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=heads,
        ffn_hidden_size=hf.intermediate_size,
        padded_vocab_size=padded_vocab_size(hf.vocab_size, divisible_by, tp_size),
        vocab_size=hf.vocab_size,
        make_vocab_size_divisible_by=divisible_by,
        max_position_embeddings=hf.max_position_embeddings,
        activation=_activation(hf),
        rotary_pct=pct,
        rotary_base=base,
        rope_scaling=scaling,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        head=_head(hf),
        attention_dropout=float(getattr(hf, "attention_dropout", 0.0) or 0.0),
        init_method_std=float(getattr(hf, "initializer_range", 0.02)),
    )
    if arch == "gpt_neox":
        return ModelConfig(
            **common,
            num_kv_heads=heads,
            kv_channels=hf.hidden_size // heads,
            norm="layernorm",
            norm_eps=hf.layer_norm_eps,
            norm_bias=True,
            parallel_residual=bool(hf.use_parallel_residual),
            qkv_bias=bool(getattr(hf, "attention_bias", True)),
            proj_bias=bool(getattr(hf, "attention_bias", True)),
            mlp_bias=True,
            hidden_dropout=float(getattr(hf, "hidden_dropout", 0.0) or 0.0),
        )
    attention_bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        **common,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        kv_channels=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        norm="rmsnorm",
        norm_eps=hf.rms_norm_eps,
        norm_bias=False,  # RMSNorm has none
        # Qwen2 always has q/k/v biases and no output-projection bias.
        qkv_bias=True if arch == "qwen2" else attention_bias,
        proj_bias=False if arch == "qwen2" else attention_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        sliding_window=_sliding_window(hf),
    )


# --- native -> Hugging Face ----------------------------------------------------------------------


def infer_architecture(args: ModelConfig) -> str:
    """The Hugging Face ``model_type`` a native model is exported as, when not given.

    LayerNorm + GeLU -> ``gpt_neox``; otherwise (RMSNorm + SwiGLU) ``qwen2`` when q/k/v have a
    bias and the output projection has none, ``mistral`` with a sliding window, else ``llama``.
    """
    if args.norm == "layernorm":
        return "gpt_neox"
    if args.qkv_bias and not args.proj_bias:
        return "qwen2"
    return "mistral" if args.sliding_window is not None else "llama"


def _rope_kwargs(args: ModelConfig, arch: str) -> dict[str, Any]:
    # why: the legacy names are accepted by transformers 4.x and converted by 5.x.
    scaling = None
    if args.rope_scaling is not None:
        scaling = {"rope_type": args.rope_scaling.type, "factor": args.rope_scaling.factor}
        if args.rope_scaling.type == "llama3":
            scaling.update(
                low_freq_factor=args.rope_scaling.low_freq_factor,
                high_freq_factor=args.rope_scaling.high_freq_factor,
                original_max_position_embeddings=args.rope_scaling.original_max_position_embeddings,
            )
    if arch == "gpt_neox":
        out = {"rotary_pct": args.rotary_pct, "rotary_emb_base": args.rotary_base}
        return {**out, "rope_scaling": scaling} if scaling else out
    return {"rope_theta": args.rotary_base, "rope_scaling": scaling}


def _require(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _neox_kwargs(args: ModelConfig, problems: list[str]) -> dict[str, Any]:
    n, h = args.num_attention_heads, args.hidden_size
    _require(problems, args.num_kv_heads == n, f"num_kv_heads ({args.num_kv_heads}) != heads ({n})")
    _require(problems, args.kv_channels * n == h, "kv_channels x heads != hidden_size")
    _require(problems, args.norm_bias, "norm_bias must be true")
    _require(problems, args.mlp_bias, "mlp_bias must be true")
    _require(problems, args.qkv_bias == args.proj_bias, "qkv_bias and proj_bias must agree")
    _require(problems, args.activation != "swiglu", "activation swiglu is not supported")
    _require(problems, args.sliding_window is None, "sliding_window is not supported")
    act = "gelu" if args.activation == "gelu" else "gelu_pytorch_tanh"
    return dict(
        hidden_act=act,
        layer_norm_eps=args.norm_eps,
        use_parallel_residual=args.parallel_residual,
        attention_bias=args.qkv_bias,
        hidden_dropout=args.hidden_dropout,
    )


def _llama_like_kwargs(args: ModelConfig, arch: str, problems: list[str]) -> dict[str, Any]:
    _require(problems, args.norm == "rmsnorm", f"norm {args.norm!r} (needs rmsnorm)")
    _require(problems, args.activation == "swiglu", f"activation {args.activation!r} (swiglu)")
    _require(problems, not args.parallel_residual, "parallel_residual is not supported")
    out: dict[str, Any] = dict(
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.kv_channels,
        rms_norm_eps=args.norm_eps,
        hidden_act="silu",
    )
    if arch == "llama":
        _require(problems, args.qkv_bias == args.proj_bias, "qkv_bias and proj_bias must agree")
        _require(problems, args.sliding_window is None, "sliding_window is not supported")
        out.update(attention_bias=args.qkv_bias, mlp_bias=args.mlp_bias)
    elif arch == "mistral":
        no_bias = not (args.qkv_bias or args.proj_bias or args.mlp_bias)
        _require(problems, no_bias, "biases are not supported")
        out.update(sliding_window=args.sliding_window)
    else:  # qwen2
        _require(problems, args.qkv_bias and not args.proj_bias, "needs qkv_bias and no proj_bias")
        _require(problems, not args.mlp_bias, "mlp_bias is not supported")
        window = args.sliding_window
        out.update(
            use_sliding_window=window is not None,
            sliding_window=window,
            max_window_layers=0 if window is not None else args.num_layers,
        )
    return out


def hf_config_kwargs(args: ModelConfig, arch: str) -> dict[str, Any]:
    """Keyword arguments of transformers' config class for ``arch`` that describe ``args``.

    Args:
        args: the native model.
        arch: target ``model_type``, one of :data:`SUPPORTED_ARCHITECTURES`.

    Returns:
        Plain data for ``AutoConfig.for_model(arch, **kwargs)`` (also a valid ``config.json``
        body once ``model_type`` and ``architectures`` are added).

    Raises:
        ValueError: ``arch`` is unsupported, or names every field the architecture cannot
            express (e.g. a bias Mistral does not have).
    """
    if arch not in SUPPORTED_ARCHITECTURES:
        raise _unsupported(arch)
    problems: list[str] = []
    _require(problems, not args.rotary_interleaved, "rotary_interleaved is not supported")
    kw: dict[str, Any] = dict(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.ffn_hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=args.tie_word_embeddings,
        attention_dropout=args.attention_dropout,
        initializer_range=args.init_method_std,
        **_rope_kwargs(args, arch),
    )
    if arch == "gpt_neox":
        kw.update(_neox_kwargs(args, problems))
    else:
        _require(problems, args.rotary_pct == 1.0, f"rotary_pct {args.rotary_pct} (needs 1.0)")
        kw.update(_llama_like_kwargs(args, arch, problems))
    if problems:
        raise ValueError(f"the model cannot be written as {arch!r}: " + "; ".join(problems))
    return kw


def _effective(args: Any, name: str) -> Any:
    if name == "norm_bias" and args.norm != "layernorm":
        return None  # RMSNorm has no bias: the flag does not change the model
    return getattr(args, name)


def architecture_mismatches(a: ModelConfig, b: ModelConfig) -> list[str]:
    """``field: a != b`` for every architectural field where two models differ (``norm_bias``
    only counts for LayerNorm)."""
    return [
        f"{name}: {getattr(a, name)!r} != {getattr(b, name)!r}"
        for name in ARCHITECTURE_FIELDS
        if _effective(a, name) != _effective(b, name)
    ]


# --- native model section (YAML data) ------------------------------------------------------------


def model_section(args: ModelConfig) -> dict[str, Any]:
    """The ``model:`` section for ``args`` as plain data, without derived keys.

    Raises:
        ValueError: ``args`` cannot be expressed by the config (``kv_channels`` is derived as
            hidden_size / num_attention_heads and cannot be set yet).
    """
    if args.kv_channels * args.num_attention_heads != args.hidden_size:
        raise ValueError(
            f"head_dim ({args.kv_channels}) != hidden_size / num_attention_heads "
            f"({args.hidden_size} / {args.num_attention_heads}): model.kv_channels is derived "
            "from them in the native config and cannot be set yet"
        )
    out = {}
    for f in dataclasses.fields(ModelConfig):
        if not is_derived(f):
            value = getattr(args, f.name)
            out[f.name] = dataclasses.asdict(value) if isinstance(value, RopeScaling) else value
    return out


def model_config_from_section(section: Mapping[str, Any], tp_size: int) -> ModelConfig:
    """The :class:`~megatron.config.ModelConfig` of a ``model:`` section, padded for ``tp_size``.

    Omitted keys take the trainer's defaults and the section's field checks apply; derived keys
    (present in a resolved ``config.yml``) are derived again.

    Args:
        section: the ``model`` mapping of a ``config.yml`` (resolved, as saved with every
            checkpoint) or of a ``model.yml`` (derived keys absent).
        tp_size: the tensor-parallel size the padded vocabulary is derived for.

    Raises:
        ValueError: an invalid section, or a key the converter does not know (so a newer config
            is never exported silently wrong).
    """
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise ValueError(f"model section: keys unknown to the converter: {unknown}")
    kw = {k: v for k, v in section.items() if not is_derived(fields[k])}
    try:
        if isinstance(kw.get("rope_scaling"), Mapping):
            kw["rope_scaling"] = RopeScaling(**kw["rope_scaling"])
        return with_tp_padding(ModelConfig(**kw), tp_size)
    except (ValueError, TypeError) as e:
        raise ValueError(f"model section: {e}") from e
