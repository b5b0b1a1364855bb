"""The one training loop every distillation method uses (accelerate; one process or many).

It knows nothing of what the losses mean: it asks the method for `critic_loss(batch)` (d_updates times) and
`student_loss(batch)` per update, steps AdamW for each parameter set, keeps an EMA of the student, logs,
draws fixed-noise grids, and writes atomic, resumable checkpoints. Batches come from the teacher cache.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch

from . import flow
from .ckpt import (all_finite, atomic_write_text, latest_checkpoint, load_tensors, read_checkpoint,
                   write_checkpoint)
from .config import Config, dump_config, to_dict
from .errors import UserError
from .images import grid, save_png
from .methods import build_method
from .model import load_teacher
from .student import save_student, student_config


def _accelerator(cfg: Config):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available())


class BatchSource:
    """Deterministic batches from the teacher cache: update k of rank r draws its indices from a generator
    seeded by (seed, k, r), so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, cache, needs: set[str], sigma_mid: float, seed: int, data_real: torch.Tensor | None,
                 rank: int = 0, world: int = 1):
        self.cache, self.needs, self.seed, self.rank, self.world = cache, needs, seed, rank, world
        self.mid = cache.state_at(sigma_mid) if "teacher_mid" in needs else None
        self.data_real = data_real

    def get(self, update: int, sub: int, batch_size: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + update * 101 + sub * 7 + self.rank * 1_000_000_007)
        per = max(1, batch_size // self.world)
        idx = torch.randint(0, len(self.cache), (per,), generator=g)
        b = {"noise": self.cache.noise[idx], "text": [self.cache.text[i] for i in idx.tolist()], "index": idx}
        if "teacher_final" in self.needs:
            b["teacher_final"] = self.cache.final[idx]
        if self.mid is not None:
            b["teacher_mid"] = self.mid[idx]
        if self.data_real is not None:
            j = torch.randint(0, len(self.data_real), (per,), generator=g)
            b["data_real"] = self.data_real[j]
        b["fresh_noise"] = torch.randn(b["noise"].shape, generator=g)
        return b


def _sync_grads(acc, params):
    """Average gradients across processes (a no-op in one process). Works for any call pattern of the method,
    unlike a DDP wrapper, which only syncs what goes through forward()."""
    if acc.num_processes == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad = acc.reduce(p.grad, reduction="mean")


def _ema_update(ema, model, decay):
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            if pm.requires_grad:
                pe.lerp_(pm, 1 - decay)


def distill(cfg: Config, teacher_dir: Path, cache_dir: Path, out: Path, resume: bool = False,
            progress: bool = True) -> Path:
    from .teacher.cache import load_cache

    out = Path(out)
    acc = _accelerator(cfg)
    ck = latest_checkpoint(out / "checkpoints")
    if ck is not None and not resume:
        raise UserError(f"{out}: already holds a run (checkpoint {ck.name}); pass --resume to continue it or "
                        "choose another --out")
    if resume and (out / "config.yaml").exists():
        import yaml
        prev = yaml.safe_load((out / "config.yaml").read_text())
        now = to_dict(cfg)
        diff = [f"{s}.{k}" for s in now if isinstance(now[s], dict) for k in now[s]
                if s != "train" and prev.get(s, {}).get(k) != now[s][k]]
        if diff:
            raise UserError(f"{out}: --resume with a different config ({', '.join(diff[:3])}); use the run's "
                            "config.yaml or another --out")
    teacher = load_teacher(teacher_dir)
    cache = load_cache(cache_dir, expect_teacher=teacher_dir)
    if tuple(cache.noise.shape[1:]) != (teacher.channels, teacher.resolution, teacher.resolution):
        raise UserError(f"{cache_dir}: cache images {tuple(cache.noise.shape[1:])} do not match the teacher "
                        f"({teacher.channels}×{teacher.resolution}²); rebuild the cache with this teacher")
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg, teacher.backbone)
    teacher_hash = _param_hash(teacher.backbone)
    if cfg.train.grad_checkpointing:
        for m in method.student.modules():
            if hasattr(m, "enable_gradient_checkpointing") and hasattr(m, "_supports_gradient_checkpointing"):
                m.enable_gradient_checkpointing()
    data_real = None
    if getattr(cfg, "disc", None) is not None and cfg.disc.real == "data":
        from .data import get_dataset
        data_real = get_dataset(cache.manifest["data"]).sample(min(len(cache), 5000), seed=cfg.train.seed, split="train").images
    src = BatchSource(cache, method.needs(), cfg.student.sigma_mid, cfg.train.seed, data_real,
                      acc.process_index, acc.num_processes)

    t = cfg.train
    s_params, c_params = method.student_parameters(), method.critic_parameters()
    opt_s = torch.optim.AdamW(s_params, lr=t.lr_student, betas=tuple(t.betas), weight_decay=t.weight_decay)
    opt_c = torch.optim.AdamW(c_params, lr=t.lr_disc, betas=tuple(t.betas)) if c_params else None
    ema = copy.deepcopy(method.student).requires_grad_(False)
    opts = {"student": opt_s, **({"critic": opt_c} if opt_c else {})}

    update, log = 0, []
    if ck is not None:
        method.student.load_state_dict(load_tensors(ck / "student.safetensors"))
        ema.load_state_dict(load_tensors(ck / "ema.safetensors"))
        if c_params:
            method.critic.load_state_dict(load_tensors(ck / "critic.safetensors"))
        meta = read_checkpoint(ck, opts)
        update, log = meta["step"], meta.get("log", [])
        acc.print(f"resumed from {ck} at update {update}")
    out.mkdir(parents=True, exist_ok=True)
    if acc.is_main_process:
        atomic_write_text(out / "config.yaml", dump_config(cfg))
        (out / "grids").mkdir(exist_ok=True)
    scfg = student_config(teacher.config, cfg, Path(teacher_dir))
    scfg["cache"] = str(cache_dir)

    grid_inputs = _grid_inputs(teacher, cache)
    bar = None
    if progress and acc.is_main_process:
        from tqdm.auto import tqdm
        if t.minutes > 0:  # time-budgeted: the bar (and its ETA) counts minutes, updates go in the postfix
            bar = tqdm(total=round(t.minutes, 2), desc=f"distill[{cfg.method}]", unit="min",
                       bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} min [{elapsed}<{remaining}{postfix}]")
        else:
            bar = tqdm(total=t.updates, initial=update, desc=f"distill[{cfg.method}]", unit="upd")
    t_start = time.time()
    logf = open(out / "log.jsonl", "a") if acc.is_main_process else None
    skipped = in_a_row = 0
    warned_chance = False
    while update < t.updates:
        if t.minutes > 0 and time.time() - t_start > t.minutes * 60:
            acc.print(f"time budget of {t.minutes} min reached at update {update}")
            break
        ts = time.time()
        logs: dict = {}
        with acc.autocast():
            if opt_c is not None:
                for k in range(t.d_updates):
                    c_loss, clogs = method.critic_loss(src.get(update, 1 + k, t.batch_size))
                    opt_c.zero_grad(set_to_none=True)
                    if not torch.isfinite(c_loss):
                        skipped += 1
                        continue
                    c_loss.backward()
                    _sync_grads(acc, c_params)
                    if _clip(c_params, t.grad_clip):
                        opt_c.step()
                    else:
                        skipped += 1
                    logs.update(clogs)
            s_loss, slogs = method.student_loss(src.get(update, 0, t.batch_size))
        logs.update(slogs)
        opt_s.zero_grad(set_to_none=True)
        ok = bool(torch.isfinite(s_loss))
        if ok:
            s_loss.backward()
            _sync_grads(acc, s_params)
            ok = _clip(s_params, t.grad_clip)
            if ok:
                opt_s.step()
        if not ok:  # non-finite loss or gradient: skip the update, count it, roll back after too many in a row
            skipped += 1
            in_a_row += 1
            logs["skipped_updates"] = skipped
            if in_a_row >= t.max_nonfinite:
                update, log = _rollback(acc, out, method, ema, opts, c_params)
                in_a_row = 0
                continue
        else:
            in_a_row = 0
        update += 1
        _ema_update(ema, method.student, min(t.ema, (1 + update) / (10 + update)))
        logs["sec_per_update"] = time.time() - ts
        if update % t.log_every == 0 or update == t.updates:
            rec = {"update": update, **{k: round(v, 5) if isinstance(v, float) else v for k, v in logs.items()}}
            if "d_acc_real" in logs:  # a discriminator at chance adds nothing over regression: say so
                rec["d_at_chance"] = abs((logs["d_acc_real"] + logs["d_acc_fake"]) / 2 - 0.5) < 0.05
                if rec["d_at_chance"] and not warned_chance and update >= 50:
                    warned_chance = True
                    msg = (f"update {update}: the discriminator sits at chance (acc real {logs['d_acc_real']:.2f}, "
                           f"fake {logs['d_acc_fake']:.2f}); consider disc.sigma_mean<0, a higher lr_disc or disc.r1")
                    (bar.write(msg) if bar is not None else acc.print(msg))
            log.append(rec)
            if logf:
                logf.write(json.dumps(rec) + "\n"); logf.flush()
        if bar is not None:
            if t.minutes > 0:
                bar.n = round(min((time.time() - t_start) / 60, t.minutes), 2)
            else:
                bar.update(1)
            show = {"upd": update, **{k: f"{logs[k]:.3f}" for k in ("g_loss", "d_loss", "d_acc_real", "d_acc_fake",
                                                                   "step1") if k in logs}}
            bar.set_postfix(show, refresh=False)
        if acc.is_main_process and t.grid_every and (update % t.grid_every == 0 or update == t.updates):
            _write_grid(out / "grids" / f"grid-{update:06d}.png", grid_inputs, ema)
        if t.checkpoint_every and update % t.checkpoint_every == 0 and update < t.updates:
            _checkpoint(acc, out, method, ema, opts, update, log, t.keep_checkpoints, scfg)
    if bar is not None:
        bar.close()
    if logf:
        logf.close()
    _checkpoint(acc, out, method, ema, opts, update, log, t.keep_checkpoints, scfg)
    if _param_hash(teacher.backbone) != teacher_hash:  # the teacher never changes
        raise RuntimeError("teacher weights changed during distillation: this is a bug in the method")
    if acc.is_main_process:
        _loss_curves(log, out / "loss_curves.png")
    return out


def _clip(params, max_norm: float) -> bool:
    """Clip gradients (when max_norm > 0); False when the gradient norm is not finite."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return bool(torch.isfinite(norm))


def _rollback(acc, out, method, ema, opts, c_params):
    """Too many non-finite updates in a row: reload the newest complete checkpoint and halve the learning rates."""
    ck = latest_checkpoint(out / "checkpoints")
    lrs = {k: [g["lr"] * 0.5 for g in o.param_groups] for k, o in opts.items()}
    if ck is None:
        raise RuntimeError("non-finite losses in a row and no checkpoint to roll back to; lower the learning "
                           "rates (train.lr_student / train.lr_disc)")
    method.student.load_state_dict(load_tensors(ck / "student.safetensors"))
    ema.load_state_dict(load_tensors(ck / "ema.safetensors"))
    if c_params:
        method.critic.load_state_dict(load_tensors(ck / "critic.safetensors"))
    meta = read_checkpoint(ck, opts)
    for k, o in opts.items():
        for g, lr in zip(o.param_groups, lrs[k]):
            g["lr"] = lr
    acc.print(f"rolled back to {ck.name} (update {meta['step']}) after repeated non-finite losses; learning "
              f"rates halved to {', '.join(f'{k}={v[0]:.3g}' for k, v in lrs.items())}")
    return meta["step"], meta.get("log", [])


def _param_hash(module) -> float:
    with torch.no_grad():
        return float(sum((p.double() * (i + 1)).sum() for i, p in enumerate(module.parameters())))


def _checkpoint(acc, out, method, ema, opts, update, log, keep, scfg):
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return
    sd = method.student.state_dict()
    if not all_finite(sd):
        acc.print(f"update {update}: non-finite student weights; checkpoint NOT written")
        return
    mods = {"student": sd, "ema": ema.state_dict()}
    if method.critic_parameters():
        mods["critic"] = method.critic.state_dict()
    write_checkpoint(out / "checkpoints", mods, {"step": update, "log": log}, keep=keep, optimizers=opts)
    save_student(ema, {**scfg, "updates": update}, out)  # the usable model: EMA weights + config.json


def _grid_inputs(teacher, cache, n: int = 8):
    n = min(n, len(cache))
    text = cache.text[:n]
    noise = cache.noise[:n]
    naive = teacher.sample(text, noise, steps=2, guidance=0.0).x0
    return {"text": text, "noise": noise, "teacher": cache.final[:n], "naive": naive}


@torch.no_grad()
def _write_grid(path, gi, student):
    """Rows: teacher 8-step | naive 2-step (2 NFE) | student 2-step — same noise and prompts."""
    was = student.training
    student.eval()
    st = student(gi["noise"], gi["text"])["x0_2"]
    student.train(was)
    save_png(grid(torch.cat([gi["teacher"], gi["naive"], st]), nrow=len(st), scale=3), path)


def _loss_curves(log, path):
    if not log:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("g_adv", "step1", "paired", "g_dmd", "fake_fm", "d_loss", "d_acc_real", "d_acc_fake",
                        "mse_vs_teacher")
            if any(k in r for r in log)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        xs = [r["update"] for r in log if k in r]
        ax.plot(xs, [r[k] for r in log if k in r])
        ax.set_title(k); ax.set_xlabel("update")
        if k.startswith("d_acc"):
            ax.axhline(0.5, ls="--", c="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
