"""Where the committed models and configs are. The library never looks for them next to its own source (an
installed twostep has no repository around it): the default feature nets and teachers (`features-<data>/`,
`teacher-<data>/`) are read from $TWOSTEP_MODELS and the demo's config from $TWOSTEP_CONFIGS, which default to
./models and ./configs, so the repository's own commands work from its root. Every command that reads one takes
an explicit flag too, which wins.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

MODELS_ENV, CONFIGS_ENV = "TWOSTEP_MODELS", "TWOSTEP_CONFIGS"


def _committed(env: str, default: str, name: str, flag: str) -> Path:
    root = Path(os.environ.get(env, default))
    path = root / name
    if not path.exists():
        raise UserError(f"{path}: not found; pass {flag}, or set {env} to the folder that holds {name} "
                        f"(default ./{default}: the twostep repository's, when run from its root)")
    return path.resolve()


def committed_model(name: str, flag: str) -> Path:
    """models/NAME (e.g. features-shapes) under $TWOSTEP_MODELS; `flag` is the option that overrides it."""
    return _committed(MODELS_ENV, "models", name, flag)


def committed_config(name: str, flag: str) -> Path:
    """configs/NAME (e.g. demo.yaml) under $TWOSTEP_CONFIGS; `flag` is the option that overrides it."""
    return _committed(CONFIGS_ENV, "configs", name, flag)
