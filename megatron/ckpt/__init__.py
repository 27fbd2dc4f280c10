"""Checkpoint conversion: Hugging Face <-> native checkpoints and tensor-parallel resharding.

* :mod:`megatron.ckpt.hf_io`: lazy reading of Hugging Face weights (safetensors or ``.bin``,
  single or sharded with an index) and a streaming sharded safetensors writer.
* :mod:`megatron.ckpt.native`: the native checkpoint's model files, per TP rank, written
  DeepSpeed-compatibly and read back from any ZeRO stage (ZeRO-3 through DeepSpeed's
  ``zero_to_fp32``), resharded to another TP size on the fly.
* :mod:`megatron.ckpt.convert`: the three conversions behind ``tools/ckpts/`` (see its README).

Submodules are imported explicitly; this package imports nothing so that
:mod:`megatron.training.checkpointing` can use :mod:`megatron.ckpt.native` without a cycle.
"""


class ConversionError(ValueError):
    """Input a conversion cannot use; the message names the file or field and the fix."""
