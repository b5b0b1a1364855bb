"""The teacher cache at scale, measured (issue 16, "Measured, not asserted"), on the CPU with a tiny latent-space
ZImagePipeline folder as the teacher (tests/test_pipeline_teacher.py `build_tiny_pipeline`: 16-channel latents of
16×16, a 2-layer Qwen3 text encoder of 64-d).

    python benchmarks/scale_data.py            # writes benchmarks/results/scale_data.json (~10 min on 2 cores)
    python benchmarks/scale_data.py --quick    # smaller sizes, prints only

1. Peak RSS of `twostep teacher cache --prompts FILE --num 2000` with a 1,000,000-line prompt file vs the same
   command with a 10-line file (target: < 1.5 GB more).
2. Cache bytes per sample, format 1 (9 fp32 states + fp32 text) vs format 2 (the defaults for a ZImagePipeline
   teacher: bf16 final + bf16 text; and with a σm state), serialised with safetensors at the real shapes
   (128×128×16 latents, 80 tokens of 2560-d Qwen3 features); the tiny cache's own bytes per sample beside it.
   Target: ≤ 0.25×.
3. Peak RSS of `twostep distill` (start-up and one update) with a cache of N and of 10·N samples (target: ratio
   ≤ 1.1). These caches come from a 1-step copy of the tiny teacher (the loader does not care how many steps made
   a sample; it keeps the build short).
4. Samples/s of `teacher cache` with 1 process and with 2 (torchrun, gloo, one thread each), wall clock of the
   whole command (start-up included), and whether the shards' sha256s are equal.

Each command runs in its own process (peak RSS = that process's ru_maxrss). Figures depend on the machine and
its load; the JSON records both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "scale_data.json"
sys.path.insert(0, str(ROOT / "tests"))  # build_tiny_pipeline: the tiny ZImagePipeline of the pipeline tests

RUNNER = ("import json, os, resource, sys\n"
          "from twostep.cli import main\n"
          "rc = main(json.loads(os.environ['TWOSTEP_ARGV']))\n"
          "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
          "sys.exit(rc)\n")


def run_cli(argv, work: Path, procs: int = 1) -> dict:
    """`twostep ARGV` in fresh processes (torchrun for procs > 1): wall seconds and peak RSS (MB, max over ranks)."""
    script = work / "run_cli.py"
    script.write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TWOSTEP_ARGV": json.dumps(["--threads", "1", *map(str, argv)])}
    cmd = [sys.executable, str(script)] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), str(script)]
    t = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t
    if p.returncode != 0:
        raise SystemExit(f"twostep {' '.join(map(str, argv))}: exit {p.returncode}\n{p.stderr[-3000:]}")
    rss = [int(line.split()[-1]) for line in p.stderr.splitlines() if "PEAK_RSS_KB" in line]
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(max(rss) / 1024, 1)}


def shard_shas(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard-*.safetensors"))}


def write_prompts(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(f"a photo of object number {i} on a wooden table, soft light, {i % 97} degrees\n")
    return path


def format_bytes(version: int, n: int, shape, tokens: int, dim: int, steps: int = 8, states: int = 0) -> int:
    """Bytes of a shard of n samples in cache format `version` (teacher/cache.py: tensor names, dtypes, shapes),
    serialised by safetensors (header and a caption list of ~80-token prompts included)."""
    import torch
    from safetensors.torch import save

    from twostep.teacher import cache as C

    caps = ["a photo of an object on a wooden table, soft morning light " * 8] * n
    info = json.dumps({"format": C.FORMAT, "version": version, "index": 0, "start": 0, "count": n,
                       "noise_seed": 1, "captions": caps}, sort_keys=True)
    text_len = torch.full((n,), tokens, dtype=torch.int64)
    sig = torch.zeros(steps + 1, dtype=torch.float64)
    if version == 1:
        t = {"trajectory": torch.zeros(n, steps + 1, *shape), "text": torch.zeros(n * tokens, dim),
             "text_len": text_len, "sigmas": sig}
    else:
        bf = torch.bfloat16
        t = {"final": torch.zeros(n, *shape, dtype=bf), "text": torch.zeros(n * tokens, dim, dtype=bf),
             "text_len": text_len, "sigmas": sig,
             **{C.state_key(i + 1): torch.zeros(n, *shape, dtype=bf) for i in range(states)}}
    return len(save(t, metadata={C.META_KEY: info}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes; print, do not write the JSON")
    ap.add_argument("--keep", default=None, help="keep the work folder here")
    ap.add_argument("--processes-only", dest="processes_only", type=int, default=None, metavar="N",
                    help="re-measure only part 4 with N samples and update that entry of the JSON")
    a = ap.parse_args()
    num, big_lines, n_rss, n_speed = (200, 100_000, 300, 64) if a.quick else (2000, 1_000_000, 1000, 1536)
    if a.processes_only:
        n_speed, big_lines = a.processes_only, 10_000
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="twostep-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    from test_pipeline_teacher import build_tiny_pipeline

    res: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores, shared with other jobs (measured under "
                 "load: several processes competing for the cores); one torch thread per process",
                 "teacher": "tiny ZImagePipeline (tests/test_pipeline_teacher.py): 16×16×16 latents, 64-d text"}
    try:
        pipe = build_tiny_pipeline(work / "pipe")
        fast = Path(shutil.copytree(pipe, work / "pipe1"))
        (fast / "twostep.json").write_text(json.dumps({"sampling": {"steps": 1}}))

        big, small = write_prompts(work / "big.txt", big_lines), write_prompts(work / "small.txt", 10)
        if a.processes_only:
            res = json.loads(RESULT.read_text())
            processes(res, pipe, big, n_speed, work)
            RESULT.write_text(json.dumps(res, indent=1) + "\n")
            return 0
        # 1. peak RSS with a 1,000,000-line prompt file vs a 10-line one
        r_big = run_cli(["teacher", "cache", "--teacher", pipe, "--prompts", big, "--num", num, "--out",
                         work / "c_big", "--no-progress"], work)
        r_small = run_cli(["teacher", "cache", "--teacher", pipe, "--prompts", small, "--num", num, "--out",
                           work / "c_small", "--no-progress"], work)
        res["prompt_file_rss"] = {
            "cmd": f"twostep teacher cache --teacher PIPE --prompts FILE --num {num} --out OUT",
            "lines_big": big_lines, "lines_small": 10, "big_file_mb": round(big.stat().st_size / 2**20, 1),
            "peak_rss_mb_big": r_big["peak_rss_mb"], "peak_rss_mb_small": r_small["peak_rss_mb"],
            "difference_mb": round(r_big["peak_rss_mb"] - r_small["peak_rss_mb"], 1), "target_mb": "< 1536"}
        print("1.", res["prompt_file_rss"], flush=True)

        # 2. bytes per sample, old vs new, at the real shapes; the tiny cache's own
        real = dict(shape=(16, 128, 128), tokens=80, dim=2560)
        old = format_bytes(1, 2, **real) / 2
        new = format_bytes(2, 2, **real) / 2
        new_mid = format_bytes(2, 2, states=1, **real) / 2
        m = json.loads((work / "c_big" / "manifest.json").read_text())
        tiny = sum(e["bytes"] for e in m["shards"]) / m["num"]
        res["bytes_per_sample"] = {
            "real_shapes": "latents 16×128×128 (1024² images), text 80 tokens × 2560 (Qwen3-4B hidden size), 8 steps",
            "format1_fp32_trajectory": int(old), "format2_default_bf16_final": int(new),
            "format2_with_sigma_mid_state": int(new_mid), "ratio_default": round(new / old, 4),
            "ratio_with_sigma_mid": round(new_mid / old, 4), "target_ratio": "<= 0.25",
            "tiny_cache_measured_bytes_per_sample": round(tiny, 1),
            "tiny_cache_format2_formula": round(format_bytes(2, 256, (16, 16, 16), round(_mean_tokens(work / "c_big")),
                                                             64) / 256, 1)}
        print("2.", res["bytes_per_sample"], flush=True)

        # 3. distill start-up peak RSS with N and 10·N samples
        dist = {}
        for n in (n_rss, 10 * n_rss):
            c = work / f"c_rss_{n}"
            run_cli(["teacher", "cache", "--teacher", fast, "--prompts", big, "--num", n, "--out", c,
                     "--no-progress"], work)
            dist[n] = run_cli(["distill", "--teacher", fast, "--cache", c, "--out", work / f"run_{n}", "--no-progress",
                               "--set", "train.updates=1", "--set", "train.d_warmup=0", "--set", "train.batch_size=2",
                               "--set", "train.grid_every=0", "--set", "train.checkpoint_every=0",
                               "--set", "disc.blocks=[0]"], work)
            dist[n]["cache_mb"] = round(sum(p.stat().st_size for p in c.glob("shard-*")) / 2**20, 1)
        n1, n10 = n_rss, 10 * n_rss
        res["distill_startup_rss"] = {
            "cmd": "twostep distill --teacher PIPE --cache C --set train.updates=1 (batch 2, no grids/checkpoints)",
            "N": n1, "peak_rss_mb_N": dist[n1]["peak_rss_mb"], "cache_mb_N": dist[n1]["cache_mb"],
            "peak_rss_mb_10N": dist[n10]["peak_rss_mb"], "cache_mb_10N": dist[n10]["cache_mb"],
            "ratio": round(dist[n10]["peak_rss_mb"] / dist[n1]["peak_rss_mb"], 3), "target_ratio": "<= 1.1"}
        print("3.", res["distill_startup_rss"], flush=True)

        processes(res, pipe, big, n_speed, work)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    if not a.quick:
        RESULT.write_text(json.dumps(res, indent=1) + "\n")
        print(f"written to {RESULT.relative_to(ROOT)}")
    return 0


def processes(res: dict, pipe: Path, big: Path, n_speed: int, work: Path):
    """4. samples/s with 1 and 2 processes (one thread each), sha256 equality of the shards."""
    speed = {}
    for procs in (1, 2):
        c = work / f"c_speed_{procs}"
        argv = ["teacher", "cache", "--teacher", pipe, "--prompts", big, "--num", n_speed, "--shard-size", 32,
                "--batch-size", 16, "--out", c, "--device", "cpu", "--no-progress"]
        speed[procs] = run_cli(argv, work, procs=procs)
        # the same command again finds the cache complete: start-up, prompt draw and sha256 checks only
        speed[procs]["noop_s"] = run_cli(argv, work, procs=procs)["wall_s"]
    same = shard_shas(work / "c_speed_1") == shard_shas(work / "c_speed_2")
    res["processes"] = {
        "cmd": f"[torchrun --nproc_per_node P] twostep teacher cache --teacher PIPE --prompts FILE --num {n_speed} "
               "--shard-size 32 --batch-size 16 --device cpu (OMP_NUM_THREADS=1)",
        "samples": n_speed, "wall_s_1": speed[1]["wall_s"], "wall_s_2": speed[2]["wall_s"],
        "samples_per_s_1": round(n_speed / speed[1]["wall_s"], 2),
        "samples_per_s_2": round(n_speed / speed[2]["wall_s"], 2),
        "speedup": round(speed[1]["wall_s"] / speed[2]["wall_s"], 2),
        "noop_rerun_s_1": speed[1]["noop_s"], "noop_rerun_s_2": speed[2]["noop_s"],
        "build_samples_per_s_1": round(n_speed / max(1e-9, speed[1]["wall_s"] - speed[1]["noop_s"]), 2),
        "build_samples_per_s_2": round(n_speed / max(1e-9, speed[2]["wall_s"] - speed[2]["noop_s"]), 2),
        "shards": len(shard_shas(work / "c_speed_1")), "sha256_equal": same,
        "note": "samples_per_s: wall clock of the whole command, start-up included; build_samples_per_s: "
                "minus the wall clock of a no-op re-run of the same command (start-up, prompt draw, sha256 "
                "checks); all runs in one benchmark run on a machine shared with other jobs"}
    print("4.", res["processes"], flush=True)


def _mean_tokens(cache_dir: Path) -> float:
    from twostep.teacher.cache import load_cache

    c = load_cache(cache_dir)
    return sum(s.text_off[-1] for s in c.shards) / len(c)


if __name__ == "__main__":
    sys.exit(main())
