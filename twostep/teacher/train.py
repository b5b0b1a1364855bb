"""Flow-matching training of a teacher (minRF-style): logit-normal σ, caption dropout for CFG, EMA with
warm-up, loss logged per σ bin, resumable safetensors checkpoints, time-budgeted (`--minutes` is the total).

Loss: ‖u_θ(x_σ, t = 1 − σ, c) − (x0 − ε)‖² with x_σ = (1 − σ)x0 + σε (flow.add_noise / flow.flow_target).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import flow
from ..backbones.zimage import ZImageBackbone, tiny_zimage_config
from ..config import choice, opt, to_dict
from ..io.checkpoints import latest_checkpoint, read_checkpoint, write_checkpoint
from ..io.files import all_finite, atomic_save_tensors, atomic_write_text, load_tensors
from ..data import get_dataset
from ..ema import ema_decay, ema_update
from ..errors import UserError
from ..text import get_encoder

SIGMA_BINS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


@dataclass
class TeacherTrainConfig:
    """`twostep teacher train` (YAML --config, --set key=value, or the command's flags); the resolved config is
    saved as train_config.json in the model folder, and a re-run with other architecture keys is refused."""
    data: str = opt("shapes", "shapes | photos | a folder with captions.jsonl")
    resolution: int = opt(32, "image side in pixels")
    num_train: int = opt(20000, "size of the fixed training pool (images + captions)")
    batch_size: int = opt(32, "images per update")
    lr: float = opt(5e-4, "AdamW learning rate (after the linear warm-up)")
    warmup_steps: int = opt(200, "updates of linear learning-rate warm-up")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    ema: float = opt(0.999, "EMA decay of the weights (with warm-up)")
    caption_dropout: float = opt(0.1, "fraction of captions replaced by the empty caption (for CFG)")
    minutes: float = opt(30.0, "TOTAL training wall time in minutes (a resumed run continues up to it)")
    max_steps: int = opt(0, "stop after this many updates (0 = no step limit)")
    seed: int = opt(0, "seed of the run (weights, pool, batches)")
    checkpoint_minutes: float = opt(5.0, "wall minutes between checkpoints")
    dim: int = opt(128, "transformer width (dim / n_heads must be a multiple of 8)")
    n_layers: int = opt(4, "transformer layers")
    n_heads: int = opt(2, "attention heads")
    n_refiner_layers: int = opt(1, "refiner layers per stream")
    patch_size: int = opt(4, "patch side in pixels")
    default_guidance: float = opt(2.0, "the CFG scale written to config.json (`twostep teacher tune-guidance` "
                                  "replaces it by the one chosen by FD)")
    skip_bad: bool = opt(False, "skip (and count) unreadable images / caption lines of a folder dataset")
    init: str = opt("", "continue from this teacher folder's (EMA) weights (same architecture; fresh optimizer)")
    lr_decay: str = choice("none", ["none", "linear"], "after warm-up: constant learning rate (none) or linear "
                           "decay to 0 over the budget (minutes, or max_steps)")


# the shortcut flags of `twostep teacher train` (every key can also be given by --config / --set)
FLAGS = ("data", "minutes", "max_steps", "batch_size", "lr", "dim", "n_layers", "n_heads", "patch_size", "num_train",
         "ema", "seed", "init", "lr_decay", "skip_bad")
# the keys a re-run of the same --out must keep (another value is another teacher)
ARCH_KEYS = ("data", "dim", "n_layers", "n_heads", "n_refiner_layers", "patch_size", "resolution", "seed")


def model_config(cfg: TeacherTrainConfig, channels: int = 3, cap_dim: int = 384) -> dict:
    return {
        "kind": "teacher",
        "backbone": "zimage",
        "transformer": tiny_zimage_config(in_channels=channels, dim=cfg.dim, n_layers=cfg.n_layers,
                                          n_heads=cfg.n_heads, n_refiner_layers=cfg.n_refiner_layers,
                                          cap_feat_dim=cap_dim, patch_size=cfg.patch_size),
        "resolution": cfg.resolution,
        "text_encoder": "all-MiniLM-L6-v2",
        "data": cfg.data,
        "sampling": {"steps": 8, "shift": flow.DEFAULT_SHIFT, "guidance": cfg.default_guidance},
    }


def train_teacher(cfg: TeacherTrainConfig, out: Path, progress: bool = True) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckdir = out / "checkpoints"
    saved_cfg = out / "train_config.json"
    if saved_cfg.exists():
        prev = json.loads(saved_cfg.read_text())
        diff = [k for k in ARCH_KEYS if prev.get(k) != getattr(cfg, k)]
        if diff:
            raise UserError(f"{out}: holds a different teacher run ({', '.join(f'{k}={prev.get(k)}' for k in diff)});"
                            " choose another --out or the same settings to resume")
    atomic_write_text(saved_cfg, json.dumps(to_dict(cfg), indent=1))
    mcfg = model_config(cfg)

    torch.manual_seed(cfg.seed)
    ds = get_dataset(cfg.data, cfg.resolution, skip_bad=cfg.skip_bad)
    if getattr(ds, "version", None) is not None:  # shapes v1/v2: evaluation refuses a model of another version
        mcfg["data_version"] = ds.version
    pool = ds.sample(cfg.num_train, seed=cfg.seed, split="train") if hasattr(ds, "sample") else None
    images = pool.images
    captions = pool.captions
    enc = get_encoder()
    uniq = sorted(set(captions))
    feats = dict(zip(uniq, enc.encode(uniq, progress=progress)))
    text = [feats[c] for c in captions]
    null = enc.encode([""])[0]

    model = ZImageBackbone.from_config(mcfg["transformer"], seed=cfg.seed)
    lineage = None
    if cfg.init:
        lineage = _init_from(model, Path(cfg.init), mcfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    step, elapsed = 0, 0.0
    log: list[dict] = []
    ck = latest_checkpoint(ckdir)
    if ck is not None:
        model.transformer.load_state_dict(load_tensors(ck / "model.safetensors"))
        ema.transformer.load_state_dict(load_tensors(ck / "ema.safetensors"))
        meta = read_checkpoint(ck, {"model": opt})
        step, elapsed = meta["step"], meta["elapsed_s"]
        log = meta.get("log", [])
        print(f"resumed from {ck} (step {step}, {elapsed / 60:.1f} min trained)")

    budget = cfg.minutes * 60
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=int(budget), initial=int(min(elapsed, budget)), unit="s", desc=f"teacher[{cfg.data}]",
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}s [{elapsed}<{remaining}{postfix}]")
    bin_sum = torch.zeros(len(SIGMA_BINS) - 1)
    bin_cnt = torch.zeros(len(SIGMA_BINS) - 1)
    run_loss, t_last_ck, t0 = None, time.time(), time.time() - elapsed
    model.train()
    while elapsed < budget and (cfg.max_steps <= 0 or step < cfg.max_steps):
        ts = time.time()
        idx = torch.randint(0, len(captions), (cfg.batch_size,))
        x0 = images[idx]
        drop = torch.rand(cfg.batch_size) < cfg.caption_dropout
        cap = [null if d else text[i] for i, d in zip(idx.tolist(), drop.tolist())]
        sigma = torch.sigmoid(torch.randn(cfg.batch_size))  # logit-normal(0, 1) σ (SD3 / minRF)
        noise = torch.randn_like(x0)
        x_sigma = flow.add_noise(x0, noise, sigma)
        u = model.raw_output(x_sigma, sigma, cap)
        per = (u - flow.flow_target(x0, noise)).square().mean(dim=(1, 2, 3))
        loss = per.mean()
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * _decay(cfg, step, time.time() - t0, budget)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not torch.isfinite(loss):
            print(f"step {step}: non-finite loss, update skipped")
            continue
        opt.step()
        step += 1
        ema_update(ema, model, ema_decay(step, cfg.ema))
        b = torch.bucketize(sigma.detach(), torch.tensor(SIGMA_BINS[1:-1]))
        bin_sum.index_add_(0, b, per.detach())
        bin_cnt.index_add_(0, b, torch.ones_like(per))
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        dt = time.time() - ts
        elapsed = time.time() - t0
        if bar is not None:
            bar.n = int(min(elapsed, budget))
            bar.set_postfix(step=step, loss=f"{run_loss:.4f}", it_s=f"{1 / max(dt, 1e-9):.2f}", refresh=False)
            bar.refresh()
        if step % 200 == 0:
            bins = (bin_sum / bin_cnt.clamp(min=1)).tolist()
            log.append({"step": step, "minutes": elapsed / 60, "loss": run_loss,
                        "loss_per_sigma_bin": dict(zip([f"{a:.1f}-{b:.1f}" for a, b in zip(SIGMA_BINS, SIGMA_BINS[1:])],
                                                       [round(v, 5) for v in bins]))})
            bin_sum.zero_(); bin_cnt.zero_()
            if bar is None:
                print(json.dumps(log[-1]), flush=True)
        if time.time() - t_last_ck > cfg.checkpoint_minutes * 60:
            _save(ckdir, model, ema, opt, step, elapsed, log)
            _export(out, ema, mcfg, step, elapsed, log, cfg, lineage)
            t_last_ck = time.time()
    if bar is not None:
        bar.close()
    _save(ckdir, model, ema, opt, step, elapsed, log)
    _export(out, ema, mcfg, step, elapsed, log, cfg, lineage)
    return out


def _decay(cfg: TeacherTrainConfig, step: int, elapsed: float, budget: float) -> float:
    """Learning-rate multiplier after warm-up: 1 (none) or linear to 0 over the step or time budget."""
    if cfg.lr_decay == "none":
        return 1.0
    frac = step / cfg.max_steps if cfg.max_steps > 0 else elapsed / budget
    return max(0.0, 1.0 - frac)


def _init_from(model: ZImageBackbone, src: Path, mcfg: dict) -> dict:
    """Load a trained teacher's weights to continue from (a fresh optimizer; the warm-up re-runs)."""
    if not (src / "config.json").exists() or not (src / "model.safetensors").exists():
        raise UserError(f"--init {src}: not a teacher folder (needs config.json and model.safetensors)")
    old = json.loads((src / "config.json").read_text())
    if old.get("transformer") != mcfg["transformer"]:
        raise UserError(f"--init {src}: its architecture differs from this run's; pass the same --dim/--n-layers/"
                        "--n-heads/--patch-size it was trained with")
    model.transformer.load_state_dict(load_tensors(src / "model.safetensors"))
    return {"init_from": str(src), **(old.get("training") or {})}


def _save(ckdir, model, ema, opt, step, elapsed, log):
    sd = model.transformer.state_dict()
    if not all_finite(sd):
        print("non-finite weights: checkpoint not written")
        return
    write_checkpoint(ckdir, {"model": sd, "ema": ema.transformer.state_dict()},
                     {"step": step, "elapsed_s": elapsed, "log": log}, optimizers={"model": opt})


def _export(out: Path, ema, mcfg, step, elapsed, log, cfg, lineage=None):
    """The usable model folder: EMA weights + config (guidance kept if it was already tuned)."""
    cfg_path = out / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old.get("guidance_tuned"):
            mcfg = {**mcfg, "sampling": old["sampling"], "guidance_tuned": old["guidance_tuned"]}
    mcfg = {**mcfg, "num_parameters": sum(p.numel() for p in ema.parameters()), "training": {"steps": step, "minutes": round(elapsed / 60, 2), "batch_size": cfg.batch_size,
                                 "final_loss": log[-1]["loss"] if log else None,
                                 **({"continued_from": lineage} if lineage else {})}}
    atomic_save_tensors(ema.transformer.state_dict(), out / "model.safetensors")
    atomic_write_text(out / "loss_log.json", json.dumps(log, indent=1))
    atomic_write_text(cfg_path, json.dumps(mcfg, indent=1))
