"""Where the committed models and the config presets are. The library never looks for models next to its own
source (an installed twostep has no repository around it): the default feature nets and teachers
(`features-<data>/`, `teacher-<data>/`) are read from $TWOSTEP_MODELS, which defaults to ./models, so the
repository's own commands work from its root. The config presets (`twostep/presets/*.yaml`: the methods' configs,
the demo's and the Z-Image-Turbo presets) are package data, found by name: `--config zimage-turbo-lora-1gpu`;
$TWOSTEP_CONFIGS, when set, is searched first. Every command that reads one takes an explicit flag or path too,
which wins.
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


PRESETS = Path(__file__).resolve().parent / "presets"  # package data (pyproject.toml: package-data)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def committed_config(name: str, flag: str) -> Path:
    """The preset NAME (e.g. demo-defaults.yaml): from $TWOSTEP_CONFIGS when set, else the package's presets;
    `flag` is the option that overrides it."""
    if os.environ.get(CONFIGS_ENV):
        return _committed(CONFIGS_ENV, "configs", name, flag)
    path = PRESETS / name
    if not path.is_file():
        raise UserError(f"preset {name} not found in {PRESETS}; pass {flag}")
    return path


def config_file(value: str | Path, flag: str = "--config") -> Path:
    """A --config value: an existing YAML file, else the name of a preset (`zimage-turbo-lora-1gpu`, with or
    without .yaml; $TWOSTEP_CONFIGS first when set)."""
    path = Path(value)
    if path.is_file():
        return path
    if path.exists():  # os.stat only: a folder, a FIFO (reading it would block), a device
        raise UserError(f"{flag} {value}: not a regular file; give a YAML file or one of the presets: "
                        f"{', '.join(preset_names())}")
    name = path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml"
    if path.parent == Path("."):
        for root in ([Path(os.environ[CONFIGS_ENV])] if os.environ.get(CONFIGS_ENV) else []) + [PRESETS]:
            if (root / name).is_file():
                return root / name
    raise UserError(f"{flag} {value}: no such file and no preset of that name; give a YAML file or one of the "
                    f"presets: {', '.join(preset_names())}")
