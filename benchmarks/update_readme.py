"""Copy the benchmark-produced markdown tables into docs/benchmarks.md between <!-- BEGIN name --> / <!-- END name -->
markers, so the numbers there are never typed by hand.   .venv/bin/python benchmarks/update_readme.py"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = "docs/benchmarks.md"          # the file with the markers
LINK = "../benchmarks/results"      # benchmarks/results/ as a link from DOC
TABLES = {"teacher_gap": "benchmarks/results/teacher_gap.md", "demo": "benchmarks/results/demo.md",
          "teacher_guidance": "benchmarks/results/teacher_guidance.md", "runs": "benchmarks/results/runs.md",
          "memory": "benchmarks/results/memory_summary.md", "students": "benchmarks/results/students.md",
          # issue 18: benchmarks/run.py --eval-at ... --out benchmarks/results/budget_curves (docs/decoupling_rule.md)
          "budget_curves": "benchmarks/results/budget_curves/budget_curves.md",
          # issue 25: benchmarks/default_rule.py, benchmarks/decay_diagnosis.py
          "screen": "benchmarks/results/budget_curves/screen.md",
          "decay_diagnosis": "benchmarks/results/budget_curves/decay_diagnosis.md"}


def teacher_guidance_table():
    """From models/teacher-*/config.json (written by `twostep teacher train` and `teacher tune-guidance`)."""
    import json
    lines = ["| teacher | params | updates | train minutes | batch | FD by CFG g (8 steps) | chosen g |",
             "|---|---|---|---|---|---|---|"]
    for d in ("shapes", "photos"):
        f = ROOT / "models" / f"teacher-{d}" / "config.json"
        if not f.exists():
            continue
        c = json.loads(f.read_text())
        tr, gt = c.get("training", {}), c.get("guidance_tuned") or {}
        fds = ", ".join(f"{g}: {v:.3g}" for g, v in gt.get("fd_by_guidance", {}).items()) or "not tuned"
        lines.append(f"| teacher-{d} | {c.get('num_parameters', '—')} | {tr.get('steps')} | {tr.get('minutes')} | "
                     f"{tr.get('batch_size')} | {fds} | {c['sampling']['guidance']:g} |")
    note = ("\nFD in the benchmark's feature net, {num} samples, eval seed {seed} (not the reported seed 0), "
            "reference = held-out data.\n")
    any_gt = next((json.loads((ROOT / "models" / f"teacher-{d}" / "config.json").read_text()).get("guidance_tuned")
                   for d in ("shapes", "photos") if (ROOT / "models" / f"teacher-{d}" / "config.json").exists()), None)
    out = "\n".join(lines) + (note.format(**any_gt) if any_gt else "\n")
    (ROOT / "benchmarks" / "results" / "teacher_guidance.md").write_text(out)


def demo_table():
    """From out/demo (written by `make demo`): copy the report into benchmarks/results/demo/ and tabulate."""
    import json
    import shutil
    src = ROOT / "out" / "demo"
    if not (src / "metrics.json").exists():
        return
    dst = ROOT / "benchmarks" / "results" / "demo"
    dst.mkdir(parents=True, exist_ok=True)
    for f in list(src.glob("grid_*.png")) + [src / "report.html", src / "metrics.json", src / "loss_curves.png",
                                             src / "critic_accuracy.png"]:
        if f.exists():
            shutil.copy(f, dst / f.name)
    m = json.loads((src / "metrics.json").read_text())
    cols = ["model", "nfe", "fd", "kid", "swd", "alignment", "psnr_vs_teacher", "diversity", "sec_per_image"]
    fmt = lambda v: "—" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in m["rows"]]
    t = m["timings_s"]
    lines.append(f"\n`make demo` on this 2-core machine: {m['wall_minutes']:.1f} min wall (cache {t['cache_s']:.0f} s, "
                 f"distill {t['distill_s']:.0f} s, eval {t['eval_s']:.0f} s); {m['eval_num']} eval images, seed "
                 f"{m['seed']}, reference = held-out {m['data']} data. Student FD ÷ naive 2-step FD = "
                 f"{m['student_fd_over_naive_fd']:.3f}; ÷ teacher 8-step FD = {m['student_fd_over_teacher_fd']:.3f}. "
                 "Report: benchmarks/results/demo/report.html.\n")
    if m.get("critic"):  # the demo's one line on the critic (twostep.report.critic_line)
        from twostep.report import critic_line
        lines.append(critic_line(m["critic"]) + "\n")
    (ROOT / "benchmarks" / "results" / "demo.md").write_text("\n".join(lines))


def memory_table():
    """From benchmarks/results/memory.json (written by benchmarks/memory.py): peak RSS, full vs lora."""
    import json
    f = ROOT / "benchmarks" / "results" / "memory.json"
    if not f.exists():
        return
    recs = {(r["decoupling"], bool(r["checkpointing"])): r for r in json.loads(f.read_text())}
    lines = ["| checkpointing | full peak MB | lora peak MB | lora ÷ full (target ≤ 0.6) | full s/update | lora s/update |",
             "|---|---|---|---|---|---|"]
    for ck in (False, True):
        a, b = recs.get(("full", ck)), recs.get(("lora", ck))
        if a and b:
            lines.append(f"| {'on' if ck else 'off'} | {a['peak_mb']:.0f} | {b['peak_mb']:.0f} | "
                         f"{b['peak_mb'] / a['peak_mb']:.2f} | {a['sec_per_update']:.1f} | {b['sec_per_update']:.1f} |")
    (ROOT / "benchmarks" / "results" / "memory_summary.md").write_text("\n".join(lines) + "\n")


def runs_links() -> str:
    """Links to what the comparison sweep's summary step wrote next to runs.md (only those that exist)."""
    res = ROOT / "benchmarks" / "results"
    lines = []
    if (res / "comparison.html").exists():
        lines.append("Sample grids side by side (same prompts and noise for every method), this table and the plots: "
                     f"[benchmarks/results/comparison.html]({LINK}/comparison.html).")
    benches = sorted({f.stem.split("_", 3)[-1] for f in res.glob("fd_vs_nfe_*.png")} |
                     {f.stem[len("ablations_"):] for f in res.glob("ablations_*.png")})
    for b in benches:
        imgs = [f"![{title}, {b}]({LINK}/{name}_{b}.png)"
                for name, title in (("fd_vs_nfe", "FD vs NFE"), ("ablations", "Turbo++ ablations"))
                if (res / f"{name}_{b}.png").exists()]
        lines.append(" ".join(imgs))
    return "\n\n".join(lines)


def curves_links() -> str:
    """The budget-curve plots (FD vs updates and vs training seconds) that run.py --eval-at wrote beside its table."""
    d = ROOT / "benchmarks" / "results" / "budget_curves"
    return " ".join(f"![budget curves, {f.stem[len('budget_curves_'):]}]({LINK}/budget_curves/{f.name})"
                    for f in sorted(d.glob("budget_curves_*.png")))


def main():
    teacher_guidance_table()
    demo_table()
    memory_table()
    doc = ROOT / DOC
    text = doc.read_text()
    for name, rel in TABLES.items():
        f = ROOT / rel
        if not f.exists():
            continue
        body = f.read_text().rstrip()
        if name == "runs" and runs_links():
            body += "\n\n" + runs_links()
        if name == "budget_curves" and curves_links():
            body += "\n\n" + curves_links()
        pat = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        text = pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    doc.write_text(text)


if __name__ == "__main__":
    main()
