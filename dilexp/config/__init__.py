"""The typed config schema (``schema``), its check at job start (``check``), and the
``dilexp.env`` resolver that gives environment-backed settings their one default."""

from __future__ import annotations

import os
from typing import Any

from omegaconf import OmegaConf

from dilexp.config.check import check_config, check_node
from dilexp.errors import ConfigError


def env_setting(var: str) -> Any:
    """``${dilexp.env:VAR}``: $VAR parsed to its setting's type, else the setting's default.

    The defaults live in Python (``dilexp.cache.settings.ENV_SETTINGS``), so the yaml and
    ``build_cache`` outside Hydra cannot disagree. A bad value names the variable.
    """
    from dilexp.cache.settings import ENV_SETTINGS

    if var not in ENV_SETTINGS:
        raise ConfigError("dilexp.env", var, f"unknown setting variable; known: {', '.join(sorted(ENV_SETTINGS))}")
    default, parse = ENV_SETTINGS[var]
    raw = os.environ.get(var)
    return default if raw is None else parse(var, raw)


if not OmegaConf.has_resolver("dilexp.env"):
    # use_cache=False: a sweep job reads the environment as it is when the job starts.
    OmegaConf.register_new_resolver("dilexp.env", env_setting, use_cache=False)

__all__ = ["check_config", "check_node", "env_setting"]
