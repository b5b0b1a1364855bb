"""Flow-matching training of a teacher (minRF-style): logit-normal σ, caption dropout for CFG, EMA with
warm-up, loss logged per σ bin, resumable safetensors checkpoints, time-budgeted (`--minutes` is the total).

Loss: ‖u_θ(x_σ, t = 1 − σ, c) − (x0 − ε)‖² with x_σ = (1 − σ)x0 + σε (flow.add_noise / flow.flow_target).
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch

from .. import flow
from ..backbones.zimage import ZImageBackbone, tiny_zimage_config
from ..command_configs import TEACHER_FLAGS as FLAGS, TeacherTrainConfig
from ..config import to_dict
from ..io.checkpoints import latest_checkpoint, read_checkpoint, write_checkpoint
from ..io.files import atomic_save_tensors, atomic_write_text, load_tensors, nonfinite_parts
from ..io.folders import claim_output, require_complete, twostep_command, write_status
from ..io.folders import progress as run_progress
from ..io.lock import holds_lock
from ..data import get_dataset
from ..ema import ema_decay, ema_update
from ..errors import NonFiniteWeights, UserError
from ..text import get_encoder

SIGMA_BINS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
MAX_NONFINITE = 5  # non-finite updates in a row before a rollback; rollbacks before the run gives up


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


@holds_lock("out", "--out", "teacher")  # one writer per teacher run
def train_teacher(cfg: TeacherTrainConfig, out: Path, progress: bool = True) -> Path:
    out = Path(out)
    ckdir = out / "checkpoints"
    saved_cfg = out / "train_config.json"
    # `out`: new, empty, a run that never trained (a failed start), or this teacher's run (same ARCH_KEYS) with a
    # checkpoint to continue from; never the --init teacher or the --data folder, never another kind of folder
    arch = {k: getattr(cfg, k) for k in ARCH_KEYS}
    inputs = {"--init": cfg.init or None, "--data": cfg.data if Path(cfg.data).is_dir() else None}
    st = claim_output(out, "teacher", None, inputs=inputs, allow_complete=True)
    trained = latest_checkpoint(ckdir) is not None or (out / "model.safetensors").exists()
    if trained:
        claim_output(out, "teacher", arch, inputs=inputs, allow_complete=True)  # the same teacher run
    if trained and saved_cfg.exists():  # a folder written before status.json: its train_config.json names the run
        try:
            prev = json.loads(saved_cfg.read_text())
            diff = [k for k in ARCH_KEYS if prev.get(k) != getattr(cfg, k)]
        except (OSError, ValueError, AttributeError):
            raise UserError(f"{saved_cfg}: unreadable; this is not a teacher run to continue: choose another --out")
        if diff:
            raise UserError(f"{out}: holds a different teacher run ({', '.join(f'{k}={prev.get(k)}' for k in diff)});"
                            " choose another --out or the same settings to resume")
    if st.kind is not None and (out / "model.safetensors").exists() and latest_checkpoint(ckdir) is None:
        raise UserError(f"{out}: holds a trained teacher with no checkpoint to continue from; choose another --out "
                        f"(to start from its weights: --init {out} --out NEW)")
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
    # the run starts for real (data, model and --init are good): its folder, status.json (unfinished) and config
    out.mkdir(parents=True, exist_ok=True)
    resume = twostep_command("teacher", "train", "--config", saved_cfg, "--data", cfg.data, "--out", out)
    write_status(out, "teacher", arch, False, _progress(cfg, step, elapsed), resume)
    atomic_write_text(saved_cfg, json.dumps(to_dict(cfg), indent=1))

    budget = cfg.minutes * 60
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=int(budget), initial=int(min(elapsed, budget)), unit="s", desc=f"teacher[{cfg.data}]",
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}s [{elapsed}<{remaining}{postfix}]")
    bin_sum = torch.zeros(len(SIGMA_BINS) - 1)
    bin_cnt = torch.zeros(len(SIGMA_BINS) - 1)
    run_loss, t_last_ck, t0 = None, time.time(), time.time() - elapsed
    in_a_row = rollbacks = 0  # non-finite updates in a row; rollbacks (at most MAX_NONFINITE, then it gives up)
    lr_scale = 1.0            # halved by each rollback
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
        lr = cfg.lr * lr_scale * min(1.0, (step + 1) / cfg.warmup_steps) * _decay(cfg, step, time.time() - t0, budget)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not (torch.isfinite(loss) and torch.isfinite(norm)):
            # skipped, but the step and time budgets advance (the run ends); a rollback after MAX_NONFINITE in a row
            step, in_a_row = step + 1, in_a_row + 1
            elapsed = time.time() - t0
            print(f"step {step}: non-finite loss or gradient, update skipped ({in_a_row} in a row)", flush=True)
            if in_a_row >= MAX_NONFINITE:
                rollbacks += 1
                step = _rollback(out, model, ema, opt, f"{in_a_row} non-finite losses in a row", rollbacks, lr)
                lr_scale, in_a_row = lr_scale * 0.5, 0
            continue
        in_a_row = 0
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
            try:
                _save(ckdir, model, ema, opt, step, elapsed, log)
                _export(out, ema, mcfg, step, elapsed, log, cfg, lineage)
            except NonFiniteWeights as e:  # nothing written: back to the newest checkpoint, like NaN losses
                rollbacks += 1
                step = _rollback(out, model, ema, opt, f"NaN/inf weights in {', '.join(e.parts)} at step {step}",
                                 rollbacks, lr)
                lr_scale, in_a_row, t_last_ck = lr_scale * 0.5, 0, time.time()
                continue
            write_status(out, "teacher", arch, False, _progress(cfg, step, elapsed), resume)
            t_last_ck = time.time()
    if bar is not None:
        bar.close()
    _save(ckdir, model, ema, opt, step, elapsed, log)
    _export(out, ema, mcfg, step, elapsed, log, cfg, lineage)
    write_status(out, "teacher", arch, True, _progress(cfg, step, elapsed), resume)  # last: the completion marker
    return out


def _progress(cfg: TeacherTrainConfig, step: int, elapsed: float) -> dict:
    """status.json's progress of a teacher run: updates of max_steps, else minutes of the time budget."""
    if cfg.max_steps > 0:
        return run_progress(step, cfg.max_steps, "updates")
    return run_progress(round(elapsed / 60, 2), cfg.minutes, "minutes")


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
    require_complete(src, "teacher")
    old = json.loads((src / "config.json").read_text())
    if old.get("transformer") != mcfg["transformer"]:
        raise UserError(f"--init {src}: its architecture differs from this run's; pass the same --dim/--n-layers/"
                        "--n-heads/--patch-size it was trained with")
    model.transformer.load_state_dict(load_tensors(src / "model.safetensors"))
    return {"init_from": str(src), **(old.get("training") or {})}


def _rollback(out: Path, model, ema, opt, reason: str, rollbacks: int, lr: float) -> int:
    """Reload the newest checkpoint (the caller halves the learning rate); returns its step. With no checkpoint,
    or past MAX_NONFINITE rollbacks, the run gives up with a one-line UserError (it stays unfinished)."""
    ck = latest_checkpoint(out / "checkpoints")
    if ck is None:
        raise UserError(f"{out}: {reason} (learning rate {lr:.3g}) and no checkpoint to roll back to; lower --lr")
    if rollbacks > MAX_NONFINITE:
        raise UserError(f"{out}: {reason} after {MAX_NONFINITE} rollbacks with halved learning rates; gave up (the "
                        f"run stays unfinished at {ck.name}): lower --lr and re-run the command to resume")
    model.transformer.load_state_dict(load_tensors(ck / "model.safetensors"))
    ema.transformer.load_state_dict(load_tensors(ck / "ema.safetensors"))
    meta = read_checkpoint(ck, {"model": opt})
    print(f"rolled back to {ck.name} (step {meta['step']}) after {reason}; learning rate halved", flush=True)
    return meta["step"]


def _refuse_nonfinite(out: Path, step: int, states: dict) -> None:
    """Everything a teacher run saves is finite (the weights and their EMA, each checked itself)."""
    bad = nonfinite_parts(states)
    if bad:
        raise NonFiniteWeights(f"{out}: step {step}: NaN/inf weights in {', '.join(bad)}; not saved (the run stays "
                               "unfinished): lower --lr (or check ema), then re-run the command to resume", bad)


def _save(ckdir, model, ema, opt, step, elapsed, log):
    sd, esd = model.transformer.state_dict(), ema.transformer.state_dict()
    _refuse_nonfinite(Path(ckdir).parent, step, {"model": sd, "ema": esd})
    write_checkpoint(ckdir, {"model": sd, "ema": esd},
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
    _refuse_nonfinite(out, step, {"ema": ema.transformer.state_dict()})
    atomic_save_tensors(ema.transformer.state_dict(), out / "model.safetensors")
    atomic_write_text(out / "loss_log.json", json.dumps(log, indent=1))
    atomic_write_text(cfg_path, json.dumps(mcfg, indent=1))
