"""The comparison sweep: every method and Turbo++ ablation on the same teacher cache, budget, batch and metrics.

    .venv/bin/python benchmarks/run.py [--data shapes photos] [--variants ...] [--seeds 0 1 2]
                                       [--updates 600] [--cache-num 2048] [--eval-num 1000] [--quick]
                                       [--summary-only] [--out DIR] [--set KEY=VALUE ...]

Each (benchmark, variant, seed) is one `twostep distill` + `twostep eval` in a fresh process (so its peak RSS
is its own); its record goes to benchmarks/results/runs/<benchmark>-<variant>-seed<k>.json as soon as it
finishes, and finished records are skipped on restart, so the sweep can accumulate in the background over
several sittings. `--quick` is a tiny version for CI-style smoke runs (writes under a temporary folder).
`--set KEY=VALUE` (needs `--out`) applies one config change to every variant of a study (e.g. every method at
another σm); a variant's own overrides come after it, so a variant that sets the same key keeps its one change.
Each method's config has its own sections (`loss` is Turbo++'s, `dmd` DMD2's, `d2g` Diffusion2GAN's): a change
to a section is applied only to the variants whose method has it (the others run without it, and say so), and
a change that applies to none of the chosen variants is refused.
Equal budget: the same number of student updates, batch and teacher cache for every method.

Sample grids (`twostep sample --eval-prompts`, each in a fresh process, skipped when present): per finished run
runs/<same stem>.png, and once per benchmark the teacher 8-step and naive 2-step (without / with CFG) grids, all
for the same prompts and noise (the first 8 test-split prompts and the noise of `twostep eval --seed 0`);
runs/<benchmark>-grids.json names them and the teacher's weights (its grids are redone when the teacher changes).
Afterwards (benchmarks/sweep_outputs.py, from all records on disk with this budget; `--summary-only` does just
this): benchmarks/results/runs.md (mean ± std over seeds), fd_vs_nfe_<b>.png, ablations_<b>.png (FD-vs-NFE also
uses benchmarks/results/teacher_gap/) and comparison.html.
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
from dataclasses import fields
from pathlib import Path

from twostep.data import get_dataset
from twostep.errors import UserError
from twostep.flow import nfe
from twostep.io.files import sha256_file
from twostep.io.folders import read_config
from twostep.methods import METHODS, config_class, load_config
from twostep.report import GRID_PROMPTS
from twostep.sampling import NAIVE_STEPS, naive_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_outputs import grid_file, load_records, run_stem, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TWOSTEP = [sys.executable, "-m", "twostep"]
GRID_SEED, GRID_NOISES = 0, 4  # every grid: the prompts and noise of `twostep eval --seed 0`, 4 noises per prompt

# variant -> (config file or None, overrides). One change per ablation.
VARIANTS = {
    "turbopp": (None, []),
    "turbopp-lora": (None, ["student.decoupling=lora"]),
    # train.lr_lora (1e-4) is the LoRA default by measurement; this is the full-model rate it replaced
    "turbopp-lora-lr2e-5": (None, ["student.decoupling=lora", "train.lr_lora=2e-05"]),
    "ablate-shared": (None, ["student.decoupling=shared"]),
    "ablate-detach": (None, ["loss.gradient=detach"]),
    "ablate-step1-none": (None, ["loss.step1_loss=none"]),
    "ablate-disc-real-data": (None, ["disc.real=data"]),
    # no adversarial term anywhere: paired regression of the final image + trajectory regression of step 1
    "ablate-no-adv (regression only)": (None, ["loss.adv_weight=0.0", "loss.paired_weight=1.0",
                                               "loss.step1_loss=traj"]),
    "choice-sigma-mid-0.5": (None, ["student.sigma_mid=0.5"]),
    "choice-sigma-mid-0.9": (None, ["student.sigma_mid=0.9"]),
    "choice-step1-traj": (None, ["loss.step1_loss=traj"]),   # the session-4 default
    "choice-traj-perceptual": (None, ["loss.step1_loss=traj", "loss.traj_distance=perceptual"]),
    "choice-disc-pooled": (None, ["disc.head=pooled"]),
    "choice-paired": (None, ["loss.paired_weight=1.0"]),
    "choice-lr-1e-4": (None, ["train.lr_student=0.0001"]),   # the full-model rate at the LoRA rate
    # no discriminator head start (the session-2 setting; benchmarks/results/disc_probe.md says why it sat at chance)
    "choice-no-head-start": (None, ["train.d_warmup=0", "train.lr_disc=0.0002", "disc.sigma_mean=0.0"]),
    "ladd": ("configs/ladd.yaml", []),
    "dmd2": ("configs/dmd2.yaml", []),
    "diffusion2gan": ("configs/diffusion2gan.yaml", []),
}
DEFAULT = ["turbopp", "turbopp-lora", "ablate-shared", "ablate-detach", "ablate-step1-none", "ablate-disc-real-data",
           "ablate-no-adv (regression only)", "ladd", "dmd2", "diffusion2gan"]
# issue 3's table of choices (each one change from the default); not in the default sweep
CHOICES = ["choice-sigma-mid-0.5", "choice-sigma-mid-0.9", "choice-step1-traj", "choice-traj-perceptual",
           "choice-disc-pooled", "choice-paired", "choice-no-head-start", "turbopp-lora-lr2e-5", "choice-lr-1e-4"]


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
    rec_path = out_dir / f"{run_stem(data, variant, seed)}.json"
    if rec_path.exists():
        return json.loads(rec_path.read_text())
    cfg_file, own = VARIANTS[variant]
    applied, skipped = for_method(a.set, variant_method(variant))
    if skipped:
        print(f"  study --set {' '.join(skipped)}: not a section of {variant}'s config; left out", flush=True)
    sets = study_sets(applied, own)
    cache = ensure_cache(data, a.cache_num, work, env, log)
    run = work / f"run-{run_stem(data, variant, seed)}"
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
    ev = work / f"eval-{run_stem(data, variant, seed)}.json"
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


def study_sets(study, own):
    """A study's `--set` changes, then the variant's own (the variant's one change wins on a shared key)."""
    keys = {o.split("=", 1)[0] for o in own}
    return [s for s in study if s.split("=", 1)[0] not in keys] + list(own)


def variant_method(variant):
    cfg_file, own = VARIANTS[variant]
    return load_config(ROOT / cfg_file if cfg_file else None, own).method


def sections(method):
    """The sections of a method's config (method, student, disc, its own, train)."""
    return {f.name for f in fields(config_class(method))}


def for_method(study, method):
    """(the study's `--set` changes whose section the method's config has, the others)."""
    has = sections(method)
    applied = [s for s in study if s.split(".", 1)[0] in has]
    return applied, [s for s in study if s not in applied]


def check_study(study, variants):
    """A one-line reason to refuse the study's `--set` changes, or None: each must be a valid change for a method
    that has its section, and apply to at least one of the chosen variants."""
    methods = {variant_method(v) for v in variants}
    for s in study:
        owners = [m for m in METHODS if for_method([s], m)[0]]
        try:
            load_config(None, [f"method={owners[0] if owners else METHODS[0]}", s])
        except UserError as e:
            return str(e)
        if not any(for_method([s], m)[0] for m in methods):
            return (f"--set {s}: no chosen variant's config has the section {s.split('.', 1)[0]!r} "
                    f"(their methods: {', '.join(sorted(methods))})")
    return None


def sample_grid(model, data, png, env, log, extra=()):
    """`twostep sample --eval-prompts` in a fresh process; True when the PNG exists afterwards."""
    rc, _ = run_child(TWOSTEP + ["sample", "--model", str(model), "--eval-prompts", data, "--seed", str(GRID_SEED),
                                 "--num", str(GRID_NOISES), "--scale", "2", "--out", str(png), *extra], env, log)
    if rc != 0:
        print(f"  GRID FAILED: {png.name}; see {log}", flush=True)
    return png.exists()


def grid_meta(data, teacher_dir):
    """Prompts, noise seed and teacher of a benchmark's grids, and the reference grids' settings
    (teacher default; the naive peer's settings, twostep.sampling.naive_settings)."""
    cfg = read_config(teacher_dir)
    res = int(cfg.get("image_resolution", cfg["resolution"]))
    g, steps = float(cfg["sampling"]["guidance"]), int(cfg["sampling"]["steps"])
    caps = get_dataset(data, res).sample(GRID_PROMPTS, seed=GRID_SEED, split="test").captions
    grids = {"teacher-8step": {"label": f"teacher {steps}-step (g={g:g})", "nfe": nfe(steps, g), "args": []}}
    for name, gn in naive_settings(cfg).items():
        grids[name] = {"label": f"naive {NAIVE_STEPS}-step (g={gn:g})" if gn else f"naive {NAIVE_STEPS}-step, no CFG",
                       "nfe": nfe(NAIVE_STEPS, gn), "args": ["--steps", str(NAIVE_STEPS), "--guidance", f"{gn:g}"]}
    return {"benchmark": data, "prompts": caps, "seed": GRID_SEED, "noises_per_prompt": GRID_NOISES,
            "teacher": Path(teacher_dir).relative_to(ROOT).as_posix(),
            "teacher_weights_sha256": sha256_file(Path(teacher_dir) / "model.safetensors"), "grids": grids}


def reference_grids(data, out_dir, env, log):
    """Teacher 8-step and naive 2-step grids of a benchmark, once (redone when the teacher's weights change)."""
    tdir = ROOT / "models" / f"teacher-{data}"
    meta_f = grid_file(out_dir, data, "grids")
    meta = grid_meta(data, tdir)
    old = json.loads(meta_f.read_text()) if meta_f.exists() else {}
    stale = old.get("teacher_weights_sha256") != meta["teacher_weights_sha256"]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, info in meta["grids"].items():
        png = grid_file(out_dir, data, name)
        if stale or not png.exists():
            print(f"{data} | grid {name}", flush=True)
            sample_grid(tdir, data, png, env, log, info["args"])
    meta_f.write_text(json.dumps(meta, indent=1))


def run_grid(data, variant, seed, work, out_dir, env, log):
    """The student grid of a finished run, next to its record (skipped when present or when the run folder is gone)."""
    stem = run_stem(data, variant, seed)
    png, run = out_dir / f"{stem}.png", work / f"run-{stem}"
    if png.exists():
        return
    if not (run / "config.json").exists():
        print(f"  no run folder {run} for its grid; skipped", flush=True)
        return
    sample_grid(run, data, png, env, log)


def budget_note(a):
    return (f"{a.updates} student updates at batch {a.batch} on a {a.cache_num}-sample teacher cache; eval: "
            f"`twostep eval --num {a.eval_num} --seed <seed>` vs held-out data; mean ± std over seeds. Grids: the "
            f"first 8 test-split prompts and the noise of `twostep eval --seed {GRID_SEED}`, identical for every "
            "method.")


def parse_args(argv=None):
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
    p.add_argument("--summary-only", action="store_true",
                   help="only rebuild runs.md, the plots and comparison.html from the records on disk")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; --quick: a temp folder)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config change applied to every variant (a study; needs --out so its records stay apart "
                        "from the main sweep's); recorded in each record's overrides")
    a = p.parse_args(argv)
    if a.set and not (a.out or a.quick):
        p.error("--set changes every variant: give the study its own --out folder "
                "(e.g. --out benchmarks/results/sigma_mid_0.5)")
    if a.set:  # an unknown key or a bad value fails here, once, rather than in every run
        why = check_study(a.set, a.variants)
        if why:
            p.error(why)
    if a.quick:
        a.updates, a.cache_num, a.eval_num, a.seeds, a.batch = 2, 16, 20, a.seeds[:1], 4
    return a


def main(argv=None):
    a = parse_args(argv)
    results = Path(a.out) if a.out else (Path(tempfile.mkdtemp(prefix="twostep-bench-")) if a.quick else RESULTS)
    out_dir = results / "runs"
    work = results / "work" if (a.quick or a.out) else ROOT / "benchmarks" / "work"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONUNBUFFERED": "1"}
    log = work / "sweep.log"
    for data in [] if a.summary_only else a.data:
        reference_grids(data, out_dir, env, log)
        for seed in a.seeds:  # seed-major: every method gets seed 0 before any gets seed 1 (partial sweeps compare)
            for variant in a.variants:
                print(f"{data} | {variant} | seed {seed}", flush=True)
                r = one_run(data, variant, seed, a, work, env, log, out_dir)
                if r:
                    print(f"  FD {r['fd']:.4g}  SWD {r['swd']:.4g}  {r['train_sec_per_update']:.2f} s/update",
                          flush=True)
                    run_grid(data, variant, seed, work, out_dir, env, log)
    budget = {"updates": a.updates, "batch": a.batch, "cache_num": a.cache_num, "num": a.eval_num}
    recs = load_records(out_dir, budget)
    written = summarize(recs, results, out_dir, RESULTS / "teacher_gap", budget_note(a), eval_num=a.eval_num)
    print((results / "runs.md").read_text())
    print("written: " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    main()
