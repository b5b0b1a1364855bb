"""The committed students against their teacher and the naive 2-step sampler, from the eval records:
benchmarks/results/students/<student>-seed<s>.json (written by benchmarks/turbopp_shapes.sh) and the teacher-gap
records of the same seeds (benchmarks/teacher_gap.py). Writes benchmarks/results/students.md.

    .venv/bin/python benchmarks/students_table.py
"""

import json
import statistics as st
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "benchmarks" / "results"
KEYS = ("fd", "kid", "swd", "alignment", "psnr_vs_teacher", "diversity", "nfe", "sec_per_image")


def ms(v):
    v = [x for x in v if x is not None]
    if not v:
        return "—"
    return f"{st.mean(v):.4g} ± {st.stdev(v):.2g}" if len(v) > 1 else f"{v[0]:.4g}"


def main():
    lines = ["| model | seeds | " + " | ".join(KEYS) + " | FD ÷ teacher 8-step | FD ÷ naive 2-step |",
             "|---|---|" + "---|" * (len(KEYS) + 2)]
    for student in sorted({f.stem.rsplit("-seed", 1)[0] for f in (RES / "students").glob("*-seed*.json")}):
        data = student.split("-")[-1]
        recs, rt, rn = [], [], []
        for f in sorted((RES / "students").glob(f"{student}-seed*.json")):
            r = json.loads(f.read_text())
            t = RES / "teacher_gap" / f"{data}-teacher-8step-n{r['num']}-seed{r['seed']}.json"
            n = RES / "teacher_gap" / f"{data}-naive-2step-nocfg-n{r['num']}-seed{r['seed']}.json"
            if t.exists() and n.exists():
                rt.append(r["fd"] / json.loads(t.read_text())["fd"])
                rn.append(r["fd"] / json.loads(n.read_text())["fd"])
            recs.append(r)
        lines.append(f"| models/{student} | {len(recs)} | " + " | ".join(ms([r.get(k) for r in recs]) for k in KEYS)
                     + f" | {ms(rt)} | {ms(rn)} |")
    lines.append("\n`twostep eval --model models/<student> --data <data> --num 1000 --seed <s>` vs held-out data; the "
                 "ratios divide by the teacher-gap records of the same seed (benchmarks/results/teacher_gap/); "
                 "mean ± std over seeds.")
    (RES / "students.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
