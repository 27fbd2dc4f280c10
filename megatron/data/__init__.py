"""Data pipeline: indexed mmap format, datasets per format, samplers, preprocessing.

Heavy dependencies (``transformers``, ``datasets``, ``tqdm``) are imported only when used.
"""

from megatron.data.indexed import (
    DatasetError,
    DatasetNotFoundError,
    IndexedDataset,
    IndexedDatasetWriter,
    best_dtype,
)
from megatron.data.meta import check_meta, make_meta, read_meta, write_meta
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
    "DatasetError",
    "DatasetNotFoundError",
    "GlobalBatchSampler",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "PreprocessError",
    "PreprocessOptions",
    "PreprocessSummary",
    "TextDataset",
    "best_dtype",
    "check_meta",
    "make_meta",
    "preprocess",
    "read_meta",
    "write_meta",
]
