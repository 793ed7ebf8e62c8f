"""Training configs as code: one module per experiment, each defining CONFIG (a TrainConfig) and its launch
command in the docstring. `locca train --config NAME` takes a module name from here or a path to a .py file."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path

from ..config import TrainConfig


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def load(name: str) -> TrainConfig:
    if name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(name).stem, name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    elif name in available():
        module = importlib.import_module(f"{__name__}.{name}")
    else:
        raise KeyError(f"no training config {name!r}; available: {', '.join(available())} (or a path to a .py file)")
    cfg = getattr(module, "CONFIG", None)
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"config {name!r} must define CONFIG = TrainConfig(...)")
    return cfg
