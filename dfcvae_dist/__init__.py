"""dfcvae_dist: distributed training of the Deep Feature Consistent VAE and its baselines.

The Python API (docs/python-api.md):

    from dfcvae_dist import Trainer, load_config
    cfg = load_config("quickstart", ["train.max_steps=100"])   # a shipped config's name or a YAML path, overrides
    summary = Trainer(cfg).fit()                               # in this process; also under accelerate launch

Its names load on first use, so `import dfcvae_dist` (and every console script) imports neither torch,
accelerate nor MLflow until it needs them.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"Trainer": "dfcvae_dist.training.trainer", "load_config": "dfcvae_dist.config",
            "Config": "dfcvae_dist.config"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
