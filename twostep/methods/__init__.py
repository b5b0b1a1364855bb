"""Distillation methods. A method owns its networks and losses and knows nothing of processes, checkpoints or
progress bars; the one training loop (twostep.train) uses the contract of .base.Method.

turbopp — the method; ladd, dmd2, diffusion2gan — the trained peers (docs/peers.md); the untrained naive peer
(the teacher at 2 Euler steps) lives in twostep.sampling as generators, not as a method.

The registry below is the one list of methods: it gives the config's `method` choices, and each method's own
config sections (Method.sections) join the shared ones in that method's config class (`config_class`), so a
dmd2 run's config has `dmd` and no `loss` or `d2g`. `load_config` lives here, not in twostep.config, because it
needs the registry and twostep.config sits below the methods (they import its sections and helpers).
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config, distill_config_class, from_dict, read_sections
from ..errors import UserError
from .base import Method
from .diffusion2gan import Diffusion2GAN
from .dmd2 import DMD2
from .ladd import LADD
from .turbopp import TurboPP

REGISTRY: dict[str, type[Method]] = {m.name: m for m in (TurboPP, LADD, DMD2, Diffusion2GAN)}
METHODS = tuple(REGISTRY)
DEFAULT_METHOD = "turbopp"

_CONFIG_CLASSES = {name: distill_config_class(f"{m.__name__}Config", name, METHODS, m.sections)
                   for name, m in REGISTRY.items()}


def config_class(method: str = DEFAULT_METHOD) -> type:
    """The config dataclass of a method: method, student, disc, the method's own sections, train."""
    return _CONFIG_CLASSES[method]


def default_config(method: str = DEFAULT_METHOD) -> Config:
    """A method's config with every default (what load_config gives for method=... and nothing else)."""
    return config_class(method)()


def load_config(path: Path | None = None, sets: list[str] | None = None) -> Config:
    """A distill config from a YAML file and `--set a.b=c` overrides; its `method` (default turbopp) decides which
    sections exist. An unknown key, a wrong type, a value outside its choices or another method's section is a
    one-line UserError naming the key."""
    d = read_sections(path, sets)
    method = from_dict(config_class(), {"method": d.get("method", DEFAULT_METHOD)}).method  # type and choice
    cls = config_class(method)
    for key in d:
        owners = [m.name for m in REGISTRY.values() if key in m.sections and key not in REGISTRY[method].sections]
        if owners:
            raise UserError(f"unknown config key {key!r} for method {method}: it is the section of method "
                            f"{', '.join(owners)}; drop it or set method={owners[0]}")
    return from_dict(cls, d)


def build_method(cfg, teacher_backbone) -> Method:
    """The method `cfg.method` with its student and critic built on the frozen teacher backbone."""
    if cfg.method not in REGISTRY:
        raise UserError(f"method {cfg.method!r} is not implemented (available: {', '.join(METHODS)})")
    return REGISTRY[cfg.method](cfg, teacher_backbone)
