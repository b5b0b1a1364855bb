"""The comparison sweep: every method and Turbo++ ablation on the same teacher cache, budget, batch and metrics.

    .venv/bin/python benchmarks/run.py [--data shapes photos] [--variants ...] [--seeds 0 1 2]
                                       [--updates 600] [--cache-num 2048] [--eval-num 1000] [--quick]

Each (benchmark, variant, seed) is one `twostep distill` + `twostep eval` in a fresh process (so its peak RSS
is its own); its record goes to benchmarks/results/runs/<benchmark>-<variant>-seed<k>.json as soon as it
finishes, and finished records are skipped on restart, so the sweep can accumulate in the background over
several sittings. `--quick` is a tiny version for CI-style smoke runs (writes under a temporary folder).
Equal budget: the same number of student updates, batch and teacher cache for every method.
Afterwards: benchmarks/results/runs.md (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TWOSTEP = [sys.executable, "-m", "twostep"]

# variant -> (config file or None, overrides). One change per ablation.
VARIANTS = {
    "turbopp": (None, []),
    "turbopp-lora": (None, ["student.decoupling=lora"]),
    "ablate-shared": (None, ["student.decoupling=shared"]),
    "ablate-detach": (None, ["loss.gradient=detach"]),
    "ablate-step1-none": (None, ["loss.step1_loss=none"]),
    "ablate-disc-real-data": (None, ["disc.real=data"]),
    "ablate-no-adv (regression only)": (None, ["loss.adv_weight=0.0", "loss.paired_weight=1.0"]),
    "choice-sigma-mid-0.5": (None, ["student.sigma_mid=0.5"]),
    "choice-sigma-mid-0.9": (None, ["student.sigma_mid=0.9"]),
    "choice-step1-adv": (None, ["loss.step1_loss=adv"]),
    "choice-traj-perceptual": (None, ["loss.traj_distance=perceptual"]),
    "choice-disc-pooled": (None, ["disc.head=pooled"]),
    "ladd": ("configs/ladd.yaml", []),
    "dmd2": ("configs/dmd2.yaml", []),
    "diffusion2gan": ("configs/diffusion2gan.yaml", []),
}
DEFAULT = ["turbopp", "turbopp-lora", "ablate-shared", "ablate-detach", "ablate-step1-none", "ablate-disc-real-data",
           "ablate-no-adv (regression only)", "ladd", "dmd2", "diffusion2gan"]
KEYS = ["fd", "kid", "swd", "alignment", "psnr_vs_teacher", "diversity", "nfe", "sec_per_image",
        "train_sec_per_update", "peak_rss_mb"]


def slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in s).strip("_")


def run_child(cmd, env, log):
    """Run a child process; return (returncode, peak RSS in MB of that child)."""
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n"); f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
    return os.waitstatus_to_exitcode(status), ru.ru_maxrss / 1024


def ensure_cache(data, num, work, env, log, seed=0):
    cache = work / f"cache-{data}-{num}"
    if not (cache / "manifest.json").exists() or not json.loads((cache / "manifest.json").read_text()).get("complete"):
        rc, _ = run_child(TWOSTEP + ["teacher", "cache", "--teacher", f"models/teacher-{data}", "--data", data,
                                     "--num", str(num), "--out", str(cache), "--seed", str(seed), "--no-progress"],
                          env, log)
        if rc != 0:
            raise SystemExit(f"teacher cache for {data} failed (see {log})")
    return cache


def one_run(data, variant, seed, a, work, env, log, out_dir):
    rec_path = out_dir / f"{data}-{slug(variant)}-seed{seed}.json"
    if rec_path.exists():
        return json.loads(rec_path.read_text())
    cfg_file, sets = VARIANTS[variant]
    cache = ensure_cache(data, a.cache_num, work, env, log)
    run = work / f"run-{data}-{slug(variant)}-seed{seed}"
    cmd = TWOSTEP + ["distill", "--teacher", f"models/teacher-{data}", "--cache", str(cache), "--out", str(run),
                     "--no-progress", "--set", f"train.updates={a.updates}", "--set", f"train.seed={seed}",
                     "--set", f"train.batch_size={a.batch}", "--set", "train.grid_every=0",
                     "--set", f"train.checkpoint_every={max(a.updates // 4, 1)}"]
    if cfg_file:
        cmd += ["--config", cfg_file]
    for s in sets:
        cmd += ["--set", s]
    if (run / "checkpoints").exists():
        cmd.append("--resume")
    t0 = time.time()
    rc, peak = run_child(cmd, env, log)
    if rc != 0:
        print(f"  FAILED: {variant} seed {seed} (exit {rc}); see {log}", flush=True)
        return None
    train_s = time.time() - t0
    log_lines = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    spu = statistics.median([r["sec_per_update"] for r in log_lines if "sec_per_update" in r])
    ev = work / f"eval-{data}-{slug(variant)}-seed{seed}.json"
    rc, _ = run_child(TWOSTEP + ["eval", "--model", str(run), "--data", data, "--num", str(a.eval_num),
                                 "--seed", str(seed), "--json", str(ev), "--no-progress"], env, log)
    if rc != 0:
        print(f"  EVAL FAILED: {variant} seed {seed}; see {log}", flush=True)
        return None
    rec = json.loads(ev.read_text())
    rec.update({"method": variant, "benchmark": data, "seed": seed, "updates": a.updates, "batch": a.batch,
                "cache_num": a.cache_num, "train_sec_per_update": spu, "train_wall_s": train_s,
                "peak_rss_mb": peak, "config": cfg_file, "overrides": sets})
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = rec_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1)); tmp.replace(rec_path)
    return rec


def ms(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    m = statistics.mean(vals)
    return f"{m:.4g} ± {statistics.stdev(vals):.2g}" if len(vals) > 1 else f"{m:.4g}"


def table(records):
    lines = ["| benchmark | method | seeds | " + " | ".join(KEYS) + " |", "|---|---|---|" + "---|" * len(KEYS)]
    groups = {}
    for r in records:
        groups.setdefault((r["benchmark"], r["method"]), []).append(r)
    for (b, m), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], statistics.mean(r["fd"] for r in kv[1]))):
        lines.append(f"| {b} | {m} | {len(rs)} | " + " | ".join(ms([r.get(k) for r in rs]) for k in KEYS) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description="twostep comparison sweep (resumable)")
    p.add_argument("--data", nargs="+", default=["shapes", "photos"])
    p.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--updates", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cache-num", type=int, default=2048)
    p.add_argument("--eval-num", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny smoke version (results in a temporary folder)")
    a = p.parse_args()
    out_dir = ROOT / "benchmarks" / "results" / "runs"
    work = ROOT / "benchmarks" / "work"
    if a.quick:
        a.updates, a.cache_num, a.eval_num, a.seeds, a.batch = 2, 16, 20, a.seeds[:1], 4
        tmp = Path(tempfile.mkdtemp(prefix="twostep-bench-"))
        out_dir, work = tmp / "runs", tmp / "work"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONUNBUFFERED": "1"}
    log = work / "sweep.log"
    recs = []
    for data in a.data:
        for variant in a.variants:
            for seed in a.seeds:
                print(f"{data} | {variant} | seed {seed}", flush=True)
                r = one_run(data, variant, seed, a, work, env, log, out_dir)
                if r:
                    recs.append(r)
                    print(f"  FD {r['fd']:.4g}  SWD {r['swd']:.4g}  {r['train_sec_per_update']:.2f} s/update", flush=True)
    md = table(recs) + (f"\n\n{a.updates} student updates at batch {a.batch} on a {a.cache_num}-sample teacher cache; "
                        f"eval: `twostep eval --num {a.eval_num} --seed <seed>` vs held-out data; mean ± std over "
                        f"seeds {a.seeds}.\n")
    if not a.quick:
        (ROOT / "benchmarks" / "results" / "runs.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
