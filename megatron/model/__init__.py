"""GPT decoder (Llama family and GPT-NeoX/Pythia) built from tensor-parallel layers."""

from megatron.model.attention import SequenceLayout
from megatron.model.gpt import DTYPES, GPTModel

__all__ = ["DTYPES", "GPTModel", "SequenceLayout"]
