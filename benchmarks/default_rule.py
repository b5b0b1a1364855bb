"""Apply the screen of docs/default_rule.md to the budget-curve records, as written there (before the runs).

    python benchmarks/default_rule.py            # prints the table and writes benchmarks/results/budget_curves/screen.md

Screen (1 seed, seed 0, 2000 updates): a lead passes on shapes if its FD at 2000 is below the default's (turbopp) by
more than τ (0.557) or its alignment at 2000 is above the default's by more than 0.02, and its FD at 2000 is not above
its own FD at 300 by more than τ. On photos (τ = 0.144) it must not be worse than the default at 2000 by more than τ,
and the same no-decay condition holds. A lead not yet run (or not yet at 2000) is "pending".

Revision 2 (docs/default_rule.md, written before its runs) judges photos against the teacher instead: at 2000 updates
a lead's fd_teacher (`run.py --ref both`) is not above the default's (`turbopp-rerun`, the default evaluated with
--ref both) by more than τ, its FD against the data is not above the teacher's 8-step FD by more than τ, and its
fd_teacher at 2000 is not above its own at 300 by more than τ. Both screens are printed.

Revision 3 admits SECOND (the strongest lead, kept out by the combination clause) as a second candidate, decided and
confirmed like revision 2's; if both are confirmed, the lower mean shapes FD at 2000 over seeds 0–4 wins (`chosen`).

Revision 4 (proposed) judges SECOND on photos at fresh seeds 5–7 with the FD clause paired by eval seed: FD against
the data at most the teacher's FD at that same eval seed (benchmarks/results/teacher_fd_eval_seeds/) + τ.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import decay_diagnosis  # benchmarks/, beside this file: the teacher's FD from teacher_gap

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "results" / "budget_curves" / "runs"
OUT = RUNS.parent / "screen.md"
TAU = {"shapes": 0.557, "photos": 0.144}   # the eval's noise floor at 1000 images (docs/decoupling_rule.md)
ALIGN = 0.02
BUDGETS = (300, 1000, 2000)
DEFAULT = "turbopp"
RERUN = "turbopp-rerun"   # the default evaluated with --ref both (revision 2's fd_teacher baseline)
PEERS = ("dmd2",)
# a combination counts only when each of its parts passed both screens of the same rule (docs/default_rule.md)
COMBINATIONS = {"lead-mismatch-sigma-0": ("lead-mismatch", "lead-disc-sigma-0"),
                "lead-lr-half-life-paired-perceptual": ("lead-lr-half-life-1000", "lead-paired-perceptual")}
SECOND = "lead-lr-half-life-paired-perceptual"   # revision 3's second candidate
LEADS = ("choice-paired", "choice-step1-traj", "lead-step1-consistency", "lead-mismatch", "lead-disc-sigma-0",
         "lead-ema-0.999", "lead-lr-half-life-1000", "lead-paired-perceptual", "lead-mismatch-sigma-0", "lead-lr-half-life-paired-perceptual")


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


def teacher_fd(data: str) -> float | None:
    """The teacher's 8-step FD against the data at 1000 images, mean over benchmarks/results/teacher_gap's seeds."""
    return decay_diagnosis.teacher(data)["fd"]


def screen_teacher(method: str) -> tuple[str, str]:
    """(verdict, reason) of `method` by revision 2's photos screen (fd_teacher against the default's)."""
    base, mine, early = record("photos", RERUN, 2000), record("photos", method, 2000), record("photos", method, 300)
    ft = [r and r.get("fd_teacher") for r in (base, mine, early)]
    if None in ft:
        return "pending", "no fd_teacher at 300 and 2000 for it and the default (run.py --ref both)"
    tau, tfd = TAU["photos"], teacher_fd("photos")
    d, decay, over = ft[1] - ft[0], ft[1] - ft[2], mine["fd"] - tfd
    ok = d <= tau and over <= tau and decay <= tau
    why = (f"Δ fd_teacher {d:+.3f} {'≤' if d <= tau else '>'} τ; FD − teacher's {tfd:.2f}: {over:+.2f} "
           f"{'≤' if over <= tau else '>'} τ; fd_teacher 300→2000 {decay:+.2f} {'≤' if decay <= tau else '>'} τ")
    return ("passes" if ok else "fails"), why


def fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def table(data: str) -> list[str]:
    align, photos = data == "shapes", data == "photos"
    head = ["variant"] + [f"FD @{u}" for u in BUDGETS] + (["alignment @300 / @2000"] if align else []) + \
           (["fd_teacher @300 / @1000 / @2000"] if photos else []) + ["train s @2000", "screen"] + \
           (["revised screen (fd_teacher)"] if photos else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in (DEFAULT, RERUN, *LEADS, *PEERS):
        recs = [record(data, m, u) for u in BUDGETS]
        if not any(recs):
            continue
        row = [m] + [fmt(r and r["fd"]) for r in recs]
        if align:
            row.append(f"{fmt(recs[0] and recs[0]['alignment'], 3)} / {fmt(recs[2] and recs[2]['alignment'], 3)}")
        if photos:
            row.append(" / ".join(fmt(r and r.get("fd_teacher")) for r in recs))
        row.append(fmt(recs[2] and recs[2].get("train_s_single"), 0))
        if m in LEADS:
            v, why = screen(data, m)
            row.append(f"{v} ({why})")
        else:
            row.append("default" if m in (DEFAULT, RERUN) else "peer")
        if photos:
            row.append("{} ({})".format(*screen_teacher(m)) if m in LEADS else "")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def paired(data: str, method: str, base: str, key: str, seeds) -> list[float]:
    """d_s = key(method) − key(base) at 2000 updates, for each seed where both have it."""
    out = []
    for s in seeds:
        a, b = record(data, method, 2000, s), record(data, base, 2000, s)
        if a and b and a.get(key) is not None and b.get(key) is not None:
            out.append(a[key] - b[key])
    return out


def decide(method: str, seeds=(0, 1), revised: bool = False) -> tuple[str, list[str]]:
    """The rule's decision for a candidate at `seeds` (docs/default_rule.md, "Decision"): shapes m < −noise on FD;
    photos m < noise on FD (the first rule) or on fd_teacher against the default rerun with FD not above the
    teacher's by more than τ at each seed (revision 2). noise = max(sd, τ). (verdict, one line per benchmark): "not
    met" as soon as one benchmark with all its seeds is not met, "pending" while a benchmark lacks a seed."""
    lines, ok, pending = [], True, False
    jobs = [("shapes", DEFAULT, "fd", -1)] + [("photos", RERUN, "fd_teacher", 1) if revised else ("photos", DEFAULT, "fd", 1)]
    for data, base, key, sign in jobs:
        d = paired(data, method, base, key, seeds)
        if len(d) < len(seeds):
            pending = True
            lines.append(f"{data}: {len(d)} of {len(seeds)} seeds at 2000 updates")
            continue
        m = statistics.mean(d)
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        noise = max(sd, TAU[data])
        good = m_ok = m < -noise if sign < 0 else m < noise
        extra = ""
        if revised and data == "photos":
            tfd = teacher_fd("photos")
            fds = [record("photos", method, 2000, s)["fd"] for s in seeds]
            under = all(f - tfd <= TAU["photos"] for f in fds)
            good = good and under
            extra = f"; FD {', '.join(f'{f:.2f}' for f in fds)} vs the teacher's {tfd:.2f}: {'within' if under else 'above'} τ"
        ok = ok and good
        lines.append(f"{data}: d({key}) = {', '.join(f'{x:+.2f}' for x in d)}; m = {m:+.3f} ± {sd:.3f} (n {len(d)}), "
                     f"noise {noise:.3f}: {'m < −noise' if sign < 0 and m_ok else 'm < noise' if m_ok else 'not met'}{extra}"
                     + ("" if good or not m_ok else ": not met"))
    return ("not met" if not ok else "pending" if pending else "met"), lines   # one benchmark not met decides


def passed(revised: bool = False) -> list[str]:
    """The leads that passed the shapes screen and the rule's photos screen (the first, or revision 2's)."""
    photo = screen_teacher if revised else (lambda m: screen("photos", m))
    return [m for m in LEADS if screen("shapes", m)[0] == "passes" and photo(m)[0] == "passes"]


def candidate(revised: bool = False) -> str | None:
    """The lead with the lowest shapes FD at 2000 (seed 0) among those that passed both screens; a combination
    only where each of its parts passed both too."""
    ok = passed(revised)
    ok = [m for m in ok if all(part in ok for part in COMBINATIONS.get(m, ()))]
    return min(ok, key=lambda m: record("shapes", m, 2000)["fd"]) if ok else None


def verdicts(method: str) -> tuple[str, str]:
    """(decision at seeds 0–1, confirmation at seeds 2–4) of a candidate by revision 2's decision."""
    return decide(method, (0, 1), True)[0], decide(method, (2, 3, 4), True)[0]


TEACHER_AT_SEED = ROOT / "benchmarks" / "results" / "teacher_fd_eval_seeds"   # revision 4's reference
R4_SEEDS = (5, 6, 7)


def teacher_fd_at(seed: int) -> float | None:
    """The photos teacher's 8-step FD at one eval seed (`twostep eval --seed S`, 1000 images), when measured."""
    p = TEACHER_AT_SEED / f"photos-teacher-8step-seed{seed}.json"
    return json.loads(p.read_text())["fd"] if p.exists() else None


def decide_r4(method: str = SECOND, seeds=R4_SEEDS) -> tuple[str, list[str]]:
    """Revision 4 (proposed): photos only, at fresh seeds; d(fd_teacher) against the default rerun with m < noise,
    and at each seed FD against the data ≤ the teacher's FD at that same eval seed + τ."""
    d = paired("photos", method, RERUN, "fd_teacher", seeds)
    done = [s for s in seeds if record("photos", method, 2000, s) and record("photos", RERUN, 2000, s)
            and teacher_fd_at(s) is not None]
    if len(d) < len(seeds) or len(done) < len(seeds):
        return "pending", [f"photos: {len(done)} of {len(seeds)} seeds at 2000 updates with the teacher's FD at that seed"]
    m, sd = statistics.mean(d), statistics.stdev(d)
    noise = max(sd, TAU["photos"])
    over = [record("photos", method, 2000, s)["fd"] - teacher_fd_at(s) for s in seeds]
    ok_m, ok_fd = m < noise, all(o <= TAU["photos"] for o in over)
    return ("met" if ok_m and ok_fd else "not met"), [
        f"photos: d(fd_teacher) = {', '.join(f'{x:+.2f}' for x in d)}; m = {m:+.3f} ± {sd:.3f}, noise {noise:.3f}: "
        f"{'m < noise' if ok_m else 'not met'}; FD − the teacher's at the same seed: "
        f"{', '.join(f'{o:+.2f}' for o in over)}: {'within' if ok_fd else 'above'} τ"]


def chosen(candidates) -> str | None:
    """The new default: among the candidates met at both stages, the lowest mean shapes FD at 2000 over seeds 0–4."""
    ok = [c for c in candidates if c and verdicts(c) == ("met", "met")]
    mean_fd = lambda c: statistics.mean(record("shapes", c, 2000, s)["fd"] for s in range(5))
    return min(ok, key=mean_fd) if ok else None


def main() -> int:
    out = ["Written by `python benchmarks/default_rule.py` from `runs/*.json` (FD at 1000 eval images vs held-out "
           "data; alignment on shapes only; train s: single-stream seconds, comparable within one session).", ""]
    for data in ("shapes", "photos"):
        out += [f"#### {data} (τ = {TAU[data]})", ""] + table(data) + [""]
    for revised, name in ((False, "both screens of the first rule"), (True, "the shapes screen and revision 2's photos screen")):
        ok = passed(revised)
        names = [m + (" (a combination whose parts did not both pass: not revision 2's candidate"
                      + ("; revision 3's second candidate)" if revised and m == SECOND else ")")
                      if any(part not in ok for part in COMBINATIONS.get(m, ())) else "") for m in ok]
        out += [f"Passed {name}: " + ("; ".join(names) if names else "none yet") + ".", ""]
    for revised, name, c in ((False, "first rule", candidate(False)), (True, "revision 2", candidate(True)),
                             (True, "revision 3", SECOND)):
        if c is None:
            continue
        for seeds, stage in (((0, 1), "decision, seeds 0–1"), ((2, 3, 4), "confirmation, seeds 2–4")):
            verdict, why = decide(c, seeds, revised)
            out += [f"{name}: candidate {c}, {stage}: {verdict}", ""] + [f"- {w}" for w in why] + [""]
            if verdict == "not met":   # a pending decision still shows its confirmation so far
                break
    verdict, why = decide_r4()
    out += [f"revision 4 (proposed): candidate {SECOND}, seeds {', '.join(map(str, R4_SEEDS))}: {verdict}", ""]
    out += [f"- {w}" for w in why] + [""]
    new = chosen((candidate(True), SECOND))
    done = all("pending" not in verdicts(c) for c in (candidate(True), SECOND) if c)
    out += [f"New default (revisions 2 and 3): {new or ('none confirmed' if done else 'none confirmed yet') + '; the default stays'}.", ""]
    text = "\n".join(out) + "\n"
    OUT.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
