"""The comparison sweep: every method and Turbo++ ablation on the same teacher cache, budget, batch and metrics.

    .venv/bin/python benchmarks/run.py [--data shapes photos] [--variants ...] [--seeds 0 1 2]
                                       [--updates 600] [--cache-num 2048] [--eval-num 1000] [--quick]
                                       [--summary-only] [--out DIR] [--set KEY=VALUE ...] [--eval-at K ...]
    .venv/bin/python benchmarks/run.py eval-checkpoint RUN UPDATE --data D --num N --seed S --json FILE

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

Budget curves (`--eval-at 100 300 1000 2000`, needs `--out`): one run per (benchmark, variant, seed), trained to
each of those updates in turn (the same run continued with `--resume`, not restarted: training at update k does
not depend on the total, so this is the run that went to the last budget at once) and evaluated there from its
checkpoint (`run.py eval-checkpoint RUN K`: twostep.sampling.load_checkpoint_generator, the EMA student that
`twostep eval --model RUN` scores once the run stops at K; same `--num`, `--seed`). Each point's record,
runs/<stem>-u<k>.json, is written as soon as it is measured and never recomputed; a run resumes only from a
complete checkpoint. A point's training seconds (`train_s`) are the loop's own timers from that checkpoint's log
(meta.json, the surviving timeline): Σ sec_per_update over updates 1..k (train.log_every=1) + sec_d_warmup (the
discriminator head start); `train_s_single` corrects them for sharing the machine: each segment's seconds × the
CPU share of its distill process (CPU seconds ÷ wall seconds, capped at 1; with --threads 1 a process alone on
its core has share ≈ 1). Afterwards: budget_curves.md (sweep_outputs.curves_table: FD mean ± std per method per
budget, paired Δ vs turbopp, the decoupling rule of docs/decoupling_rule.md applied) and budget_curves_<b>.png
(FD vs updates and vs single-stream training seconds, error bars over seeds).

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
from twostep.config import COUNT, SEED
from twostep.io.checkpoints import latest_checkpoint
from twostep.io.files import atomic_write_text, sha256_file
from twostep.io.folders import read_config
from twostep.methods import METHODS, config_class, load_config
from twostep.report import GRID_PROMPTS
from twostep.sampling import NAIVE_STEPS, checkpoint_updates, load_checkpoint_generator, naive_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_outputs import grid_file, load_points, load_records, run_stem, summarize, summarize_curves  # noqa: E402

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
    # issue 25's leads against the decay after 300 updates (one change each from the default)
    "lead-mismatch": (None, ["disc.mismatch_weight=1.0"]),          # matching-aware critic (wrong-caption fakes)
    "lead-step1-consistency": (None, ["loss.step1_loss=consistency"]),  # x̂0₁ regressed to sg(x̂0₂)
    "lead-ema-0.999": (None, ["train.ema=0.999"]),
    "lead-lr-half-life-1000": (None, ["train.lr_half_life=1000"]),
    "lead-disc-sigma-0": (None, ["disc.sigma_mean=0.0"]),           # the critic judges at higher noise too
    # a Diffusion2GAN-strength sample anchor: paired regression of x̂0₂ in the critic's frozen teacher features
    "lead-paired-perceptual": (None, ["loss.paired_weight=1.0", "loss.paired_distance=perceptual"]),
    # the two leads that passed the shapes screen, together (docs/default_rule.md, "Combination")
    "lead-mismatch-sigma-0": (None, ["disc.mismatch_weight=1.0", "disc.sigma_mean=0.0"]),
    # docs/default_rule.md, "Revision 2": the default again (for its fd_teacher, --ref both) and one combination
    "turbopp-rerun": (None, []),
    "lead-lr-half-life-paired-perceptual": (None, ["train.lr_half_life=1000", "loss.paired_weight=1.0",
                                                   "loss.paired_distance=perceptual"]),
    "ladd": ("configs/ladd.yaml", []),
    "dmd2": ("configs/dmd2.yaml", []),
    "diffusion2gan": ("configs/diffusion2gan.yaml", []),
}
# reruns of a variant for another figure (turbopp-rerun: fd_teacher): left out of the summaries, which have the original
RERUNS = {"turbopp-rerun": "turbopp"}
DEFAULT = ["turbopp", "turbopp-lora", "ablate-shared", "ablate-detach", "ablate-step1-none", "ablate-disc-real-data",
           "ablate-no-adv (regression only)", "ladd", "dmd2", "diffusion2gan"]
# issue 3's table of choices (each one change from the default); not in the default sweep
CHOICES = ["choice-sigma-mid-0.5", "choice-sigma-mid-0.9", "choice-step1-traj", "choice-traj-perceptual",
           "choice-disc-pooled", "choice-paired", "choice-no-head-start", "turbopp-lora-lr2e-5", "choice-lr-1e-4"]


def run_child(cmd, env, log):
    """Run a child process; return (returncode, peak RSS in MB of that child)."""
    rc, peak, _, _ = run_timed(cmd, env, log)
    return rc, peak


def run_timed(cmd, env, log):
    """run_child with the child's seconds: (returncode, peak RSS MB, wall s, CPU s = user + system, its rusage)."""
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n"); f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
    return os.waitstatus_to_exitcode(status), ru.ru_maxrss / 1024, time.time() - t0, ru.ru_utime + ru.ru_stime


def teacher_dir(data) -> str:
    """The benchmark's teacher folder (relative to the repository root, where every child runs)."""
    return f"models/teacher-{data}"


def resume_flag(run: Path) -> list[str]:
    """["--resume"] only when the run folder holds a complete checkpoint (meta.json written) to continue from; a
    run stopped before its first complete checkpoint starts afresh (distill accepts its unfinished folder without
    --resume, and refuses --resume with nothing to resume)."""
    return ["--resume"] if latest_checkpoint(Path(run) / "checkpoints") is not None else []


def ensure_cache(data, num, work, env, log, seed=0):
    cache = work / f"cache-{data}-{num}"
    if not (cache / "manifest.json").exists() or not json.loads((cache / "manifest.json").read_text()).get("complete"):
        rc, _ = run_child(TWOSTEP + ["teacher", "cache", "--teacher", teacher_dir(data), "--data", data,
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
    cmd = distill_cmd(data, seed, a, cache, run, a.updates, cfg_file, sets,
                      [f"train.checkpoint_every={max(a.updates // 4, 1)}"])
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


def distill_cmd(data, seed, a, cache, run, updates, cfg_file, sets, budget=()) -> list[str]:
    """The `twostep distill` of one run to `updates`: the budget's settings (then `budget`), the variant's config
    file, the study's and the variant's changes (`sets`, last), and --resume when there is a checkpoint to resume."""
    cmd = TWOSTEP + ["distill", "--teacher", teacher_dir(data), "--cache", str(cache), "--out", str(run),
                     "--no-progress", "--set", f"train.updates={updates}", "--set", f"train.seed={seed}",
                     "--set", f"train.batch_size={a.batch}", "--set", "train.grid_every=0"]
    for s in budget:
        cmd += ["--set", s]
    if cfg_file:
        cmd += ["--config", cfg_file]
    for s in sets:
        cmd += ["--set", s]
    return cmd + resume_flag(run)


# ---- budget curves (--eval-at): one run per (benchmark, variant, seed), evaluated at several updates ---------

def point_path(out_dir, data, variant, seed, k) -> Path:
    return Path(out_dir) / f"{run_stem(data, variant, seed)}-u{k}.json"


def curve_checkpoint_every(a) -> int:
    """Checkpoints inside a segment, for an interrupted run to resume near where it stopped (each segment also
    ends with one, at its eval point)."""
    return max(1, min(100, a.updates // 4))


def loop_seconds(log_records, k) -> dict:
    """A run's training seconds up to update k from its log (a checkpoint's meta.json "log": the timeline that
    survived rollbacks and resumes): the discriminator head start (update 0's sec_d_warmup) and Σ sec_per_update
    over updates 1..k (train.log_every=1 logs every update; otherwise the mean of the logged ones × k)."""
    spu, warm = {}, None
    for r in log_records:
        u = r.get("update")
        if u == 0 and "sec_d_warmup" in r:
            warm = r["sec_d_warmup"]
        if isinstance(u, int) and 1 <= u <= k and "sec_per_update" in r:
            spu[u] = r["sec_per_update"]
    vals = list(spu.values())
    upd = sum(vals) if len(vals) == k else (statistics.mean(vals) * k if vals else None)
    return {"warmup_s": warm or 0.0, "updates_s": upd, "logged_updates": len(vals),
            "sec_per_update": statistics.median(vals) if vals else None,
            "timing": "log: every update" if len(vals) == k else f"log: {len(vals)} of {k} updates, mean × {k}",
            **({} if warm is not None else {"warmup_timed": False})}


def read_segments(work, stem) -> dict:
    f = Path(work) / f"segments-{stem}.json"
    return json.loads(f.read_text()) if f.exists() else {}


def eval_point(data, variant, seed, k, a, run, work, env, log, out_dir, sets, cfg_file, prev):
    """Evaluate the run's checkpoint at update k (a fresh `run.py eval-checkpoint` process) and write its point
    record; `prev`: the previous point's record (for the cumulative single-stream seconds), or None."""
    stem = run_stem(data, variant, seed)
    ck = run / "checkpoints" / f"step-{k:08d}"
    t = loop_seconds(json.loads((ck / "meta.json").read_text()).get("log", []), k)
    ev = work / f"eval-{stem}-u{k}.json"
    rc, _ = run_child([sys.executable, str(Path(__file__).resolve()), "eval-checkpoint", str(run), str(k),
                       "--data", data, "--num", str(a.eval_num), "--seed", str(seed), "--json", str(ev),
                       "--ref", a.ref], env, log)
    if rc != 0 or not ev.exists():
        print(f"  EVAL FAILED: {variant} seed {seed} at update {k}; see {log}", flush=True)
        return None
    segs = read_segments(work, stem)
    seg = segs.get(str(k))
    train_s = t["warmup_s"] + (t["updates_s"] or 0.0)
    base_s, base_single = (prev["train_s"], prev["train_s_single"]) if prev else (0.0, 0.0)
    share = min(1.0, seg["cpu_s"] / seg["wall_s"]) if seg and seg.get("wall_s") and a.threads == 1 else 1.0
    done = [v for kk, v in segs.items() if int(kk) <= k]
    rec = json.loads(ev.read_text())
    rec.update({"method": variant, "benchmark": data, "seed": seed, "updates": k, "batch": a.batch,
                "cache_num": a.cache_num, "eval_at": list(a.eval_at), "checkpoint": f"{run.name}/{ck.name}",
                "train_s": train_s, "train_s_single": base_single + (train_s - base_s) * share,
                "train_warmup_s": t["warmup_s"], "train_updates_s": t["updates_s"], "timing": t["timing"],
                "cpu_share": share if seg else None, "threads": a.threads,
                "train_sec_per_update": t["sec_per_update"],
                "train_wall_s": sum(v["wall_s"] for v in done),  # the distill processes (startups, checkpoints)
                "peak_rss_mb": max((v["peak_rss_mb"] for v in done), default=None),
                "config": cfg_file, "overrides": sets})
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(point_path(out_dir, data, variant, seed, k), json.dumps(rec, indent=1))
    return rec


def curve_run(data, variant, seed, a, work, env, log, out_dir) -> list[dict]:
    """The points of one run (module docstring), in order: a point with a record is read, never recomputed; a
    missing one trains the run from its newest complete checkpoint to that update (or uses the checkpoint there,
    when the run already reached it) and evaluates it. Stops at the first failure (later points need it)."""
    stem = run_stem(data, variant, seed)
    cfg_file, own = VARIANTS[variant]
    applied, skipped = for_method(a.set, variant_method(variant))
    if skipped:
        print(f"  study --set {' '.join(skipped)}: not a section of {variant}'s config; left out", flush=True)
    sets = study_sets(applied, own)
    run, recs, prev = work / f"run-{stem}", [], None
    budget = ["train.log_every=1", f"train.checkpoint_every={curve_checkpoint_every(a)}"]
    for k in a.eval_at:
        p = point_path(out_dir, data, variant, seed, k)
        if p.exists():
            prev = json.loads(p.read_text())
            recs.append(prev)
            continue
        have = checkpoint_updates(run)
        if k not in have:
            if have and have[-1] > k:
                print(f"  update {k}: the run is at update {have[-1]} and its checkpoint at {k} is gone; not "
                      "measurable from this run (start the curves in a new --out)", flush=True)
                prev = None
                continue
            cache = ensure_cache(data, a.cache_num, work, env, log)
            print(f"  training to update {k}" + (f" (from update {have[-1]})" if have else ""), flush=True)
            rc, peak, wall, cpu = run_timed(distill_cmd(data, seed, a, cache, run, k, cfg_file, sets, budget), env, log)
            if rc != 0:
                print(f"  FAILED: {variant} seed {seed} training to update {k} (exit {rc}); see {log}", flush=True)
                return recs
            segs = read_segments(work, stem)
            segs[str(k)] = {"from": have[-1] if have else 0, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak,
                            "threads": a.threads, "loadavg_1m": os.getloadavg()[0]}
            atomic_write_text(work / f"segments-{stem}.json", json.dumps(segs, indent=1))
        rec = eval_point(data, variant, seed, k, a, run, work, env, log, out_dir, sets, cfg_file, prev)
        if rec is None:
            return recs
        recs.append(rec)
        prev = rec
    return recs


def eval_checkpoint_main(argv) -> int:
    """`run.py eval-checkpoint RUN UPDATE --data D --num N --seed S --json F`: one budget-curve point."""
    p = argparse.ArgumentParser(prog="run.py eval-checkpoint",
                                description="`twostep eval` of one checkpoint of a distillation run: the EMA student "
                                "of RUN/checkpoints/step-UPDATE (twostep.sampling.load_checkpoint_generator), scored "
                                "as `twostep eval --model RUN` scores a run that stopped there")
    p.add_argument("run", help="a `twostep distill` run folder (finished or not)")
    p.add_argument("update", type=COUNT.arg(), help="the update of one of its complete checkpoints")
    p.add_argument("--data", required=True, help="the benchmark (shapes, photos or a folder)")
    from twostep import evaluate
    p.add_argument("--num", type=evaluate.EVAL_NUM.arg(), default=1000, help="eval images (as twostep eval --num)")
    p.add_argument("--seed", type=SEED.arg(), default=0, help="eval seed (as twostep eval --seed)")
    p.add_argument("--json", required=True, help="where the eval record goes (as twostep eval --json)")
    p.add_argument("--ref", choices=["data", "teacher", "both"], default="data",
                   help="FD reference (as twostep eval --ref): both adds fd_teacher, the distillation error")
    a = p.parse_args(argv)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # as the twostep CLI: a caller's OMP_NUM_THREADS
        import torch
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        gen = load_checkpoint_generator(a.run, a.update)
        res = evaluate.evaluate(gen, a.data, num=a.num, seed=a.seed, ref=a.ref, progress=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(evaluate.format_table([res]))
    evaluate.write_json(Path(a.json), res)
    return 0


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
    tdir = ROOT / teacher_dir(data)
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
    if a.eval_at:
        return (f"One run per (method, seed) evaluated from its checkpoints at {', '.join(map(str, a.eval_at))} "
                f"updates, batch {a.batch}, a {a.cache_num}-sample teacher cache; eval: `twostep eval --num "
                f"{a.eval_num} --seed <seed>` equivalent (run.py eval-checkpoint) vs held-out data; mean ± std over "
                "seeds. Training seconds: the loop's timers (Σ sec_per_update + the discriminator head start) × each "
                f"segment's CPU share (single-stream; --threads {a.threads}).")
    return (f"{a.updates} student updates at batch {a.batch} on a {a.cache_num}-sample teacher cache; eval: "
            f"`twostep eval --num {a.eval_num} --seed <seed>` vs held-out data; mean ± std over seeds. Grids: the "
            f"first 8 test-split prompts and the noise of `twostep eval --seed {GRID_SEED}`, identical for every "
            "method.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="twostep comparison sweep (resumable)")
    p.add_argument("--data", nargs="+", default=["shapes", "photos"])
    p.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--updates", type=int, default=None, help="student updates per run (default 600; with --eval-at "
                   "its last budget)")
    p.add_argument("--eval-at", type=COUNT.arg(), nargs="+", default=None, metavar="UPDATES",
                   help="budget curves: one run per (benchmark, variant, seed) trained to each of these updates in "
                        "turn (continued, not restarted) and evaluated there from its checkpoint; a record per point "
                        "(runs/<stem>-u<k>.json), budget_curves.md and budget_curves_<b>.png (needs --out)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cache-num", type=int, default=2048)
    p.add_argument("--eval-num", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ref", choices=["data", "teacher", "both"], default="data",
                   help="budget curves: each point's FD reference (both: also fd_teacher, the FD against the "
                   "teacher's own samples for the same prompts and noise)")
    p.add_argument("--quick", action="store_true", help="tiny smoke version (results in a temporary folder)")
    p.add_argument("--summary-only", action="store_true",
                   help="only rebuild runs.md, the plots and comparison.html from the records on disk")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; --quick: a temp folder)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config change applied to every variant (a study; needs --out so its records stay apart "
                        "from the main sweep's); recorded in each record's overrides")
    a = p.parse_args(argv)
    if a.eval_at:
        if not (a.out or a.quick):
            p.error("--eval-at writes a record per point: give the curves their own --out folder "
                    "(e.g. --out benchmarks/results/budget_curves)")
        a.eval_at = sorted(set(a.eval_at))
        if a.updates is not None and a.updates != a.eval_at[-1]:
            p.error(f"--updates {a.updates} with --eval-at: a run's updates are its last budget ({a.eval_at[-1]}); "
                    "drop --updates")
    if a.set and not (a.out or a.quick):
        p.error("--set changes every variant: give the study its own --out folder "
                "(e.g. --out benchmarks/results/sigma_mid_0.5)")
    if a.set:  # an unknown key or a bad value fails here, once, rather than in every run
        why = check_study(a.set, a.variants)
        if why:
            p.error(why)
    if a.quick:
        a.updates, a.cache_num, a.eval_num, a.seeds, a.batch = 2, 16, 20, a.seeds[:1], 4
    a.updates = a.eval_at[-1] if a.eval_at else (a.updates or 600)
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval-checkpoint"]:
        return eval_checkpoint_main(argv[1:])
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
                if a.eval_at:
                    pts = curve_run(data, variant, seed, a, work, env, log, out_dir)
                    for r in pts:
                        print(f"  update {r['updates']}: FD {r['fd']:.4g}  {r['train_s_single']:.0f} s single-stream",
                              flush=True)
                    if pts and pts[-1]["updates"] == a.updates:
                        run_grid(data, variant, seed, work, out_dir, env, log)
                    continue
                r = one_run(data, variant, seed, a, work, env, log, out_dir)
                if r:
                    print(f"  FD {r['fd']:.4g}  SWD {r['swd']:.4g}  {r['train_sec_per_update']:.2f} s/update",
                          flush=True)
                    run_grid(data, variant, seed, work, out_dir, env, log)
    budget = {"updates": a.updates, "batch": a.batch, "cache_num": a.cache_num, "num": a.eval_num}
    recs = [r for r in load_records(out_dir, budget) if r.get("method") not in RERUNS]
    written = summarize(recs, results, out_dir, RESULTS / "teacher_gap", budget_note(a), eval_num=a.eval_num)
    if a.eval_at:
        base = {"batch": a.batch, "cache_num": a.cache_num, "num": a.eval_num}
        points = [r for r in load_points(out_dir, base) if r.get("method") not in RERUNS]
        written.update(summarize_curves(points, results, RESULTS / "teacher_gap",
                                        budget_note(a), eval_num=a.eval_num))
        print((results / "budget_curves.md").read_text())
    else:
        print((results / "runs.md").read_text())
    print("written: " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    sys.exit(main())
