"""Data pipeline: indexed mmap format, post-training formats, datasets, blending, collators.

Heavy dependencies (``transformers``, ``datasets``, ``tqdm``) are imported only when used.
"""

from megatron.data.blending import BlendedDataset, SubsetDataset, split_indices
from megatron.data.builders import RunData, build_data
from megatron.data.collators import Collator, collate_sequences
from megatron.data.datasets import PairwiseDataset, PromptDataset, SFTDataset, UnpairedDataset
from megatron.data.indexed import (
    DatasetError,
    DatasetNotFoundError,
    IndexedDataset,
    IndexedDatasetWriter,
    best_dtype,
)
from megatron.data.meta import check_dataset_compat, check_meta, make_meta, read_meta, write_meta
from megatron.data.preprocess import (
    FORMATS,
    PreprocessError,
    PreprocessOptions,
    PreprocessSummary,
    preprocess,
)
from megatron.data.sampler import GlobalBatchSampler
from megatron.data.text_dataset import TextDataset

__all__ = [
    "FORMATS",
    "BlendedDataset",
    "Collator",
    "DatasetError",
    "DatasetNotFoundError",
    "GlobalBatchSampler",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "PairwiseDataset",
    "PreprocessError",
    "PreprocessOptions",
    "PreprocessSummary",
    "PromptDataset",
    "SFTDataset",
    "SubsetDataset",
    "TextDataset",
    "UnpairedDataset",
    "best_dtype",
    "RunData",
    "build_data",
    "check_dataset_compat",
    "check_meta",
    "collate_sequences",
    "make_meta",
    "preprocess",
    "read_meta",
    "split_indices",
    "write_meta",
]
