"""Validated YAML configs: one loader for training, evaluation and serving configs.

An invalid file fails before anything starts, with a message that names the file and every bad field, e.g.
``configs/x.yaml: invalid config: optim.lr: Input should be greater than 0``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """A config section: unknown keys are errors (a typo never passes silently)."""

    model_config = ConfigDict(extra="forbid")


class ConfigError(ValueError):
    """An invalid config; the message names the file and the field."""


def apply_overrides(raw: dict, overrides: dict[str, Any] | None) -> dict:
    """Set dotted keys (``optim.steps``) on ``raw``; string values are parsed as YAML scalars (``"2"`` -> 2)."""
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = yaml.safe_load(value) if isinstance(value, str) else value
    return raw


def load_config_file(source: str | Path | dict, model: type[M], overrides: dict[str, Any] | None = None) -> M:
    """Read ``source`` (a YAML file, or a mapping), apply ``overrides`` and validate it as ``model``."""
    where = "config"
    if isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    raw = apply_overrides(raw, overrides)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{where}: invalid config: {fields}") from exc
