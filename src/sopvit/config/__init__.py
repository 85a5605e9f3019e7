"""Typed configuration: nested dataclass schemas loaded from YAML recipes and ``key=value`` overrides."""

from sopvit.config.coerce import ConfigError, check
from sopvit.config.loader import (
    apply_overrides,
    config_to_dict,
    load_config,
    recipe_header,
    save_config,
    validate_config,
)

__all__ = [
    "ConfigError",
    "apply_overrides",
    "check",
    "config_to_dict",
    "load_config",
    "recipe_header",
    "save_config",
    "validate_config",
]
