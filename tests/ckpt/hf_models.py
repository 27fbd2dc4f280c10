"""Tiny random-weight Hugging Face models saved to disk, for the conversion tests.

Weights are redrawn at O(1) scale (transformers' 0.02-std init leaves near-constant logits that
would hide layout errors). Head dims equal hidden / heads, as the native config derives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

VOCAB, SEQ, BATCH = 300, 24, 2
LLAMA_SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=96,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
NEOX_SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    rotary_pct=0.25,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def hf_config(case: str, **overrides: Any) -> Any:
    """A transformers config for one named case."""
    from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    builders = {
        "llama3": lambda: LlamaConfig(
            **{**LLAMA_SIZES, "vocab_size": 512}, rope_parameters=dict(LLAMA3_ROPE)
        ),
        "mistral_window": lambda: MistralConfig(**LLAMA_SIZES, sliding_window=8),
        "qwen2_tied": lambda: Qwen2Config(**LLAMA_SIZES, tie_word_embeddings=True),
        "neox_parallel": lambda: GPTNeoXConfig(
            **NEOX_SIZES, use_parallel_residual=True, hidden_act="gelu"
        ),
        "neox_sequential": lambda: GPTNeoXConfig(
            **NEOX_SIZES, use_parallel_residual=False, hidden_act="gelu_new"
        ),
    }
    cfg = builders[case]()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


CASES = ["llama3", "mistral_window", "qwen2_tied", "neox_parallel", "neox_sequential"]


@dataclass
class HFModel:
    """A saved random model and its reference outputs."""

    dir: Path
    config: Any
    state_dict: dict[str, torch.Tensor]
    tokens: torch.Tensor
    logits: torch.Tensor


def _redraw(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" in name:
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:  # norm weights
                p.normal_(1.0, 0.1)


def save_random_model(
    config: Any, out: Path, seed: int = 0, max_shard_size: str | None = None
) -> HFModel:
    """Build a random fp32 model from ``config``, save it to ``out``, return its references."""
    from transformers import AutoModelForCausalLM

    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _redraw(model)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ))
    tokens[0, :2] = torch.tensor([0, config.vocab_size - 1])
    with torch.no_grad():
        logits = model(tokens).logits
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return HFModel(out, config, sd, tokens, logits)


def load_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``hf_dir``."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def save_random_classifier(config: Any, out: Path, seed: int = 0) -> Any:
    """A random fp32 ``*ForSequenceClassification`` (a reward model when ``num_labels`` is 1)
    built from ``config`` and saved to ``out``; returns the model (eval mode, eager attention)."""
    from transformers import AutoModelForSequenceClassification

    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32).eval()
    _redraw(model)
    model.save_pretrained(out)
    return model
