"""Bit-identity check of a refactor: fixed-seed runs through the public CLI, hashed.

    python benchmarks/identity.py --record    # write benchmarks/results/identity.json (before the change)
    python benchmarks/identity.py             # re-run everything and compare (after it); exit 1 on any difference
    python benchmarks/identity.py --students  # after adopting new committed students: re-record their entries only

What is hashed (sha256 of the bytes):
  - a teacher cache of the committed shapes teacher (its shard files);
  - `twostep distill` of 20 updates at a fixed seed for turbopp (full, shared, lora, and step1_loss=traj),
    dmd2, ladd and diffusion2gan (shared, as their configs define them): every safetensors file of the run
    folder (the usable model and both checkpoints) and every grid PNG;
  - `twostep export` of the full and lora runs (the tensors of every safetensors file of the pipeline folder);
  - `twostep sample` of the committed students, of a teacher at 8 and 2 steps and of each 20-update run;
  - `twostep eval --num 20` of the committed shapes student and of the teacher (metrics, minus timings).
One torch thread, so kernels do not depend on the core count. Hashes are of this machine's CPU kernels: record
and check on the same machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "identity.json"
TEACHER = ROOT / "models" / "teacher-shapes"
RUN_SETS = ["train.updates=20", "train.batch_size=4", "train.d_warmup=3", "train.checkpoint_every=10",
            "train.grid_every=10", "train.log_every=5", "train.keep_checkpoints=2", "train.seed=3"]
RUNS = {
    "turbopp-full": ("turbopp", []),
    "turbopp-shared": ("turbopp", ["student.decoupling=shared"]),
    "turbopp-lora": ("turbopp", ["student.decoupling=lora", "student.lora_rank=4"]),
    "turbopp-traj": ("turbopp", ["loss.step1_loss=traj"]),
    "dmd2": ("dmd2", ["train.d_updates=2"]),
    "ladd": ("ladd", []),
    "diffusion2gan": ("diffusion2gan", []),
}
PROMPTS = ["a small red circle at the center on a black background", "two blue squares on a striped background"]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tensors_sha(path: Path) -> str:
    """sha256 of a safetensors file's tensors (names, dtypes, shapes, bytes): diffusers' LoRA files carry
    metadata whose key order varies from save to save."""
    import torch
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for k, v in sorted(load_file(str(path)).items()):
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cli(*args: str) -> None:
    from twostep.cli import main

    rc = main(["--threads", "1", *args])
    if rc != 0:
        raise SystemExit(f"twostep {' '.join(args)}: exit {rc}")


def sample(model: Path, out: Path, *extra: str) -> str:
    args = ["sample", "--model", str(model), "--num", "3", "--seed", "5", "--scale", "1", "--out", str(out)]
    for p in PROMPTS:
        args += ["--prompt", p]
    cli(*args, *extra)
    return sha(out)


def evaluate(model: Path, out: Path) -> dict:
    cli("eval", "--model", str(model), "--data", "shapes", "--num", "20", "--seed", "1", "--no-progress",
        "--json", str(out))
    r = json.loads(out.read_text())
    return {k: v for k, v in sorted(r.items()) if "sec" not in k and "time" not in k}


def measure(work: Path) -> dict:
    res: dict = {}
    cache = work / "cache"
    cli("teacher", "cache", "--teacher", str(TEACHER), "--data", "shapes", "--num", "32", "--shard-size", "16",
        "--batch-size", "16", "--seed", "2", "--out", str(cache), "--no-progress")
    res["cache"] = {p.name: sha(p) for p in sorted(cache.glob("shard-*.safetensors"))}
    for name, (method, sets) in RUNS.items():
        run = work / name
        args = ["distill", "--teacher", str(TEACHER), "--cache", str(cache), "--config",
                str(ROOT / "configs" / f"{method}.yaml"), "--out", str(run), "--no-progress"]
        for s in RUN_SETS + sets:
            args += ["--set", s]
        cli(*args)
        files = sorted(p for p in run.rglob("*") if p.suffix in (".safetensors", ".png") and p.name != "loss_curves.png")
        res[name] = {str(p.relative_to(run)): sha(p) for p in files}
        res[name]["sample.png"] = sample(run, work / f"{name}.png")
        print(f"{name}: {len(files)} files hashed", flush=True)
    for name in ("turbopp-full", "turbopp-lora"):
        exp = work / f"export-{name}"
        cli("export", "--model", str(work / name), "--out", str(exp))
        res[f"export {name}"] = {str(p.relative_to(exp)): tensors_sha(p) for p in sorted(exp.rglob("*.safetensors"))}
    res.update(measure_students(work))
    res["sample teacher 8-step"] = sample(TEACHER, work / "t8.png")
    res["sample teacher 2-step g=0"] = sample(TEACHER, work / "t2.png", "--steps", "2", "--guidance", "0")
    res["eval teacher-shapes"] = evaluate(TEACHER, work / "e2.json")
    return res


def measure_students(work: Path) -> dict:
    res = {f"sample {m}": sample(ROOT / "models" / m, work / f"{m}.png") for m in ("turbopp-shapes", "turbopp-photos")}
    res["eval turbopp-shapes"] = evaluate(ROOT / "models" / "turbopp-shapes", work / "e1.json")
    return res


def diff(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}{k}: only in {'recorded' if k in a else 'now'}")
            else:
                out += diff(a[k], b[k], f"{path}{k} / ")
        return out
    return [] if a == b else [f"{path.rstrip(' /')}: recorded {a!r}, now {b!r}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true", help=f"write {RESULT.relative_to(ROOT)} instead of comparing")
    ap.add_argument("--students", action="store_true",
                    help="re-record only the committed students' entries (sample and eval), keeping every other hash")
    ap.add_argument("--keep", default=None, help="keep the work folder here (default: a temporary folder)")
    a = ap.parse_args()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="twostep-identity-"))
    if work.exists() and a.keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        now = measure_students(work) if a.students else measure(work)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    if a.students:
        rec = json.loads(RESULT.read_text())
        changed = [k for k in now if rec.get(k) != now[k]]
        rec.update(now)
        RESULT.write_text(json.dumps(rec, indent=1) + "\n")
        print(f"re-recorded the students' {len(now)} entries ({len(changed)} changed: {', '.join(changed) or 'none'})"
              f" -> {RESULT}")
        return 0
    if a.record:
        RESULT.write_text(json.dumps(now, indent=1) + "\n")
        print(f"recorded {sum(len(v) if isinstance(v, dict) else 1 for v in now.values())} hashes -> {RESULT}")
        return 0
    bad = diff(json.loads(RESULT.read_text()), now)
    for line in bad:
        print("DIFFERS", line)
    print("identity: OK, every hash equal to the record" if not bad else f"identity: {len(bad)} differences")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
