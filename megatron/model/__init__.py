"""GPT decoder (Llama family and GPT-NeoX/Pythia) built from tensor-parallel layers."""

from megatron.model.gpt import DTYPES, GPTModel
from megatron.model.layout import SequenceLayout

__all__ = ["DTYPES", "GPTModel", "SequenceLayout"]
