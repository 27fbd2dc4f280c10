"""Hugging Face <-> native :class:`~megatron.model.gpt.GPTModel` configs and weights.

Shapes: h hidden, n query heads, nk kv heads, hn head dim, q/kv = n / nk, f ffn hidden,
v vocabulary, vp padded vocabulary, p TP size, r TP rank.

Supported ``model_type`` values: ``llama``, ``mistral``, ``qwen2`` (separate ``q/k/v_proj``,
SwiGLU ``gate/up/down_proj``, RMSNorm) and ``gpt_neox`` (fused ``query_key_value``, GeLU,
LayerNorm with bias, partial rotary, optional parallel residual). Checked against transformers
5.24 (``tests/model/test_hf_parity.py``).

Layout differences handled here:

* ``linear_qkv`` groups heads per kv head: rows ``[q_(g, 1) .. q_(g, q/kv), k_g, v_g]`` for each
  kv head g, so a contiguous row split hands each TP rank whole groups. Llama's separate q/k/v
  are regrouped; NeoX's ``query_key_value`` already is ``[q_j, k_j, v_j]`` per head (nk = n), which
  is the same layout with q/kv = 1, so it passes through unchanged.
* ``linear_fc1`` of SwiGLU is ``[gate; up]``, each half split separately across TP.
* The embedding and the output layer are padded with zero rows from v to vp; the inverse strips
  the padding.

Everything works on plain state dicts, so this module imports neither transformers nor torch.distributed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron.parallel.layers import shard_rows

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt_neox")
_LLAMA_LIKE = ("llama", "mistral", "qwen2")
# Buffers some checkpoints carry that hold no learned weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Rotary frequency scaling, as ``model.rope_scaling`` (see :mod:`megatron.model.rotary`)."""

    type: str
    """``llama3`` or ``linear``."""
    factor: float
    """Context extension factor."""
    low_freq_factor: float = 1.0
    """``llama3`` only."""
    high_freq_factor: float = 4.0
    """``llama3`` only."""
    original_max_position_embeddings: int = 8192
    """``llama3`` only: the pre-training context length."""


@dataclass(frozen=True, kw_only=True)
class ModelArgs:
    """The model fields :class:`GPTModel` reads, mirroring the ``model`` config section."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    kv_channels: int
    padded_vocab_size: int
    vocab_size: int
    max_position_embeddings: int
    norm: str
    norm_eps: float
    activation: str
    rotary_pct: float = 1.0
    rotary_base: float = 10000.0
    rotary_interleaved: bool = False
    rope_scaling: RopeScaling | None = None
    parallel_residual: bool = False
    qkv_bias: bool = False
    proj_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    attention_backend: str = "auto"
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    init_method_std: float = 0.02
    activation_checkpointing: bool = False


def padded_vocab(vocab_size: int, tp_size: int, divisible_by: int = 128) -> int:
    """``vocab_size`` rounded up to a multiple of ``divisible_by * tp_size`` (Megatron's rule)."""
    multiple = divisible_by * tp_size
    return multiple * math.ceil(vocab_size / multiple)


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
    table = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
    if act not in table:
        raise ValueError(
            f"gpt_neox: hidden_act {act!r} is not supported (supported: {list(table)})"
        )
    return table[act]


def model_config_from_hf(hf_config: Any, tp_size: int = 1, divisible_by: int = 128) -> ModelArgs:
    """Native model args for a transformers config.

    Args:
        hf_config: a ``LlamaConfig``, ``MistralConfig``, ``Qwen2Config`` or ``GPTNeoXConfig``.
        tp_size: tensor-parallel size the vocabulary padding must divide.
        divisible_by: the padded vocabulary is a multiple of ``divisible_by * tp_size``.

    Returns:
        The matching :class:`ModelArgs`.

    Raises:
        ValueError: unsupported architecture, activation, rope type or sliding-window pattern.
    """
    hf = hf_config
    arch = getattr(hf, "model_type", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    base, pct, scaling = _rope(hf)
    heads = hf.num_attention_heads
    common = dict(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=heads,
        ffn_hidden_size=hf.intermediate_size,
        padded_vocab_size=padded_vocab(hf.vocab_size, tp_size, divisible_by),
        vocab_size=hf.vocab_size,
        max_position_embeddings=hf.max_position_embeddings,
        activation=_activation(hf),
        rotary_pct=pct,
        rotary_base=base,
        rope_scaling=scaling,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_dropout=float(getattr(hf, "attention_dropout", 0.0) or 0.0),
        init_method_std=float(getattr(hf, "initializer_range", 0.02)),
    )
    if arch == "gpt_neox":
        return ModelArgs(
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
    return ModelArgs(
        **common,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        kv_channels=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        norm="rmsnorm",
        norm_eps=hf.rms_norm_eps,
        # Qwen2 always has q/k/v biases and no output-projection bias.
        qkv_bias=True if arch == "qwen2" else attention_bias,
        proj_bias=False if arch == "qwen2" else attention_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        sliding_window=_sliding_window(hf),
    )


# --- layouts -----------------------------------------------------------------------------------


def _names(arch: str) -> dict[str, str]:
    """HF key templates (``{i}`` = layer) for the native roles, per naming family."""
    if arch == "gpt_neox":
        p = "gpt_neox.layers.{i}."
        return {
            "embedding": "gpt_neox.embed_in.weight",
            "final_norm": "gpt_neox.final_layer_norm",
            "lm_head": "lm_head.weight",
            "input_norm": p + "input_layernorm",
            "post_attention_norm": p + "post_attention_layernorm",
            "qkv": p + "attention.query_key_value",
            "proj": p + "attention.dense",
            "fc1": p + "mlp.dense_h_to_4h",
            "fc2": p + "mlp.dense_4h_to_h",
        }
    p = "model.layers.{i}."
    return {
        "embedding": "model.embed_tokens.weight",
        "final_norm": "model.norm",
        "lm_head": "lm_head.weight",
        "input_norm": p + "input_layernorm",
        "post_attention_norm": p + "post_attention_layernorm",
        "q": p + "self_attn.q_proj",
        "k": p + "self_attn.k_proj",
        "v": p + "self_attn.v_proj",
        "proj": p + "self_attn.o_proj",
        "gate": p + "mlp.gate_proj",
        "up": p + "mlp.up_proj",
        "fc2": p + "mlp.down_proj",
    }


def _group_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Separate q ``[n hn, ...]``, k, v ``[nk hn, ...]`` -> grouped ``[(n + 2 nk) hn, ...]``."""
    nk, hn, rest = args.num_kv_heads, args.kv_channels, q.shape[1:]
    q = q.reshape(nk, -1, *rest)  # [n hn, ...] -> [nk, q/kv hn, ...]
    k, v = k.reshape(nk, hn, *rest), v.reshape(nk, hn, *rest)  # [nk hn, ...] -> [nk, hn, ...]
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)  # -> [(n + 2 nk) hn, ...]


def _split_qkv(qkv: torch.Tensor, args: ModelArgs) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`_group_qkv`."""
    nk, hn, rest = args.num_kv_heads, args.kv_channels, qkv.shape[1:]
    qn = args.num_attention_heads // nk * hn
    g = qkv.reshape(nk, -1, *rest)  # [(n + 2 nk) hn, ...] -> [nk, (q/kv + 2) hn, ...]
    q = g[:, :qn].reshape(-1, *rest)  # [n hn, ...]
    k, v = g[:, qn : qn + hn].reshape(-1, *rest), g[:, qn + hn :].reshape(-1, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _shard_spec(key: str, args: ModelArgs) -> tuple[str, list[int]]:
    """How a native parameter is split: ``("rows", parts)``, ``("cols", [])`` or replicated."""
    if key in ("embedding.weight", "lm_head.weight"):
        return "rows", [args.padded_vocab_size]
    if ".linear_qkv." in key:
        n, nk, hn = args.num_attention_heads, args.num_kv_heads, args.kv_channels
        return "rows", [(n + 2 * nk) * hn]
    if ".linear_fc1." in key:
        f = args.ffn_hidden_size
        return "rows", [f, f] if args.activation == "swiglu" else [f]
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "cols", []
    return "replicated", []


class _Reader:
    """Pops keys from an HF state dict, checking shapes, so leftovers can be reported."""

    def __init__(self, sd: Mapping[str, torch.Tensor]) -> None:
        self.left = {k: v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}

    def take(self, key: str, shape: Sequence[int]) -> torch.Tensor:
        if key not in self.left:
            raise ValueError(f"Hugging Face state dict has no {key!r}")
        t = self.left.pop(key)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(
                f"{key}: shape {tuple(t.shape)} does not match the config's {tuple(shape)}"
            )
        return t

    def done(self) -> None:
        if self.left:
            raise ValueError(f"unexpected Hugging Face keys: {sorted(self.left)}")


def _pad_vocab(w: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    extra = args.padded_vocab_size - w.shape[0]
    return torch.cat([w, w.new_zeros(extra, w.shape[1])]) if extra else w


def _native_layer(r: _Reader, names: dict[str, str], i: int, args: ModelArgs) -> dict:
    """Full (unsharded) native tensors of layer ``i``."""
    h, f, hn = args.hidden_size, args.ffn_hidden_size, args.kv_channels
    n, nk = args.num_attention_heads, args.num_kv_heads
    nm = {role: t.format(i=i) for role, t in names.items()}
    out, pre = {}, f"layers.{i}."
    norm_params = ("weight", "bias") if args.norm == "layernorm" and args.norm_bias else ("weight",)
    for native, role in (
        ("input_norm", "input_norm"),
        ("post_attention_norm", "post_attention_norm"),
    ):
        for p in norm_params:
            out[f"{pre}{native}.{p}"] = r.take(f"{nm[role]}.{p}", [h])
    qkv = pre + "self_attention.linear_qkv."
    if "qkv" in nm:
        # NeoX: [q_j, k_j, v_j] per head is our grouped layout with nk = n.
        out[qkv + "weight"] = r.take(nm["qkv"] + ".weight", [3 * h, h])
        if args.qkv_bias:
            out[qkv + "bias"] = r.take(nm["qkv"] + ".bias", [3 * h])
    else:
        parts = [
            r.take(nm[x] + ".weight", [m * hn, h]) for x, m in (("q", n), ("k", nk), ("v", nk))
        ]
        out[qkv + "weight"] = _group_qkv(*parts, args)
        if args.qkv_bias:
            parts = [r.take(nm[x] + ".bias", [m * hn]) for x, m in (("q", n), ("k", nk), ("v", nk))]
            out[qkv + "bias"] = _group_qkv(*parts, args)
    out[pre + "self_attention.linear_proj.weight"] = r.take(nm["proj"] + ".weight", [h, n * hn])
    if args.proj_bias:
        out[pre + "self_attention.linear_proj.bias"] = r.take(nm["proj"] + ".bias", [h])
    fc1 = pre + "mlp.linear_fc1."
    if args.activation == "swiglu":
        out[fc1 + "weight"] = torch.cat(
            [r.take(nm["gate"] + ".weight", [f, h]), r.take(nm["up"] + ".weight", [f, h])]
        )
        if args.mlp_bias:
            out[fc1 + "bias"] = torch.cat(
                [r.take(nm["gate"] + ".bias", [f]), r.take(nm["up"] + ".bias", [f])]
            )
    else:
        out[fc1 + "weight"] = r.take(nm["fc1"] + ".weight", [f, h])
        if args.mlp_bias:
            out[fc1 + "bias"] = r.take(nm["fc1"] + ".bias", [f])
    out[pre + "mlp.linear_fc2.weight"] = r.take(nm["fc2"] + ".weight", [h, f])
    if args.mlp_bias:
        out[pre + "mlp.linear_fc2.bias"] = r.take(nm["fc2"] + ".bias", [h])
    return out


def _hf_naming(sd: Mapping[str, torch.Tensor]) -> str:
    if "gpt_neox.embed_in.weight" in sd:
        return "gpt_neox"
    if "model.embed_tokens.weight" in sd:
        return "llama"
    raise ValueError(
        "not a Hugging Face causal-LM state dict of a supported architecture "
        f"({', '.join(SUPPORTED_ARCHITECTURES)}): found neither 'model.embed_tokens.weight' "
        "nor 'gpt_neox.embed_in.weight'"
    )


def hf_to_native_state_dict(
    hf_state_dict: Mapping[str, torch.Tensor], args: ModelArgs, tp_size: int, tp_rank: int
) -> dict[str, torch.Tensor]:
    """One TP rank's :class:`GPTModel` state dict from a Hugging Face ``*ForCausalLM`` one.

    Args:
        hf_state_dict: full HF weights (keys ``model.*`` / ``gpt_neox.*`` and ``lm_head.weight``;
            NeoX's legacy ``embed_out.weight`` is accepted too). With tied embeddings a
            ``lm_head.weight`` entry, if present, is ignored.
        args: from :func:`model_config_from_hf` with the same ``tp_size``.
        tp_size: tensor-parallel size.
        tp_rank: the rank whose shard to return.

    Returns:
        Exactly the keys of ``GPTModel(args, state).state_dict()`` on that rank, same dtypes as
        the input.

    Raises:
        ValueError: missing, unexpected or wrongly shaped keys.
    """
    if args.padded_vocab_size % tp_size:
        raise ValueError(
            f"padded_vocab_size {args.padded_vocab_size} is not divisible by TP {tp_size}"
        )
    if args.num_kv_heads % tp_size:
        # why: a row split of linear_qkv is only valid when every rank gets whole kv groups.
        raise ValueError(f"num_kv_heads {args.num_kv_heads} is not divisible by TP {tp_size}")
    sd = dict(hf_state_dict)
    if "embed_out.weight" in sd:  # pre-5.0 NeoX name
        sd["lm_head.weight"] = sd.pop("embed_out.weight")
    names = _names(_hf_naming(sd))
    r = _Reader(sd)
    v, h = args.vocab_size, args.hidden_size
    full = {"embedding.weight": _pad_vocab(r.take(names["embedding"], [v, h]), args)}
    for i in range(args.num_layers):
        full.update(_native_layer(r, names, i, args))
    for p in ("weight", "bias") if args.norm == "layernorm" and args.norm_bias else ("weight",):
        full[f"final_norm.{p}"] = r.take(f"{names['final_norm']}.{p}", [h])
    if args.tie_word_embeddings:
        r.left.pop(names["lm_head"], None)
    else:
        full["lm_head.weight"] = _pad_vocab(r.take(names["lm_head"], [v, h]), args)
    r.done()
    out = {}
    for key, t in full.items():
        how, parts = _shard_spec(key, args)
        if how == "rows":
            t = shard_rows(t, parts, tp_size, tp_rank)
        elif how == "cols":
            k = t.shape[1] // tp_size
            t = t[:, tp_rank * k : (tp_rank + 1) * k]
        out[key] = t.contiguous()
    return out


def _unshard(shards: Sequence[torch.Tensor], how: str, parts: list[int]) -> torch.Tensor:
    """Inverse of the row / column split of one parameter across ``len(shards)`` ranks."""
    if how == "cols":
        return torch.cat(list(shards), dim=1)
    if how == "replicated":
        return shards[0]
    p, blocks, start = len(shards), [], 0
    for size in parts:
        k = size // p
        blocks += [s[start : start + k] for s in shards]
        start += k
    return torch.cat(blocks)


def native_to_hf_state_dict(
    rank_state_dicts: Sequence[Mapping[str, torch.Tensor]], args: ModelArgs, arch: str
) -> dict[str, torch.Tensor]:
    """Gather TP shards of :class:`GPTModel` back into a Hugging Face ``*ForCausalLM`` state dict.

    Args:
        rank_state_dicts: the state dicts of TP ranks ``0 .. p-1``, in rank order.
        args: the native model args.
        arch: HF ``model_type``: one of :data:`SUPPORTED_ARCHITECTURES`.

    Returns:
        The HF state dict with the vocabulary padding removed. With tied embeddings
        ``lm_head.weight`` is the embedding tensor itself, as in ``model.state_dict()``.
    """
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    full = {}
    for key in rank_state_dicts[0]:
        how, parts = _shard_spec(key, args)
        full[key] = _unshard([sd[key] for sd in rank_state_dicts], how, parts)
    names = _names(arch)
    v = args.vocab_size
    out = {names["embedding"]: full.pop("embedding.weight")[:v].contiguous()}
    for i in range(args.num_layers):
        nm = {role: t.format(i=i) for role, t in names.items()}
        pre = f"layers.{i}."
        for native, role in (
            ("input_norm", "input_norm"),
            ("post_attention_norm", "post_attention_norm"),
        ):
            for p in ("weight", "bias"):
                if f"{pre}{native}.{p}" in full:
                    out[f"{nm[role]}.{p}"] = full.pop(f"{pre}{native}.{p}")
        for p in ("weight", "bias"):
            qkv = full.pop(f"{pre}self_attention.linear_qkv.{p}", None)
            if qkv is not None and "qkv" in nm:
                out[f"{nm['qkv']}.{p}"] = qkv
            elif qkv is not None:
                for role, t in zip(("q", "k", "v"), _split_qkv(qkv, args), strict=True):
                    out[f"{nm[role]}.{p}"] = t
            proj = full.pop(f"{pre}self_attention.linear_proj.{p}", None)
            if proj is not None:
                out[f"{nm['proj']}.{p}"] = proj
            fc1 = full.pop(f"{pre}mlp.linear_fc1.{p}", None)
            if fc1 is not None and args.activation == "swiglu":
                gate, up = fc1.chunk(2)
                out[f"{nm['gate']}.{p}"], out[f"{nm['up']}.{p}"] = (
                    gate.contiguous(),
                    up.contiguous(),
                )
            elif fc1 is not None:
                out[f"{nm['fc1']}.{p}"] = fc1
            fc2 = full.pop(f"{pre}mlp.linear_fc2.{p}", None)
            if fc2 is not None:
                out[f"{nm['fc2']}.{p}"] = fc2
    for p in ("weight", "bias"):
        if f"final_norm.{p}" in full:
            out[f"{names['final_norm']}.{p}"] = full.pop(f"final_norm.{p}")
    head = full.pop("lm_head.weight", None)
    out[names["lm_head"]] = out[names["embedding"]] if head is None else head[:v].contiguous()
    if full:
        raise ValueError(f"unexpected native keys: {sorted(full)}")
    return out
