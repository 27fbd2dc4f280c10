"""Derive the DeepSpeed config dict from a resolved :class:`RunConfig` (one direction only).

The dict holds batch sizes, clipping, ZeRO and mixed precision. It has no ``optimizer`` or
``scheduler`` entry: the trainer builds torch AdamW and its own LR schedule and passes them to
``deepspeed.initialize``. Logging is ours, so DeepSpeed's step printing is pushed out of reach.
"""

from __future__ import annotations

from typing import Any

from megatron.config.sections import RunConfig

# DeepSpeed prints every `steps_per_print` steps; we log ourselves.
_NEVER = 10**12
# Bucket sizes of DeepSpeed's defaults (elements); large buckets keep communication efficient.
# Their memory (ZeRO-1/2: two reduction buffers of this many elements; ZeRO-3: one) is in the
# planner's model (megatron/planner.py).
BUCKET_ELEMENTS = 500_000_000


def _zero_section(stage: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 0:
        return zero
    zero.update(
        overlap_comm=True,
        contiguous_gradients=True,
        reduce_scatter=True,
        reduce_bucket_size=BUCKET_ELEMENTS,
    )
    if stage in (1, 2):
        zero.update(allgather_partitions=True, allgather_bucket_size=BUCKET_ELEMENTS)
    if stage == 3:
        # Save consolidated 16-bit weights so checkpoints convert without a ZeRO-3 gather step.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return zero


def deepspeed_config(cfg: RunConfig) -> dict[str, Any]:
    """The ``config`` dict for ``deepspeed.initialize``.

    Args:
        cfg: a config returned by :func:`megatron.config.load_config` (batch sizes resolved).

    Returns:
        A JSON-serialisable dict: ``train_batch_size``, ``train_micro_batch_size_per_gpu``,
        ``gradient_accumulation_steps``, ``gradient_clipping``, ``zero_optimization``, ``bf16``,
        ``fp16`` (dynamic loss scale: ``loss_scale: 0``), ``steps_per_print``,
        ``wall_clock_breakdown``, ``zero_allow_untested_optimizer``.

    Raises:
        ValueError: if the batch sizes were not resolved (config not built by ``load_config``).
    """
    train = cfg.training
    if train.global_batch_size is None or train.gradient_accumulation_steps is None:
        raise ValueError(
            "training.global_batch_size / gradient_accumulation_steps are unresolved; "
            "build the config with megatron.config.load_config"
        )
    fp16 = train.precision == "fp16"
    plain = cfg.parallel.zero_stage == 0 and train.precision == "fp32"
    ds: dict[str, Any] = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        # why: in fp32 without ZeRO DeepSpeed clips but keeps no norm; the trainer's optimizer
        # hook (megatron.training.step.GradNormMeter) clips there with the same rule instead.
        "gradient_clipping": 0.0 if plain else train.gradient_clipping,
        "zero_optimization": _zero_section(cfg.parallel.zero_stage),
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {
            "enabled": fp16,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        # The optimizer is torch AdamW built by the trainer; ZeRO must accept it.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }
    if train.precision == "bf16":
        # fp32 gradient accumulation (fp32 main gradients) under bf16 parameters.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds
