"""Typed configuration: the schema (schema.py), loaded from conf/*.yaml and dotted overrides
(loading.py); the rules on its values are rules.py's, run by the start-up check (trainer/startup.py,
docs/design.md)."""

from nemo_rlsr.config.loading import COMMAND_LINE, from_dict, load_config, to_dict
from nemo_rlsr.config.schema import (
    ClusterConfig,
    ConfigError,
    DataConfig,
    GRPOConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    PretrainConfig,
    RewardConfig,
    RewardTermConfig,
    RLSRConfig,
    RolloutConfig,
    SFTConfig,
    TrainerConfig,
)

__all__ = [
    "COMMAND_LINE", "ClusterConfig", "ConfigError", "DataConfig", "GRPOConfig", "LoggingConfig", "ModelConfig",
    "OptimizerConfig", "ParallelConfig", "PretrainConfig", "RLSRConfig", "RewardConfig", "RewardTermConfig", "RolloutConfig",
    "SFTConfig", "TrainerConfig", "from_dict", "load_config", "to_dict",
]
