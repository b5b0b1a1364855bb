"""Is a student that gets worse against the data moving toward its teacher or away from it? (issue: the late decay)

    python benchmarks/decay_diagnosis.py     # prints the tables and writes benchmarks/results/budget_curves/decay_diagnosis.md

For each budget-curve run: FD against held-out data (the budget curves' figure), PSNR against the teacher's own
sample for the same caption and noise (higher: closer to the teacher, sample by sample), diversity (the teacher's
is the target) and, where the point was evaluated with `run.py --ref both`, fd_teacher (FD against the teacher's
samples: the distillation error). Means over the seeds that have every point of a run's curve. A run whose FD-vs-data rises while its PSNR
rises and its diversity falls toward the teacher's is converging on the teacher; one whose PSNR falls and whose
diversity overshoots the teacher's is drifting away from it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "budget_curves" / "runs"
OUT = RESULTS / "budget_curves" / "decay_diagnosis.md"
BUDGETS = (100, 300, 1000, 2000)
METHODS = ("turbopp", "turbopp-rerun", "lead-mismatch", "lead-disc-sigma-0", "lead-paired-perceptual", "lead-mismatch-sigma-0",
           "choice-step1-traj", "choice-paired", "lead-lr-half-life-1000", "lead-lr-half-life-paired-perceptual",
           "lead-ema-0.999", "dmd2", "diffusion2gan",
           "ablate-no-adv__regression_only")


def points(folder: Path, data: str, method: str, updates: int) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"{data}-{method}-seed*-u{updates}.json"))]


def mean(recs, key):
    vals = [r[key] for r in recs if r.get(key) is not None]
    return statistics.mean(vals) if vals else None


def teacher(data: str) -> dict:
    recs = [json.loads(p.read_text()) for p in sorted((RESULTS / "teacher_gap").glob(f"{data}-teacher-8step-n1000-seed*.json"))]
    return {"fd": mean(recs, "fd"), "diversity": mean(recs, "diversity"), "n": len(recs)}


def fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def table(data: str) -> list[str]:
    t = teacher(data)
    lines = [f"#### {data}: teacher 8-step FD {fmt(t['fd'])}, diversity {fmt(t['diversity'])} (seeds 0–{t['n'] - 1})", "",
             "| run | seeds | " + " | ".join(f"@{u}: FD / PSNR / div / fd_teacher" for u in BUDGETS) + " |",
             "|" + "---|" * (2 + len(BUDGETS))]
    for m in METHODS:
        at = {u: points(RUNS, data, m, u) for u in BUDGETS}
        have = [{r["seed"] for r in recs} for recs in at.values() if recs]
        seeds = set.intersection(*have) if have else set()  # seeds with every point of the curve
        cells = []
        for u in BUDGETS:
            recs = [r for r in at[u] if r["seed"] in seeds]
            cells.append("—" if not recs else " / ".join(
                [fmt(mean(recs, "fd")), fmt(mean(recs, "psnr_vs_teacher"), 1), fmt(mean(recs, "diversity")),
                 fmt(mean(recs, "fd_teacher"))]))
        if seeds:
            lines.append(f"| {m} | {len(seeds)} | " + " | ".join(cells) + " |")
    return lines + [""]


def main() -> int:
    out = ["Written by `python benchmarks/decay_diagnosis.py` from the budget-curve records (FD vs held-out data at "
           "1000 images; PSNR (dB) against the teacher's sample for the same caption and noise; diversity; "
           "fd_teacher only where the point was evaluated with `--ref both`). Means over the seeds that have every "
           "point of a run's curve.", ""]
    for data in ("photos", "shapes"):
        out += table(data)
    text = "\n".join(out) + "\n"
    OUT.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
