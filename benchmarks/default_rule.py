"""Apply the screen of docs/default_rule.md to the budget-curve records, as written there (before the runs).

    python benchmarks/default_rule.py            # prints the table and writes benchmarks/results/budget_curves/screen.md

Screen (1 seed, seed 0, 2000 updates): a lead passes on shapes if its FD at 2000 is below the default's (turbopp) by
more than τ (0.557) or its alignment at 2000 is above the default's by more than 0.02, and its FD at 2000 is not above
its own FD at 300 by more than τ. On photos (τ = 0.144) it must not be worse than the default at 2000 by more than τ,
and the same no-decay condition holds. A lead not yet run (or not yet at 2000) is "pending".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "results" / "budget_curves" / "runs"
OUT = RUNS.parent / "screen.md"
TAU = {"shapes": 0.557, "photos": 0.144}   # the eval's noise floor at 1000 images (docs/decoupling_rule.md)
ALIGN = 0.02
BUDGETS = (300, 1000, 2000)
DEFAULT = "turbopp"
PEERS = ("dmd2",)
LEADS = ("choice-paired", "choice-step1-traj", "lead-step1-consistency", "lead-mismatch", "lead-disc-sigma-0",
         "lead-ema-0.999", "lead-lr-half-life-1000", "lead-paired-perceptual", "lead-mismatch-sigma-0")


def stem(method: str) -> str:
    return method.replace(" ", "_").replace("(", "_").replace(")", "")


def record(data: str, method: str, updates: int, seed: int = 0) -> dict | None:
    p = RUNS / f"{data}-{stem(method)}-seed{seed}-u{updates}.json"
    return json.loads(p.read_text()) if p.exists() else None


def screen(data: str, method: str) -> tuple[str, str]:
    """(verdict, reason) of `method` on `data` by the rule's screen."""
    base, mine, early = record(data, DEFAULT, 2000), record(data, method, 2000), record(data, method, 300)
    if base is None or mine is None or early is None:
        return "pending", "not at 2000 updates yet"
    tau, d = TAU[data], mine["fd"] - base["fd"]
    decay = mine["fd"] - early["fd"]
    why = [f"FD 300→2000 {decay:+.2f} {'>' if decay > tau else '≤'} τ"]
    if data == "photos":
        ok = d <= tau
        why.insert(0, f"Δ FD {d:+.3f} {'≤' if ok else '>'} τ {tau}")
    else:
        da = mine["alignment"] - base["alignment"]
        ok = d < -tau or da > ALIGN
        why.insert(0, f"Δ FD {d:+.3f}{' < −τ' if d < -tau else ''}, Δ alignment {da:+.3f}{' > ' + str(ALIGN) if da > ALIGN else ''} (τ {tau})")
    ok = ok and decay <= tau
    return ("passes" if ok else "fails"), "; ".join(why)


def fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def table(data: str) -> list[str]:
    align = data == "shapes"
    head = ["variant"] + [f"FD @{u}" for u in BUDGETS] + (["alignment @300 / @2000"] if align else []) + \
           ["train s @2000", "screen"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in (DEFAULT, *LEADS, *PEERS):
        recs = [record(data, m, u) for u in BUDGETS]
        if not any(recs):
            continue
        row = [m] + [fmt(r and r["fd"]) for r in recs]
        if align:
            row.append(f"{fmt(recs[0] and recs[0]['alignment'], 3)} / {fmt(recs[2] and recs[2]['alignment'], 3)}")
        row.append(fmt(recs[2] and recs[2].get("train_s_single"), 0))
        if m in LEADS:
            v, why = screen(data, m)
            row.append(f"{v} ({why})")
        else:
            row.append("default" if m == DEFAULT else "peer")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def main() -> int:
    out = ["Written by `python benchmarks/default_rule.py` from `runs/*.json` (FD at 1000 eval images vs held-out "
           "data; alignment on shapes only; train s: single-stream seconds, comparable within one session).", ""]
    for data in ("shapes", "photos"):
        out += [f"#### {data} (τ = {TAU[data]})", ""] + table(data) + [""]
    both = [m for m in LEADS if screen("shapes", m)[0] == "passes" and screen("photos", m)[0] == "passes"]
    out.append("Passed both screens: " + (", ".join(both) if both else "none yet") + ".")
    text = "\n".join(out) + "\n"
    OUT.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
