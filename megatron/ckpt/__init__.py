"""Native checkpoints on disk and their conversion: Hugging Face <-> native, TP resharding.

* :mod:`megatron.ckpt.layout`: a checkpoint directory's ``latest`` pointer and ``iter_*`` tags.
* :mod:`megatron.ckpt.hf_config`: Hugging Face configs <-> :class:`~megatron.config.ModelConfig`
  and the ``model:`` YAML section.
* :mod:`megatron.ckpt.hf_mapping`: Hugging Face <-> native weights, TP split / gather / reshard.
* :mod:`megatron.ckpt.hf_io`: lazy reading of Hugging Face weights (safetensors or ``.bin``,
  single or sharded with an index) and a streaming sharded safetensors writer.
* :mod:`megatron.ckpt.native`: the native checkpoint's model files, per TP rank, written
  DeepSpeed-compatibly and read back from any ZeRO stage (ZeRO-3 through DeepSpeed's
  ``zero_to_fp32``), resharded to another TP size on the fly.
* :mod:`megatron.ckpt.convert`: the three conversions behind ``tools/ckpts/`` (see its README).
* :mod:`megatron.ckpt.run_tokenizer`: the run's tokenizer and chat template that a native ->
  Hugging Face export carries.

This package sits below :mod:`megatron.training` (whose checkpointing reads and writes through
it) and above :mod:`megatron.config` (``run_tokenizer`` also reads :mod:`megatron.data`'s
dataset metadata); submodules are imported explicitly.
"""


class ConversionError(ValueError):
    """Input a conversion cannot use; the message names the file or field and the fix."""
