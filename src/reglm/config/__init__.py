"""Configuration: frozen dataclasses per stage and component, presets, and the one parser of
``key=value`` options (:mod:`reglm.config.build`)."""

from reglm.config.describe import describe, describe_values
from reglm.config.fields import MAX_SEED
from reglm.config.parse import parse_assignments, parse_value
from reglm.config.presets import build_config, derive_config, list_presets, load_config_file, load_preset
from reglm.config.schema import (
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    architecture_differences,
)


def describe_options() -> str:
    """One line per option of every component kind: key, type, default, help, kinds."""
    return describe(RunConfig)


__all__ = [
    "MAX_SEED",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "architecture_differences",
    "build_config",
    "derive_config",
    "describe_options",
    "describe_values",
    "list_presets",
    "load_config_file",
    "load_preset",
    "parse_assignments",
    "parse_value",
]
