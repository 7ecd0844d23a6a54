"""The config file: schema, loading with field-path errors, lint warnings, compiled runtime."""

from controlplane.config.load import LoadedConfig, load_config, parse_config
from controlplane.config.runtime import Gateway, Policy, Rule, Target

__all__ = ["Gateway", "LoadedConfig", "Policy", "Rule", "Target", "load_config", "parse_config"]
