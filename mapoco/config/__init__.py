"""Typed run configuration, built from the Hydra config and validated in one place before any actor starts.

Every error names the key, the value and what is allowed, e.g.
``turns=0: must be an integer >= 1 (number of discussion turns)``.

    schema      every key, its type and default (dataclasses), and the name lists
    loading     a Hydra mapping -> RunConfig (type checks, then validation); the defaults tree conf/ starts from
    validate    validation by area: validate_team, validate_training, validate_conductor (checks: their parts)
    derived     what the runtime derives from a validated config; changed (a copy with keys set: configs are frozen)
"""

from mapoco.config.checks import check_writable_dir
from mapoco.config.derived import changed, gpu_sharing, lora_engine_config
from mapoco.config.loading import build, default_tree, from_dict
from mapoco.config.schema import (
    COMMANDS,
    GPU_MEMORY_CAP,
    VLLM_LORA_RANKS,
    AgentConfig,
    AlgorithmConfig,
    ClusterConfig,
    ConductorConfig,
    ConfigError,
    DiscussionConfig,
    EngineConfig,
    HttpWorkerConfig,
    LearnerConfig,
    LoggerConfig,
    PriceConfig,
    RewardConfig,
    RunConfig,
    SamplingConfig,
    ServeConfig,
    TeamConfig,
    TrainConfig,
    VerifierConfig,
    WandbConfig,
    WorkflowConfig,
)
from mapoco.config.validate import validate
from mapoco.config.validate_team import check_models

__all__ = ["COMMANDS", "GPU_MEMORY_CAP", "VLLM_LORA_RANKS", "AgentConfig", "AlgorithmConfig", "ClusterConfig",
           "ConductorConfig", "ConfigError", "DiscussionConfig", "EngineConfig", "HttpWorkerConfig", "LearnerConfig",
           "LoggerConfig", "PriceConfig", "RewardConfig", "RunConfig", "SamplingConfig", "ServeConfig", "TeamConfig",
           "TrainConfig", "VerifierConfig", "WandbConfig", "WorkflowConfig", "build", "changed", "check_models",
           "check_writable_dir", "default_tree", "from_dict", "gpu_sharing", "lora_engine_config", "validate"]
