"""Hugging Face <-> native :class:`~megatron.model.gpt.GPTModel` weights, with TP sharding.

Shapes: h hidden, n query heads, nk kv heads, hn head dim, q/kv = n / nk, f ffn hidden,
v vocabulary, vp padded vocabulary, p TP size, r TP rank.

Supported ``model_type`` values: ``llama``, ``mistral``, ``qwen2`` (separate ``q/k/v_proj``,
SwiGLU ``gate/up/down_proj``, RMSNorm) and ``gpt_neox`` (fused ``query_key_value``, GeLU,
LayerNorm with bias, partial rotary, optional parallel residual). Checked against transformers
5.24 (``tests/ckpt/test_hf_parity.py``). Config mapping: :mod:`megatron.ckpt.hf_config`; ``args``
is the model's :class:`~megatron.config.ModelConfig` throughout.

Layout differences handled here:

* ``linear_qkv`` groups heads per kv head: rows ``[q_(g, 1) .. q_(g, q/kv), k_g, v_g]`` for each
  kv head g, so a contiguous row split hands each TP rank whole groups. Llama's separate q/k/v
  are regrouped; NeoX's ``query_key_value`` already is ``[q_j, k_j, v_j]`` per head (nk = n), which
  is the same layout with q/kv = 1, so it passes through unchanged.
* ``linear_fc1`` of SwiGLU is ``[gate; up]``, each half split separately across TP.
* The embedding and the output layer are padded with zero rows from v to vp; the inverse strips
  the padding.
* A reward model (``model.head: value``) is HF's ``*ForSequenceClassification`` with
  ``num_labels: 1``: its ``score.weight [1, h]`` is our ``value_head.weight`` (replicated over TP
  ranks) and it has no ``lm_head``; the base model keeps its ``model.*`` / ``gpt_neox.*`` names.

The converters stream: :func:`iter_native_from_hf` and :func:`iter_hf_from_native` read one layer's
tensors at a time from any ``Mapping`` (lazy file-backed ones included) and yield as they go, so a
caller never holds two copies of a model. Passing a mapping of ``meta`` tensors checks every key
and shape without reading any data. Everything works on plain mappings: neither transformers nor
torch.distributed is imported.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from megatron.ckpt.hf_config import SUPPORTED_ARCHITECTURES, model_config_from_hf
from megatron.config import ModelConfig
from megatron.parallel.layers import shard_rows

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "check_native_shards",
    "hf_to_native_state_dict",
    "iter_hf_from_native",
    "iter_native_from_hf",
    "iter_resharded",
    "model_config_from_hf",
    "native_shapes",
    "native_to_hf_state_dict",
    "pipeline_layer_of",
    "tp_gather",
    "tp_split",
]

# Buffers some checkpoints carry that hold no learned weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")
_VOCAB_KEYS = ("embedding.weight", "lm_head.weight")


# --- native layout ------------------------------------------------------------------------------


def _norm_params(args: ModelConfig) -> tuple[str, ...]:
    return ("weight", "bias") if args.norm == "layernorm" and args.norm_bias else ("weight",)


def native_shapes(args: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every native parameter, keyed as in ``GPTModel.state_dict()``."""
    h, f, vp = args.hidden_size, args.ffn_hidden_size, args.padded_vocab_size
    n, nk, hn = args.num_attention_heads, args.num_kv_heads, args.kv_channels
    fc1 = 2 * f if args.activation == "swiglu" else f
    out: dict[str, tuple[int, ...]] = {"embedding.weight": (vp, h)}
    for i in range(args.num_layers):
        pre = f"layers.{i}."
        out.update({f"{pre}input_norm.{p}": (h,) for p in _norm_params(args)})
        out[pre + "self_attention.linear_qkv.weight"] = ((n + 2 * nk) * hn, h)
        if args.qkv_bias:
            out[pre + "self_attention.linear_qkv.bias"] = ((n + 2 * nk) * hn,)
        out[pre + "self_attention.linear_proj.weight"] = (h, n * hn)
        if args.proj_bias:
            out[pre + "self_attention.linear_proj.bias"] = (h,)
        out.update({f"{pre}post_attention_norm.{p}": (h,) for p in _norm_params(args)})
        out[pre + "mlp.linear_fc1.weight"] = (fc1, h)
        if args.mlp_bias:
            out[pre + "mlp.linear_fc1.bias"] = (fc1,)
        out[pre + "mlp.linear_fc2.weight"] = (h, f)
        if args.mlp_bias:
            out[pre + "mlp.linear_fc2.bias"] = (h,)
    out.update({f"final_norm.{p}": (h,) for p in _norm_params(args)})
    if getattr(args, "head", "lm") == "value":
        out["value_head.weight"] = (1, h)
    elif not args.tie_word_embeddings:
        out["lm_head.weight"] = (vp, h)
    return out


def _shard_spec(key: str, args: ModelConfig) -> tuple[str, list[int]]:
    """How a native parameter is split: ``("rows", parts)``, ``("cols", [])`` or replicated."""
    if key in _VOCAB_KEYS:
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


def _shard_shape(shape: tuple[int, ...], how: str, tp_size: int) -> tuple[int, ...]:
    if how == "rows":
        return (shape[0] // tp_size, *shape[1:])
    if how == "cols":
        return (shape[0], shape[1] // tp_size)
    return shape


def check_tp(args: ModelConfig, tp_size: int) -> None:
    """Raise ``ValueError`` naming the first size ``tp_size`` does not divide."""
    sizes = {
        "num_attention_heads": args.num_attention_heads,
        # why: a row split of linear_qkv is only valid when every rank gets whole kv groups.
        "num_kv_heads": args.num_kv_heads,
        "ffn_hidden_size": args.ffn_hidden_size,
        "padded_vocab_size": args.padded_vocab_size,
    }
    for name, size in sizes.items():
        if size % tp_size:
            raise ValueError(f"{name} {size} is not divisible by TP {tp_size}")


def tp_split(key: str, full: torch.Tensor, args: ModelConfig, tp_size: int) -> list[torch.Tensor]:
    """Every TP rank's shard of native parameter ``key`` (fresh, compact tensors)."""
    how, parts = _shard_spec(key, args)
    if tp_size == 1:
        return [full]
    shards = []
    for rank in range(tp_size):
        # why: torch.save writes a view's whole storage; each shard must own exactly its data
        # (shard_rows concatenates, so it already returns a fresh tensor).
        if how == "rows":
            shards.append(shard_rows(full, parts, tp_size, rank))
        elif how == "cols":
            k = full.shape[1] // tp_size
            shards.append(full[:, rank * k : (rank + 1) * k].contiguous())
        else:
            shards.append(full.clone())
    return shards


def tp_gather(key: str, shards: Sequence[torch.Tensor], args: ModelConfig) -> torch.Tensor:
    """Inverse of :func:`tp_split` (``args.padded_vocab_size`` must be the shards' one)."""
    how, parts = _shard_spec(key, args)
    if how == "cols":
        return torch.cat(list(shards), dim=1)
    if how == "replicated":
        return shards[0]
    p, blocks, start = len(shards), [], 0
    for size in parts:
        k = size // p
        blocks += [s[start : start + k] for s in shards]
        start += k
    return torch.cat(blocks) if len(blocks) > 1 else blocks[0]


def check_native_shards(
    rank_state_dicts: Sequence[Mapping[str, torch.Tensor]],
    args: ModelConfig,
    tp_size: int | None = None,
) -> None:
    """Check that TP shards hold exactly the keys and shard shapes ``args`` implies.

    Args:
        rank_state_dicts: shards of TP ranks 0 .. p-1 (or any subset, with ``tp_size``).
        args: the model config.
        tp_size: the TP size the shards were cut for; default ``len(rank_state_dicts)``.

    Raises:
        ValueError: naming the TP rank and the first missing, unexpected or misshapen key.
    """
    expected = native_shapes(args)
    p = tp_size or len(rank_state_dicts)
    for rank, sd in enumerate(rank_state_dicts):
        missing = [k for k in expected if k not in sd]
        extra = sorted(set(sd) - set(expected))
        if missing or extra:
            raise ValueError(
                f"TP rank {rank}: keys do not match the model config "
                f"(missing {missing[:5]}, unexpected {extra[:5]})"
            )
        for key, shape in expected.items():
            want = _shard_shape(shape, _shard_spec(key, args)[0], p)
            if tuple(sd[key].shape) != want:
                raise ValueError(
                    f"TP rank {rank}: {key} has shape {tuple(sd[key].shape)}, the model config "
                    f"at TP={p} implies {want}"
                )


def pipeline_layer_of(key: str, args: ModelConfig) -> tuple[int, str]:
    """``(DeepSpeed pipeline layer index, key inside that layer)`` of a native key.

    Layer 0 is the embedding, ``1 + i`` transformer layer i, ``L + 1`` the final norm (its module
    keys are ``norm.*``) and ``L + 2`` the untied ``lm_head`` or the ``value_head`` (keys
    ``value.*``) (see
    :mod:`megatron.model.pipeline`). A PP checkpoint writer groups keys by this index.
    """
    n = args.num_layers
    if key.startswith("embedding."):
        return 0, key.removeprefix("embedding.")
    if key.startswith("layers."):
        index, rest = key.removeprefix("layers.").split(".", 1)
        return 1 + int(index), rest
    if key.startswith("final_norm."):
        return n + 1, "norm." + key.removeprefix("final_norm.")
    if key.startswith("lm_head."):
        return n + 2, key.removeprefix("lm_head.")
    if key.startswith("value_head."):  # ValueHeadPipe keeps it as its ``value`` submodule
        return n + 2, "value." + key.removeprefix("value_head.")
    raise ValueError(f"not a native parameter key: {key!r}")


def native_key_of(layer: int, key: str, num_layers: int) -> str:
    """Inverse of :func:`pipeline_layer_of`: the native key of ``key`` in pipeline ``layer``.

    Raises:
        ValueError: ``layer`` is beyond the model's last pipeline layer.
    """
    if layer == 0:
        return "embedding." + key
    if layer <= num_layers:
        return f"layers.{layer - 1}.{key}"
    if layer == num_layers + 1:
        return "final_norm." + key.removeprefix("norm.")
    if layer == num_layers + 2:
        if key.startswith("value."):
            return "value_head." + key.removeprefix("value.")
        return "lm_head." + key
    raise ValueError(f"pipeline layer {layer} is beyond a {num_layers}-layer model's last (L + 2)")


# --- Hugging Face layout ------------------------------------------------------------------------


def _names(arch: str) -> dict[str, str]:
    """HF key templates (``{i}`` = layer) for the native roles, per naming family."""
    if arch == "gpt_neox":
        p = "gpt_neox.layers.{i}."
        return {
            "embedding": "gpt_neox.embed_in.weight",
            "final_norm": "gpt_neox.final_layer_norm",
            "lm_head": "lm_head.weight",
            "score": "score.weight",
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
        "score": "score.weight",
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


def _group_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: ModelConfig
) -> torch.Tensor:
    """Separate q ``[n hn, ...]``, k, v ``[nk hn, ...]`` -> grouped ``[(n + 2 nk) hn, ...]``."""
    nk, hn, rest = args.num_kv_heads, args.kv_channels, q.shape[1:]
    q = q.reshape(nk, -1, *rest)  # [n hn, ...] -> [nk, q/kv hn, ...]
    k, v = k.reshape(nk, hn, *rest), v.reshape(nk, hn, *rest)  # [nk hn, ...] -> [nk, hn, ...]
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)  # -> [(n + 2 nk) hn, ...]


def _split_qkv(qkv: torch.Tensor, args: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`_group_qkv`."""
    nk, hn, rest = args.num_kv_heads, args.kv_channels, qkv.shape[1:]
    qn = args.num_attention_heads // nk * hn
    g = qkv.reshape(nk, -1, *rest)  # [(n + 2 nk) hn, ...] -> [nk, (q/kv + 2) hn, ...]
    q = g[:, :qn].reshape(-1, *rest)  # [n hn, ...]
    k, v = g[:, qn : qn + hn].reshape(-1, *rest), g[:, qn + hn :].reshape(-1, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


class _Reader:
    """Takes keys from an HF state dict on demand, checking shapes; leftovers are reported."""

    def __init__(self, sd: Mapping[str, torch.Tensor]) -> None:
        self.sd = sd
        self.left = {k for k in sd.keys() if not k.endswith(_IGNORED_SUFFIXES)}

    def take(self, key: str, shape: Sequence[int]) -> torch.Tensor:
        if key not in self.left:
            raise ValueError(f"Hugging Face state dict has no {key!r}")
        self.left.discard(key)
        t = self.sd[key]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(
                f"{key}: shape {tuple(t.shape)} does not match the config's {tuple(shape)}"
            )
        return t

    def done(self) -> None:
        if self.left:
            raise ValueError(f"unexpected Hugging Face keys: {sorted(self.left)}")


def _pad_vocab(w: torch.Tensor, args: ModelConfig) -> torch.Tensor:
    extra = args.padded_vocab_size - w.shape[0]
    return torch.cat([w, w.new_zeros(extra, w.shape[1])]) if extra else w


def _native_layer(r: _Reader, names: dict[str, str], i: int, args: ModelConfig) -> dict:
    """Full (unsharded) native tensors of layer ``i``."""
    h, f, hn = args.hidden_size, args.ffn_hidden_size, args.kv_channels
    n, nk = args.num_attention_heads, args.num_kv_heads
    nm = {role: t.format(i=i) for role, t in names.items()}
    out, pre = {}, f"layers.{i}."
    for native in ("input_norm", "post_attention_norm"):
        for p in _norm_params(args):
            out[f"{pre}{native}.{p}"] = r.take(f"{nm[native]}.{p}", [h])
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
    for p, shape in (("weight", [f, h]), ("bias", [f])):
        if p == "bias" and not args.mlp_bias:
            continue
        if args.activation == "swiglu":
            gate, up = r.take(f"{nm['gate']}.{p}", shape), r.take(f"{nm['up']}.{p}", shape)
            out[fc1 + p] = torch.cat([gate, up])
        else:
            out[fc1 + p] = r.take(f"{nm['fc1']}.{p}", shape)
    out[pre + "mlp.linear_fc2.weight"] = r.take(nm["fc2"] + ".weight", [h, f])
    if args.mlp_bias:
        out[pre + "mlp.linear_fc2.bias"] = r.take(nm["fc2"] + ".bias", [h])
    return out


def _hf_naming(keys: Mapping[str, torch.Tensor]) -> str:
    if "gpt_neox.embed_in.weight" in keys:
        return "gpt_neox"
    if "model.embed_tokens.weight" in keys:
        return "llama"
    raise ValueError(
        "not a Hugging Face causal-LM / sequence-classification state dict of a supported "
        "architecture "
        f"({', '.join(SUPPORTED_ARCHITECTURES)}): found neither 'model.embed_tokens.weight' "
        "nor 'gpt_neox.embed_in.weight'"
    )


class _Renamed(Mapping):
    """``hf_state_dict`` with NeoX's pre-5.0 ``embed_out.weight`` seen as ``lm_head.weight``."""

    def __init__(self, sd: Mapping[str, torch.Tensor]) -> None:
        self.sd = sd
        self.old = "embed_out.weight" in sd and "lm_head.weight" not in sd

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.sd["embed_out.weight" if self.old and key == "lm_head.weight" else key]

    def __iter__(self) -> Iterator[str]:
        return ("lm_head.weight" if self.old and k == "embed_out.weight" else k for k in self.sd)

    def __len__(self) -> int:
        return len(self.sd)


def iter_native_from_hf(
    hf_state_dict: Mapping[str, torch.Tensor], args: ModelConfig, tp_size: int
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """Stream ``(native key, [shard of TP rank 0 .. p-1])`` from a Hugging Face state dict.

    Tensors are read from ``hf_state_dict`` one layer at a time, in model order (embedding,
    layers, final norm, lm_head or value_head). Unexpected leftover keys raise once everything
    was read.

    Args:
        hf_state_dict: HF weights (keys ``model.*`` / ``gpt_neox.*`` and ``lm_head.weight``;
            NeoX's legacy ``embed_out.weight`` is accepted too). With tied embeddings a
            ``lm_head.weight`` entry, if present, is ignored. With ``args.head == "value"``
            (a ``*ForSequenceClassification``) ``score.weight [1, h]`` becomes
            ``value_head.weight``. May be lazy or hold ``meta`` tensors.
        args: from :func:`model_config_from_hf` with the same ``tp_size``.
        tp_size: tensor-parallel size.

    Raises:
        ValueError: missing, unexpected or wrongly shaped keys; sizes ``tp_size`` does not divide.
    """
    check_tp(args, tp_size)
    sd = _Renamed(hf_state_dict)
    names = _names(_hf_naming(sd))
    r = _Reader(sd)
    v, h = args.vocab_size, args.hidden_size

    def stage(full: dict[str, torch.Tensor]) -> Iterator[tuple[str, list[torch.Tensor]]]:
        for key, t in full.items():
            yield key, tp_split(key, t, args, tp_size)

    yield from stage({"embedding.weight": _pad_vocab(r.take(names["embedding"], [v, h]), args)})
    for i in range(args.num_layers):
        yield from stage(_native_layer(r, names, i, args))
    norm = {
        f"final_norm.{p}": r.take(f"{names['final_norm']}.{p}", [h]) for p in _norm_params(args)
    }
    yield from stage(norm)
    if args.head == "value":
        yield from stage({"value_head.weight": r.take(names["score"], [1, h])})
    elif args.tie_word_embeddings:
        r.left.discard(names["lm_head"])
    else:
        yield from stage({"lm_head.weight": _pad_vocab(r.take(names["lm_head"], [v, h]), args)})
    r.done()


def hf_to_native_state_dict(
    hf_state_dict: Mapping[str, torch.Tensor], args: ModelConfig, tp_size: int, tp_rank: int
) -> dict[str, torch.Tensor]:
    """One TP rank's :class:`GPTModel` state dict from a Hugging Face ``*ForCausalLM`` one (or a
    ``*ForSequenceClassification`` one, for ``args.head == "value"``).

    Args:
        hf_state_dict: full HF weights (see :func:`iter_native_from_hf`).
        args: from :func:`model_config_from_hf` with the same ``tp_size``.
        tp_size: tensor-parallel size.
        tp_rank: the rank whose shard to return.

    Returns:
        Exactly the keys of ``GPTModel(args, state).state_dict()`` on that rank, same dtypes as
        the input.

    Raises:
        ValueError: missing, unexpected or wrongly shaped keys.
    """
    return {k: s[tp_rank] for k, s in iter_native_from_hf(hf_state_dict, args, tp_size)}


def _hf_layer(
    full: dict[str, torch.Tensor], nm: dict[str, str], i: int, args: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors of layer ``i`` from its full native tensors (consumed from ``full``)."""
    pre = f"layers.{i}."
    for native in ("input_norm", "post_attention_norm"):
        for p in _norm_params(args):
            yield f"{nm[native]}.{p}", full.pop(f"{pre}{native}.{p}")
    for p in ("weight", "bias"):
        qkv = full.pop(f"{pre}self_attention.linear_qkv.{p}", None)
        if qkv is not None and "qkv" in nm:
            yield f"{nm['qkv']}.{p}", qkv
        elif qkv is not None:
            for role, t in zip(("q", "k", "v"), _split_qkv(qkv, args), strict=True):
                yield f"{nm[role]}.{p}", t
        proj = full.pop(f"{pre}self_attention.linear_proj.{p}", None)
        if proj is not None:
            yield f"{nm['proj']}.{p}", proj
        fc1 = full.pop(f"{pre}mlp.linear_fc1.{p}", None)
        if fc1 is not None and args.activation == "swiglu":
            gate, up = fc1.chunk(2)
            yield f"{nm['gate']}.{p}", gate.contiguous()
            yield f"{nm['up']}.{p}", up.contiguous()
        elif fc1 is not None:
            yield f"{nm['fc1']}.{p}", fc1
        fc2 = full.pop(f"{pre}mlp.linear_fc2.{p}", None)
        if fc2 is not None:
            yield f"{nm['fc2']}.{p}", fc2


def iter_hf_from_native(
    rank_state_dicts: Sequence[Mapping[str, torch.Tensor]], args: ModelConfig, arch: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(HF key, tensor)`` gathered from the TP shards of :class:`GPTModel`.

    Reads one layer's shards at a time. The vocabulary padding is removed. With tied embeddings
    no ``lm_head.weight`` is yielded (transformers re-ties it on load). A ``model.head: value``
    model yields ``score.weight`` (its ``value_head.weight``) and no ``lm_head.weight``.

    Args:
        rank_state_dicts: the state dicts of TP ranks ``0 .. p-1``, in rank order (may be lazy).
        args: the native model args (``padded_vocab_size`` as in the shards).
        arch: HF ``model_type``: one of :data:`SUPPORTED_ARCHITECTURES`.

    Raises:
        ValueError: an unsupported ``arch``, or shards that do not match ``args``.
    """
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    check_native_shards(rank_state_dicts, args)
    names, v = _names(arch), args.vocab_size

    def gather(prefix: str) -> dict[str, torch.Tensor]:
        keys = [k for k in rank_state_dicts[0] if k.startswith(prefix)]
        return {k: tp_gather(k, [sd[k] for sd in rank_state_dicts], args) for k in keys}

    yield names["embedding"], gather("embedding.")["embedding.weight"][:v].contiguous()
    for i in range(args.num_layers):
        nm = {role: t.format(i=i) for role, t in names.items()}
        yield from _hf_layer(gather(f"layers.{i}."), nm, i, args)
    for key, t in gather("final_norm.").items():
        yield f"{names['final_norm']}.{key.removeprefix('final_norm.')}", t
    if args.head == "value":
        yield names["score"], gather("value_head.")["value_head.weight"]
    elif not args.tie_word_embeddings:
        yield names["lm_head"], gather("lm_head.")["lm_head.weight"][:v].contiguous()


def native_to_hf_state_dict(
    rank_state_dicts: Sequence[Mapping[str, torch.Tensor]], args: ModelConfig, arch: str
) -> dict[str, torch.Tensor]:
    """Gather TP shards of :class:`GPTModel` back into a Hugging Face ``*ForCausalLM`` state dict
    (``*ForSequenceClassification`` for a ``model.head: value`` model).

    Args:
        rank_state_dicts: the state dicts of TP ranks ``0 .. p-1``, in rank order.
        args: the native model args.
        arch: HF ``model_type``: one of :data:`SUPPORTED_ARCHITECTURES`.

    Returns:
        The HF state dict with the vocabulary padding removed. With tied embeddings
        ``lm_head.weight`` is the embedding tensor itself, as in ``model.state_dict()``.
    """
    out = dict(iter_hf_from_native(rank_state_dicts, args, arch))
    if args.tie_word_embeddings and args.head != "value":
        out[_names(arch)["lm_head"]] = out[_names(arch)["embedding"]]
    return out


def iter_resharded(
    rank_state_dicts: Sequence[Mapping[str, torch.Tensor]],
    old: ModelConfig,
    new: ModelConfig,
    tp_size: int,
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """Stream ``(native key, [shard of new TP rank 0 .. tp_size-1])`` from TP shards at another
    size; the vocabulary rows are re-padded from ``old.padded_vocab_size`` to ``new``'s.

    Raises:
        ValueError: shards that do not match ``old``, or sizes ``tp_size`` does not divide.
    """
    check_native_shards(rank_state_dicts, old)
    check_tp(new, tp_size)
    for key in native_shapes(old):
        full = tp_gather(key, [sd[key] for sd in rank_state_dicts], old)
        if key in _VOCAB_KEYS:
            full = _pad_vocab(full[: old.vocab_size], new)
        yield key, tp_split(key, full, new, tp_size)
