"""Peak memory and seconds per update of the full Turbo++ update, decoupling full vs lora, gradient checkpointing
off vs on, on a mid-size randomly-initialised Z-Image transformer (CPU, fp32).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory.py [--updates 1] [--batch 2] [--threads 1]

One update is exactly the loop's (twostep.train's critic_step and student_step): one discriminator update (student
2-step rollout without grad → detached fakes; frozen-teacher features of real and fake → heads → GAN loss → backward → AdamW) and one
student update (2-step rollout end to end → frozen-teacher features of x̂0₂ → adversarial loss + step-1
trajectory loss → backward through the teacher, step 2, x_m and step 1 → AdamW), then the EMA. Every
configuration runs in its own fresh subprocess, so its peak RSS (getrusage ru_maxrss) is its own:

    (MB = 2**20 bytes)
    peak_mb      total peak RSS of the process (Python + torch + weights + optimizer state + activations)
    baseline_mb  RSS after building teacher, student, discriminator, EMA and optimizers, before the first update
    delta_mb     peak_mb − baseline_mb: what training adds on top (activations, gradients, AdamW moments —
                 AdamW allocates its moments lazily at the first step)

The lora/full comparison uses peak_mb, the number that decides whether a run fits. Writes
benchmarks/results/memory.json (one record per configuration) and benchmarks/results/memory.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from twostep.backbones.zimage import ZImageBackbone, tiny_zimage_config
from twostep.ema import ema_decay, ema_update
from twostep.methods import build_method, load_config
from twostep.student import deepcopy_sharing_frozen
from twostep.train import critic_step, enable_grad_checkpointing, optimizers, student_step

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = [("full", False), ("full", True), ("lora", False), ("lora", True)]
# mid-size Z-Image transformer: same block structure as the 6B model (2 refiner layers per stream), smaller dims
MODEL = dict(in_channels=16, dim=512, n_layers=8, n_heads=8, n_refiner_layers=2, cap_feat_dim=384, patch_size=2)
LATENT = (16, 32, 32)   # C×H×W latent, patch 2 → 16×16 = 256 image tokens (a 256² image through the 8× VAE)
CAPTION_TOKENS = 32


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(decoupling: str, checkpointing: bool, updates: int, batch: int, threads: int) -> dict:
    """One configuration, in this process (called in a fresh subprocess by main)."""
    torch.set_num_threads(threads)
    rss_import = _rss_mb()
    cfg = load_config(None, [f"student.decoupling={decoupling}", f"train.batch_size={batch}",
                             f"train.grad_checkpointing={str(checkpointing).lower()}"])
    tcfg = tiny_zimage_config(**MODEL)
    teacher = ZImageBackbone.from_config(tcfg, seed=0).requires_grad_(False).eval()
    torch.manual_seed(0)
    method = build_method(cfg, teacher)
    n_ckpt = enable_grad_checkpointing(method) if checkpointing else 0
    t = cfg.train
    s_params, c_params = method.student_parameters(), method.critic_parameters()
    opts = optimizers(cfg, s_params, c_params)                            # as in twostep/train/loop.py
    ema = deepcopy_sharing_frozen(method.student).requires_grad_(False)

    g = torch.Generator().manual_seed(0)

    def batch_of(b):
        r = lambda: torch.randn(b, *LATENT, generator=g)
        text = [torch.randn(CAPTION_TOKENS, MODEL["cap_feat_dim"], generator=g) for _ in range(b)]
        return {"noise": r(), "text": text,
                "teacher_final": r().clamp(-1, 1), "teacher_mid": r(), "fresh_noise": r()}

    def one_update(k):  # the loop's update (twostep/train/loop.py), one process
        critic_step(method, opts["critic"], c_params, batch_of(batch), t.grad_clip)
        student_step(method, opts["student"], s_params, batch_of(batch), t.grad_clip)
        ema_update(ema, method.student, ema_decay(k, t.ema))

    gc.collect()
    baseline = _rss_mb()
    peak_before = _peak_mb()
    one_update(0)                                  # warm-up (allocates AdamW state)
    times = []
    for k in range(1, updates + 1):
        ts = time.perf_counter()
        one_update(k)
        times.append(time.perf_counter() - ts)
    peak = _peak_mb()
    count = lambda ps: sum(p.numel() for p in ps)
    n_img = (LATENT[1] // MODEL["patch_size"]) * (LATENT[2] // MODEL["patch_size"])
    return {
        "decoupling": decoupling, "checkpointing": checkpointing,
        "peak_mb": round(peak, 1), "baseline_mb": round(baseline, 1), "delta_mb": round(peak - baseline, 1),
        "import_rss_mb": round(rss_import, 1), "peak_before_training_mb": round(peak_before, 1),
        "sec_per_update": round(sorted(times)[len(times) // 2], 3), "sec_per_update_all": [round(x, 3) for x in times],
        "transformers_checkpointed": n_ckpt,
        "teacher_params_m": round(count(teacher.parameters()) / 1e6, 2),
        "student_trainable_params_m": round(count(s_params) / 1e6, 3),
        "student_total_params_m": round(count(method.student.parameters()) / 1e6, 2),
        "critic_params_m": round(count(c_params) / 1e6, 3),
        "model": {**MODEL, "n_kv_heads": MODEL["n_heads"]}, "latent": list(LATENT), "image_tokens": n_img,
        "caption_tokens": CAPTION_TOKENS, "batch": batch, "updates_timed": updates, "threads": threads,
        "lora_rank": cfg.student.lora_rank, "lora_targets": list(cfg.student.lora_targets),
        "disc_blocks": list(cfg.disc.blocks), "dtype": "float32", "device": "cpu",
    }


def _md(records: list[dict], note: str) -> str:
    by = {(r["decoupling"], r["checkpointing"]): r for r in records}
    r0 = records[0]
    m = r0["model"]
    lines = [
        "# Memory and speed of one Turbo++ update: full vs lora, gradient checkpointing off/on",
        "",
        f"Generated by `benchmarks/memory.py`. Model: randomly-initialised diffusers `ZImageTransformer2DModel`, "
        f"dim {m['dim']}, {m['n_layers']} layers + {m['n_refiner_layers']}+{m['n_refiner_layers']} refiner layers, "
        f"{m['n_heads']} heads, patch {m['patch_size']} ({r0['teacher_params_m']} M parameters); latent "
        f"{'×'.join(map(str, r0['latent']))} → {r0['image_tokens']} image tokens + {r0['caption_tokens']} caption "
        f"tokens; batch {r0['batch']}; fp32 on CPU, {r0['threads']} thread(s); LoRA rank {r0['lora_rank']} on "
        f"{', '.join(r0['lora_targets'])}; discriminator on teacher blocks {r0['disc_blocks']}.",
        "",
        "One update = one discriminator update + one end-to-end student update (2 student steps, the frozen-teacher "
        "discriminator pass, backward through both steps) + EMA, exactly as in `twostep/train/loop.py`. Each configuration "
        "ran in its own fresh process. `peak MB` is the process's total peak RSS (ru_maxrss); `baseline MB` its RSS "
        "after building the models, EMA and optimizers; `Δ MB` = peak − baseline (activations, gradients, AdamW "
        "moments). MB = 2²⁰ bytes. The lora/full ratio below uses the total peak.",
        "",
        "| decoupling | checkpointing | trainable params (M) | baseline MB | peak MB | Δ MB | sec/update |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(f"| {r['decoupling']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{r['student_trainable_params_m']} | {r['baseline_mb']:.0f} | {r['peak_mb']:.0f} | "
                     f"{r['delta_mb']:.0f} | {r['sec_per_update']:.2f} |")
    lines += ["", "| ratio | checkpointing off | checkpointing on |", "|---|---:|---:|"]
    for key, label in (("peak_mb", "lora / full, total peak"), ("delta_mb", "lora / full, Δ over baseline")):
        cells = []
        for ck in (False, True):
            f, l = by.get(("full", ck)), by.get(("lora", ck))
            cells.append(f"{l[key] / f[key]:.2f}" if f and l and f[key] > 0 else "–")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    lines += ["", "| checkpointing on / off | full | lora |", "|---|---:|---:|"]
    for key, label in (("peak_mb", "total peak"), ("delta_mb", "Δ over baseline"), ("sec_per_update", "sec/update")):
        cells = []
        for d in ("full", "lora"):
            a, b = by.get((d, False)), by.get((d, True))
            cells.append(f"{b[key] / a[key]:.2f}" if a and b and a[key] > 0 else "–")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    for ck in (False, True):
        f0, l0 = by.get(("full", ck)), by.get(("lora", ck))
        if f0 and l0:
            ok = l0["peak_mb"] <= 0.6 * f0["peak_mb"]
            lines += ["", f"Target lora peak ≤ 0.6 × full peak, checkpointing {'on' if ck else 'off'}: "
                          f"{l0['peak_mb']:.0f} vs 0.6 × {f0['peak_mb']:.0f} = {0.6 * f0['peak_mb']:.0f} MB → "
                          f"{'met' if ok else 'NOT met'}."]
    lines += ["", note, ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=1, help="timed updates per configuration (after 1 warm-up)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", nargs=2, metavar=("DECOUPLING", "CHECKPOINTING"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    if a.one:
        rec = measure(a.one[0], a.one[1] == "1", a.updates, a.batch, a.threads)
        print("RESULT " + json.dumps(rec))
        return 0
    records = []
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1"}
    for dec, ck in CONFIGS:
        t0 = time.time()
        p = subprocess.run([sys.executable, __file__, "--one", dec, "1" if ck else "0", "--updates", str(a.updates),
                            "--batch", str(a.batch), "--threads", str(a.threads)], cwd=ROOT, env=env,
                           capture_output=True, text=True)
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            sys.stderr.write(p.stdout[-2000:] + p.stderr[-4000:])
            raise SystemExit(f"configuration {dec}/checkpointing={ck} failed (exit {p.returncode})")
        rec = json.loads(line[0][7:])
        rec["wall_s"] = round(time.time() - t0, 1)
        records.append(rec)
        print(f"{dec:5s} checkpointing={'on ' if ck else 'off'}  peak {rec['peak_mb']:7.0f} MB  "
              f"Δ {rec['delta_mb']:7.0f} MB  {rec['sec_per_update']:.2f} s/update  ({rec['wall_s']} s)", flush=True)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    note = (f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores ({platform.machine()}, torch "
            f"{torch.__version__}) with OMP_NUM_THREADS={a.threads}; 1-min load average {load:.1f} at "
            f"the end." + (" Other work shared the CPU, so sec/update is indicative only; peak RSS is not affected "
                           "by contention." if load > a.threads + 0.5 else ""))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "memory.json").write_text(json.dumps(records, indent=1) + "\n")
    (a.out / "memory.md").write_text(_md(records, note))
    print(f"wrote {a.out / 'memory.json'} and {a.out / 'memory.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
