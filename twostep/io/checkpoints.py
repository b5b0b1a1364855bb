"""Training checkpoints in safetensors only (no pickle): module weights, optimizer state, RNG states, JSON meta.

A checkpoint is a folder `step-XXXXXXXX/`, written as `step-XXXXXXXX.partial/` and renamed; it is complete when
its `meta.json` exists (written last), so a crash never leaves a half checkpoint that looks complete. A module
name with a `/` is a file in a subfolder (a distillation's `ema/step1`: its EMA in the run folder's format,
which the run folder links to, twostep.train.state).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .. import faults
from .files import atomic_save_tensors, atomic_write_text, load_tensors


def optimizer_to_tensors(opt) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer, or a state dict already gathered from one (FSDP: full tensors), as tensors + JSON metadata."""
    sd = opt if isinstance(opt, dict) else opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict):
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict[str, torch.Tensor]:
    st = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["torch_cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(t: dict[str, torch.Tensor]):
    if "torch_cpu" in t:
        torch.set_rng_state(t["torch_cpu"])
    if "torch_cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["torch_cuda"])


def write_checkpoint(folder: Path, modules: dict[str, dict[str, torch.Tensor]], meta: dict, keep: int = 2,
                     optimizers: dict | None = None, metadata: dict[str, dict] | None = None):
    """Write `folder/step-XXXXXXXX/` atomically (tmp dir + rename), then prune to the newest `keep`.
    `metadata`: {module name: safetensors metadata of its file} (e.g. the run folder's update stamp)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{int(meta['step']):08d}"
    tmp = folder / (name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for mname, sd in modules.items():
        (tmp / mname).parent.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(sd, tmp / f"{mname}.safetensors", metadata=(metadata or {}).get(mname))
    faults.point("ckpt.mid")
    opt_meta = {}
    for oname, opt in (optimizers or {}).items():
        t, m = optimizer_to_tensors(opt)
        atomic_save_tensors(t, tmp / f"optim_{oname}.safetensors")
        opt_meta[oname] = m
    atomic_save_tensors(rng_state(), tmp / "rng.safetensors")
    atomic_write_text(tmp / "optim.json", json.dumps(opt_meta))
    atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))  # last: marks completeness
    return publish(tmp, folder / name, keep)


def publish(tmp: Path, final: Path, keep: int) -> Path:
    """Rename a complete checkpoint folder `tmp` (meta.json written) to `final`, then keep only the newest `keep`
    complete step-* folders beside it."""
    faults.point("ckpt.rename")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    faults.point("ckpt.prune")
    done = sorted(p for p in final.parent.glob("step-*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def link_file(src: Path, dst: Path) -> None:
    """`dst` becomes the same file as `src` (a hard link: no bytes written), atomically (a temporary sibling renamed
    over `dst`); a copy where the filesystem has no hard links. Files here are never modified in place (every write
    is a new file renamed over the old), so a linked file never changes under its other name."""
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here (some network / FAT filesystems): copy
        shutil.copyfile(src, tmp)
    try:
        tmp.replace(dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (has meta.json); partial ones are ignored."""
    folder = Path(folder)
    if not folder.exists():
        return None
    done = sorted(p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".partial")
                  and (p / "meta.json").exists())
    return done[-1] if done else None


def read_checkpoint(ck: Path, optimizers: dict[str, torch.optim.Optimizer] | None = None, transforms=None):
    """Load optimizer and RNG state; return meta.json. transforms: {optimizer name: transform(name, tensor)} applied
    while reading its state (FSDP: each full tensor becomes this rank's shard; see load_tensors)."""
    meta = json.loads((ck / "meta.json").read_text())
    opt_meta = json.loads((ck / "optim.json").read_text()) if (ck / "optim.json").exists() else {}
    for oname, opt in (optimizers or {}).items():
        tf = (transforms or {}).get(oname)
        optimizer_from_tensors(opt, load_tensors(ck / f"optim_{oname}.safetensors", tf), opt_meta[oname])
    set_rng_state(load_tensors(ck / "rng.safetensors"))
    return meta
