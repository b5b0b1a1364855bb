"""Copy the benchmark-produced markdown tables into README.md between <!-- BEGIN name --> / <!-- END name -->
markers, so the README's numbers are never typed by hand.   .venv/bin/python benchmarks/update_readme.py"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES = {"teacher_gap": "benchmarks/results/teacher_gap.md", "demo": "benchmarks/results/demo.md",
          "teacher_guidance": "benchmarks/results/teacher_guidance.md", "runs": "benchmarks/results/runs.md"}


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


def main():
    teacher_guidance_table()
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, rel in TABLES.items():
        f = ROOT / rel
        if not f.exists():
            continue
        pat = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        text = pat.sub(lambda m: m.group(1) + f.read_text().rstrip() + "\n" + m.group(2), text)
    readme.write_text(text)


if __name__ == "__main__":
    main()
