"""The results table: each committed student against its teacher (8 steps, CFG) and the naive 2-step sampler
(without / with CFG) on the same benchmark, eval seeds and sample count, from the eval records
benchmarks/results/students/<student>-seed<s>.json (written by `benchmarks/models.py commit-student <data>`) and
the teacher-gap records of the same seeds (benchmarks/teacher_gap.py); plus the `twostep speed` records
benchmarks/results/students/<student>-speed.json. Writes benchmarks/results/students.md.

    .venv/bin/python benchmarks/students_table.py
"""

import json
import statistics as st
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "benchmarks" / "results"
KEYS = ("fd", "kid", "swd", "alignment", "psnr_vs_teacher", "diversity", "sec_per_image")
GAP = (("teacher-8step", "teacher 8-step"), ("naive-2step-nocfg", "naive 2-step, no CFG"),
       ("naive-2step-cfg", "naive 2-step, CFG"))


def ms(v):
    v = [x for x in v if x is not None]
    if not v:
        return "—"
    return f"{st.mean(v):.4g} ± {st.stdev(v):.2g}" if len(v) > 1 else f"{v[0]:.4g}"


def gap_record(data, setting, num, seed):
    f = RES / "teacher_gap" / f"{data}-{setting}-n{num}-seed{seed}.json"
    return json.loads(f.read_text()) if f.exists() else None


def row(name, recs, data):
    """One table row: mean ± std over the records' seeds; ratios against the teacher-gap records of each seed."""
    rt, rn = [], []
    for r in recs:
        t, n = (gap_record(data, s, r["num"], r["seed"]) for s in ("teacher-8step", "naive-2step-nocfg"))
        if t and n:
            rt.append(r["fd"] / t["fd"])
            rn.append(r["fd"] / n["fd"])
    r0 = recs[0]
    return (f"| {data} | {name} | {r0['steps']} | {r0['nfe']} | {len(recs)} | "
            + " | ".join(ms([r.get(k) for r in recs]) for k in KEYS) + f" | {ms(rt)} | {ms(rn)} |")


def main():
    lines = ["| benchmark | model | steps | NFE | seeds | " + " | ".join(KEYS) +
             " | FD ÷ teacher 8-step | FD ÷ naive 2-step |", "|---|---|---|---|---|" + "---|" * (len(KEYS) + 2)]
    students = sorted({f.stem.rsplit("-seed", 1)[0] for f in (RES / "students").glob("*-seed*.json")})
    for data in ("shapes", "photos"):
        mine = [s for s in students if s.endswith("-" + data)]
        if not mine:
            continue
        seeds_num = set()
        per = {}
        for s in mine:
            per[s] = [json.loads(f.read_text()) for f in sorted((RES / "students").glob(f"{s}-seed*.json"))]
            seeds_num |= {(r["num"], r["seed"]) for r in per[s]}
        for setting, label in GAP:  # the references, for exactly the students' (num, seed) pairs
            recs = [r for r in (gap_record(data, setting, n, k) for n, k in sorted(seeds_num)) if r]
            if recs:
                lines.append(row(f"{label} (g={recs[0]['guidance']:g})", recs, data))
        for s in mine:
            lines.append(row(f"**models/{s}**", per[s], data))
    lines.append("\n`twostep eval --model <model> --data <data> --num 1000 --seed <s>` vs held-out data, seeds 0 1 2, "
                 "mean ± std over seeds; FD/KID in each benchmark's own feature net; SWD ×1e3; sec_per_image is "
                 "eval's wall time per image (batches of 250, 2 CPU cores, shared with other jobs: see `twostep speed` "
                 "below for timing). The ratios divide by the teacher-gap records of the same seed.")
    speed = sorted((RES / "students").glob("*-speed.json"))
    if speed:
        lines += ["", "| `twostep speed` (teacher and student interleaved in one process) | batch | teacher NFE | "
                  "teacher img/s | student NFE | student img/s | time ratio | NFE ratio | "
                  "time ratio ÷ NFE ratio (target ≤ 1.1) |", "|---|---|---|---|---|---|---|---|---|"]
        for f in speed:
            r = json.loads(f.read_text())
            t, s_ = r["teacher"], r["student"]
            lines.append(f"| `{r.get('cmd', f.stem)}` | {r['batch']} | {t['nfe']} | {t['images_per_sec']:.1f} | "
                         f"{s_['nfe']} | {s_['images_per_sec']:.1f} | {r['time_ratio_student_over_teacher']:.4f} | "
                         f"{r['nfe_ratio_student_over_teacher']:.4f} | {r['ratio_over_nfe_limit']:.3f} |")
    (RES / "students.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
