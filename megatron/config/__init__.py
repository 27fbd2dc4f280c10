"""Run configuration: typed dataclass sections and the one strict YAML loader.

Typical use::

    from megatron.config import load_config, deepspeed_config
    cfg = load_config(["configs/models/tiny.yml", "configs/tiny.yml"], ["training.train_iters=50"])
    ds_config = deepspeed_config(cfg)

See ``configs/README.md`` (generated from the field docstrings) for every key.
"""

from megatron.config.deepspeed import deepspeed_config
from megatron.config.loader import load_config, read_config_file, save_config, split_config_args
from megatron.config.sections import (
    SECTIONS,
    CheckpointConfig,
    DataConfig,
    DataSource,
    LauncherConfig,
    LoggingConfig,
    ModelConfig,
    ObjectiveSection,
    OptimizerConfig,
    ParallelConfig,
    RopeScaling,
    RunConfig,
    ScheduleConfig,
    TrainingConfig,
    config_to_dict,
)
from megatron.config.validate import validate_config
from megatron.errors import ConfigError, SectionError

__all__ = [
    "SECTIONS",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DataSource",
    "LauncherConfig",
    "LoggingConfig",
    "ModelConfig",
    "ObjectiveSection",
    "OptimizerConfig",
    "ParallelConfig",
    "RopeScaling",
    "RunConfig",
    "ScheduleConfig",
    "SectionError",
    "TrainingConfig",
    "config_to_dict",
    "deepspeed_config",
    "load_config",
    "read_config_file",
    "save_config",
    "split_config_args",
    "validate_config",
]
