"""Is each embedded benchmark hard enough? The committed teacher at its default (8 steps, tuned CFG) vs naive
2-step sampling without CFG (2 NFE, the student's cost) and with CFG (4 NFE).

    .venv/bin/python benchmarks/teacher_gap.py [--num 1000] [--seeds 0 1 2] [--data shapes photos]

One JSON record per (benchmark, setting, seed) in benchmarks/results/teacher_gap/ (finished records are skipped
on restart), then benchmarks/results/teacher_gap.md: mean ± std over seeds and the FD ratio naive/8-step.
Reference = held-out data (`twostep eval --ref data`), feature net = models/features-<data>.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twostep.evaluate import evaluate  # noqa: E402
from twostep.io.files import atomic_write_text, sha256_file  # noqa: E402
from twostep.model import load_teacher  # noqa: E402
from twostep.sampling import TeacherSampler, naive_generators  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "teacher_gap"
METRICS = ["fd", "kid", "swd", "alignment", "diversity", "psnr_vs_teacher", "sec_per_image"]


def settings(teacher):
    """{setting: generator}: the teacher's default, and the naive peer without and with CFG
    (twostep.sampling.naive_generators)."""
    return {"teacher-8step": TeacherSampler(teacher), **naive_generators(teacher)}


def ms(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    m = statistics.mean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{m:.4g} ± {s:.2g}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["shapes", "photos"])
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--redo-unstamped", dest="redo_unstamped", action="store_true",
                   help="recompute records written before they carried the teacher weights sha256")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    lines = ["| benchmark | sampler | steps | CFG g | NFE | FD | KID | SWD | alignment | diversity | FD ÷ teacher FD |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for data in a.data:
        tdir = ROOT / "models" / f"teacher-{data}"
        teacher = load_teacher(tdir)
        wsha = sha256_file(tdir / "model.safetensors")  # a record of another teacher is stale: redo it
        recs = {}
        gens = settings(teacher)
        for name, gen in gens.items():
            for seed in a.seeds:
                f = OUT / f"{data}-{name}-n{a.num}-seed{seed}.json"
                r = json.loads(f.read_text()) if f.exists() else None
                if r is None or r.get("teacher_weights_sha256", wsha) != wsha or ("teacher_weights_sha256" not in r
                                                                               and a.redo_unstamped):
                    r = None
                if r is None:
                    print(f"{data} {name} seed {seed} ...", flush=True)
                    r = evaluate(gen, data, num=a.num, seed=seed, teacher_dir=tdir, progress=False)
                    r.update({"benchmark": data, "setting": name, "teacher": str(tdir.relative_to(ROOT)),
                              "teacher_weights_sha256": wsha})
                    atomic_write_text(f, json.dumps(r, indent=1))
                recs.setdefault(name, []).append(r)
        base = {r["seed"]: r["fd"] for r in recs["teacher-8step"]}
        for name, gen in gens.items():
            rs = recs[name]
            ratio = [r["fd"] / base[r["seed"]] for r in rs if base.get(r["seed"])]
            lines.append(f"| {data} | {name} | {gen.steps} | {gen.guidance:g} | {rs[0]['nfe']} | " +
                         " | ".join(ms([r[k] for r in rs]) for k in ("fd", "kid", "swd", "alignment", "diversity"))
                         + f" | {ms(ratio)} |")
    md = "\n".join(lines) + (f"\n\nFD/KID in each benchmark's feature net (models/features-<data>), {a.num} samples "
                             f"vs {a.num} held-out data images, seeds {a.seeds} (mean ± std); SWD ×1e3.\n")
    atomic_write_text(ROOT / "benchmarks" / "results" / "teacher_gap.md", md)
    print(md)


if __name__ == "__main__":
    main()
