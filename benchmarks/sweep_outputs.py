"""The comparison sweep's summary step (benchmarks/run.py): from the run records, the teacher-gap records and the
sample grids on disk, write runs.md (mean ± std over seeds), per benchmark fd_vs_nfe_<b>.png and
ablations_<b>.png, and comparison.html (grids side by side for the same prompts and noise, table, plots).

Everything is read from files, so it can be rerun any time (`run.py --summary-only`) and shows whatever the sweep
has finished so far: a method without records is simply absent.

Budget curves (run.py --eval-at): point records <benchmark>-<variant>-seed<k>-u<updates>.json give
budget_curves.md (curves_table, with the decoupling rule of docs/decoupling_rule.md applied: decoupling_verdict)
and budget_curves_<b>.png (plot_budget_curves).

Files in the runs folder: <benchmark>-<variant>-seed<k>.json (record) and .png (student grid);
<benchmark>-grids.json (prompts, noise seed and teacher of the benchmark's grids) with the reference grids
<benchmark>-teacher-8step.png, <benchmark>-naive-2step-nocfg.png, <benchmark>-naive-2step-cfg.png.
"""

from __future__ import annotations

import html
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twostep.io.files import atomic_write_text  # noqa: E402
from twostep.report import figure_html, html_page, table_html  # noqa: E402

KEYS = ["fd", "kid", "swd", "alignment", "psnr_vs_teacher", "diversity", "nfe", "sec_per_image",
        "train_sec_per_update", "peak_rss_mb"]
FULL = "turbopp"  # the full method, highlighted in the ablation plot
# teacher-gap settings shown as reference points / grids: setting -> label
REFERENCES = {"teacher-8step": "teacher 8-step", "naive-2step-nocfg": "naive 2-step, no CFG",
              "naive-2step-cfg": "naive 2-step, CFG"}


def slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in s).strip("_")


def run_stem(benchmark: str, variant: str, seed: int) -> str:
    return f"{slug(benchmark)}-{slug(variant)}-seed{seed}"


def grid_file(runs_dir: Path, benchmark: str, name: str) -> Path:
    """A benchmark's reference grid (name = a REFERENCES setting) or its grids.json (name = "grids")."""
    return Path(runs_dir) / f"{slug(benchmark)}-{name}.{'json' if name == 'grids' else 'png'}"


def is_ablation(method: str) -> bool:
    """Turbo++ variants: the full method, its lora form, one-change ablations and design choices."""
    return method.startswith(("turbopp", "ablate-", "choice-"))


def is_method(method: str) -> bool:
    """Distilled methods shown against the teacher in the FD-vs-NFE plot (not the one-change ablations)."""
    return not method.startswith(("ablate-", "choice-"))


# ---------------------------------------------------------------------------------------------------- records

def load_records(runs_dir: Path, budget: dict | None = None) -> list[dict]:
    """Every finished run record in runs_dir; with `budget` only those run with exactly that budget."""
    recs = []
    for f in sorted(Path(runs_dir).glob("*-seed*.json")):
        r = json.loads(f.read_text())
        if "method" in r and all(r.get(k) == v for k, v in (budget or {}).items()):
            recs.append(r)
    return recs


def load_gap(gap_dir: Path, num: int | None = None) -> dict:
    """Teacher-gap records {(benchmark, setting): [records]}, only those with `num` eval images when given (FD
    depends on the sample count: compare like with like)."""
    recs = [json.loads(f.read_text()) for f in sorted(Path(gap_dir).glob("*.json"))] if Path(gap_dir).is_dir() else []
    if num is not None:
        recs = [r for r in recs if r.get("num") == num]
    out = {}
    for r in recs:
        out.setdefault((r["benchmark"], r["setting"]), []).append(r)
    return out


def by_method(records: list[dict], benchmark: str) -> dict:
    """{method: [records]} of one benchmark, ordered by mean FD."""
    g = {}
    for r in records:
        if r["benchmark"] == benchmark:
            g.setdefault(r["method"], []).append(r)
    return dict(sorted(g.items(), key=lambda kv: statistics.mean(r["fd"] for r in kv[1])))


def mean_std(vals) -> tuple[float, float] | None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def ms(vals) -> str:
    m = mean_std(vals)
    if m is None:
        return "—"
    n = sum(v is not None for v in vals)
    return f"{m[0]:.4g} ± {m[1]:.2g}" if n > 1 else f"{m[0]:.4g}"


def benchmarks_of(records: list[dict], runs_dir: Path) -> list[str]:
    bs = {r["benchmark"] for r in records}
    bs |= {json.loads(f.read_text()).get("benchmark", f.name[:-len("-grids.json")])
           for f in Path(runs_dir).glob("*-grids.json")}
    return sorted(bs)


# ---------------------------------------------------------------------------------------------------- table

def paired_delta(rs: list[dict], ref: list[dict]) -> str:
    """FD minus the reference method's FD at the same seed, mean ± std over the seeds both have. A run's seed is
    also its eval seed (the same 1000 noises and held-out images), so this removes the eval set's share of the
    spread that the unpaired "fd" column keeps."""
    ref_fd = {r["seed"]: r["fd"] for r in ref}
    return ms([r["fd"] - ref_fd[r["seed"]] for r in rs if r["seed"] in ref_fd])


def table_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for b in sorted({r["benchmark"] for r in records}):
        groups = by_method(records, b)
        ref = groups.get(PAIRED_REF, [])
        for m, rs in groups.items():
            vals = [ms([r.get(k) for r in rs]) for k in KEYS]
            rows.append([b, m, str(len(rs)), vals[0], paired_delta(rs, ref)] + vals[1:])
    return rows


PAIRED_REF = "turbopp"
TABLE_HEADER = ["benchmark", "method", "seeds", "fd", f"fd − {PAIRED_REF} (same seeds)"] + KEYS[1:]


def table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|---|---|---|" + "---|" * (len(TABLE_HEADER) - 3)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(records)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- plots

def _save(fig, path: Path):
    plt = _pyplot()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_fd_vs_nfe(benchmark: str, records: list[dict], gap: dict, path: Path) -> bool:
    """FD vs NFE: teacher 8-step and naive 2-step (with / without CFG) from the teacher-gap records, every
    distilled method at its NFE; mean ± std over seeds. Points sharing an NFE are spread slightly apart."""
    pts = []  # (label, nfe, mean, std, marker)
    for setting, label in REFERENCES.items():
        rs = gap.get((benchmark, setting), [])
        if rs:
            m, s = mean_std([r["fd"] for r in rs])
            pts.append((f"{label} ({len(rs)} seeds)", rs[0]["nfe"], m, s, "s"))
    for meth, rs in by_method(records, benchmark).items():
        if is_method(meth):
            m, s = mean_std([r["fd"] for r in rs])
            pts.append((f"{meth} ({len(rs)} seeds)", rs[0].get("nfe", 2), m, s, "o"))
    if not pts:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    seen = {}
    for label, nfe, m, s, marker in pts:
        k = seen[nfe] = seen.get(nfe, -1) + 1
        x = nfe * 2 ** (0.06 * (k - 0.5 * (sum(p[1] == nfe for p in pts) - 1)))
        ax.errorbar([x], [m], yerr=[s], fmt=marker, capsize=3, label=label)
    ax.set_xscale("log", base=2)
    nfes = sorted({p[1] for p in pts})
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.minorticks_off()
    ax.set_xlabel("NFE per image (CFG doubles it)")
    ax.set_ylabel("FD (lower is better)")
    ax.set_title(f"{benchmark}: FD vs NFE (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)
    return True


def plot_ablations(benchmark: str, records: list[dict], gap: dict, path: Path) -> bool:
    """FD per Turbo++ variant / ablation (mean ± std over seeds), full Turbo++ highlighted; teacher 8-step and
    naive 2-step FD as reference lines."""
    rows = [(m, *mean_std([r["fd"] for r in rs]), len(rs)) for m, rs in by_method(records, benchmark).items()
            if is_ablation(m)]
    if not rows:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.35 * len(rows)))
    ys = range(len(rows))
    colors = ["tab:red" if m == FULL else "tab:gray" for m, *_ in rows]
    ax.barh(list(ys), [r[1] for r in rows], xerr=[r[2] for r in rows], color=colors, capsize=3)
    ax.set_yticks(list(ys), [f"{m} ({n})" for m, _, _, n in rows])
    for lbl in ax.get_yticklabels():
        if lbl.get_text().startswith(FULL + " ("):
            lbl.set_fontweight("bold")
    ax.invert_yaxis()
    for setting, style in (("teacher-8step", "--"), ("naive-2step-nocfg", ":")):
        rs = gap.get((benchmark, setting), [])
        if rs:
            ax.axvline(statistics.mean(r["fd"] for r in rs), color="k", ls=style, lw=1, label=REFERENCES[setting])
    ax.set_xlabel("FD (lower is better); (n) = seeds")
    ax.set_title(f"{benchmark}: Turbo++ ablations (full Turbo++ in red)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    _save(fig, path)
    return True


# ---------------------------------------------------------------------------------------------------- HTML

def grid_panels(benchmark: str, records: list[dict], runs_dir: Path, meta: dict) -> list[tuple[Path, str, list]]:
    """(png, caption, [(seed, png) of the other seeds]) in page order: teacher 8-step, naive 2-step (no CFG, CFG),
    then each method's seed-0 grid (its lowest seed with a grid when seed 0 has none). Only grids that exist."""
    out = []
    for setting, label in REFERENCES.items():
        f = grid_file(runs_dir, benchmark, setting)
        info = meta.get("grids", {}).get(setting, {})
        if f.exists():
            out.append((f, info.get("label", label) + (f", {info['nfe']} NFE" if "nfe" in info else ""), []))
    for meth, rs in by_method(records, benchmark).items():
        seeds = [(k, runs_dir / f"{run_stem(benchmark, meth, k)}.png") for k in sorted({r["seed"] for r in rs})]
        seeds = [(k, f) for k, f in seeds if f.exists()]
        if seeds:
            (k, f), others = seeds[0], seeds[1:]
            out.append((f, f"{meth}, seed {k}, {rs[0].get('nfe', 2)} NFE", others))
    return out


def _rel(f: Path, page: Path) -> str:
    return Path(os.path.relpath(f, page.parent)).as_posix()


def benchmark_section(benchmark: str, records: list[dict], runs_dir: Path, page: Path, plots: list[Path]) -> str:
    mf = grid_file(runs_dir, benchmark, "grids")
    meta = json.loads(mf.read_text()) if mf.exists() else {}
    panels = grid_panels(benchmark, records, runs_dir, meta)
    figs = "".join(figure_html(_rel(f, page), cap, "".join(
        f' <a href="{_rel(g, page)}">seed {k}</a>' for k, g in others)) for f, cap, others in panels)
    prompts = "".join(f"<li>{html.escape(c)}</li>" for c in meta.get("prompts", []))
    noise = (f"rows = the prompts below (the first {len(meta['prompts'])} test-split prompts of "
             f"<code>twostep eval --seed {meta['seed']}</code>), columns = {meta['noises_per_prompt']} noises from "
             f"the eval noise seed; the same prompts and noise in every panel" if meta.get("prompts") else
             "the same prompts and noise in every panel")
    rows = [r[1:] for r in table_rows([r for r in records if r["benchmark"] == benchmark])]
    tab = table_html(TABLE_HEADER[1:], rows) if rows else "<p>no finished runs yet</p>"
    imgs = "".join(f'<p><img src="{_rel(p, page)}" alt="{html.escape(p.stem)}"></p>' for p in plots)
    return (f"<h2>{html.escape(benchmark)}</h2>\n<h3>Samples</h3><p>{noise}.</p>"
            f'<div class="grids">{figs}</div><ol>{prompts}</ol>\n<h3>Metrics (mean ± std over seeds)</h3>{tab}\n'
            f"<h3>Plots</h3>{imgs}\n")


def write_comparison_html(page: Path, records: list[dict], runs_dir: Path, plots: dict, note: str = ""):
    body = f"<p>{html.escape(note)}</p>" + "".join(
        benchmark_section(b, records, runs_dir, page, plots.get(b, [])) for b in benchmarks_of(records, runs_dir))
    style = ".grids{white-space:nowrap;overflow-x:auto}.grids figure{white-space:normal;max-width:300px}"
    atomic_write_text(page, html_page("twostep comparison sweep", body, style))


# ---------------------------------------------------------------------------------------------------- budget curves
# run.py --eval-at: a record per (benchmark, method, seed, update) point, runs/<stem>-u<k>.json, with "eval_at".

SHARED, CURVE_REF = "ablate-shared", "turbopp"  # the decoupling rule compares these (docs/decoupling_rule.md)


def load_points(runs_dir: Path, base: dict | None = None) -> list[dict]:
    """Every budget-curve point record in runs_dir (those with "eval_at"), with the batch / cache / eval `base`."""
    return [r for r in load_records(runs_dir, base) if "eval_at" in r]


def noise_floors(gap_dir: Path, num: int | None) -> dict[str, float]:
    """{benchmark: the eval's own noise}: the std over eval seeds of one fixed model's FD, the teacher's 8-step, at
    this eval size (teacher-gap records; benchmarks/teacher_gap.py); a benchmark with < 2 such seeds has none."""
    out = {}
    for (b, setting), rs in load_gap(gap_dir, num).items():
        if setting == "teacher-8step" and len(rs) > 1:
            out[b] = statistics.stdev(r["fd"] for r in rs)
    return out


def _fd_at(points, benchmark, method, k) -> dict[int, float]:
    return {r["seed"]: r["fd"] for r in points
            if r["benchmark"] == benchmark and r["method"] == method and r["updates"] == k}


def paired(points, benchmark, method, ref, k) -> dict | None:
    """FD(method) − FD(ref) at update k over the seeds both have: {"n", "mean", "std" (n − 1), "diffs"}."""
    a, b = _fd_at(points, benchmark, method, k), _fd_at(points, benchmark, ref, k)
    d = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    if not d:
        return None
    return {"n": len(d), "mean": statistics.mean(d), "std": statistics.stdev(d) if len(d) > 1 else 0.0, "diffs": d}


def beyond_noise(p: dict | None, floor: float | None) -> str:
    """"lower" / "higher" when a paired difference's mean is beyond max(one std of the per-seed differences, the
    eval's noise floor) below / above 0, "within noise" otherwise, "too few seeds" with < 2 paired seeds or no floor
    (docs/decoupling_rule.md)."""
    if p is None or p["n"] < 2 or floor is None:
        return "too few seeds"
    noise = max(p["std"], floor)
    return "lower" if p["mean"] < -noise else "higher" if p["mean"] > noise else "within noise"


def decoupling_verdict(points: list[dict], floors: dict, at: int = 2000, benchmarks=("shapes", "photos")) -> dict:
    """The pre-registered rule (docs/decoupling_rule.md): the default becomes `shared` only if shared − full FD at
    `at` updates is below 0 beyond noise on every benchmark; otherwise `full` stays. {"default", "why",
    "benchmarks": {b: paired stats + "outcome" + "floor"}}."""
    per = {}
    for b in benchmarks:
        p = paired(points, b, SHARED, CURVE_REF, at)
        per[b] = {**(p or {"n": 0}), "floor": floors.get(b), "outcome": beyond_noise(p, floors.get(b))}
    if any(v["outcome"] == "too few seeds" for v in per.values()):
        default, why = "full", "undecided (fewer than 2 paired seeds or no noise floor on a benchmark): full stays"
    elif all(v["outcome"] == "lower" for v in per.values()):
        default, why = "shared", "shared − full < 0 beyond noise on every benchmark"
    else:
        default, why = "full", "shared is not better beyond noise on every benchmark"
    return {"default": default, "why": why, "at": at, "benchmarks": per}


def _ms_n(vals, n_row) -> str:
    cell = ms(vals)
    return cell if len(vals) in (0, n_row) else f"{cell} (n={len(vals)})"


def curves_table(points: list[dict], floors: dict, note: str = "") -> str:
    """budget_curves.md: per benchmark, FD mean ± std over seeds per method per budget with the single-stream
    training seconds at the last one; the paired Δ vs turbopp per budget (bold: beyond noise); at each budget the
    best mean and whether it is ahead of the runner-up beyond noise; the decoupling rule at the last budget."""
    budgets = sorted({r["updates"] for r in points})
    out = []
    for b in sorted({r["benchmark"] for r in points}):
        pts = [r for r in points if r["benchmark"] == b]
        methods = sorted({r["method"] for r in pts}, key=lambda m: (m != CURVE_REF, m != SHARED, m))
        out += [f"### {b}", "", "| method | seeds | " + " | ".join(f"FD @{k}" for k in budgets) +
                f" | train s @{budgets[-1]} (single-stream) |", "|---|---|" + "---|" * (len(budgets) + 1)]
        for m in methods:
            rs = [r for r in pts if r["method"] == m]
            n = len({r["seed"] for r in rs})
            cells = [_ms_n([r["fd"] for r in rs if r["updates"] == k], n) for k in budgets]
            secs = _ms_n([r["train_s_single"] for r in rs if r["updates"] == budgets[-1]], n)
            out.append(f"| {m} | {n} | " + " | ".join(cells) + f" | {secs} |")
        if any(r.get("alignment") is not None for r in pts):  # not in the rule; shown because FD alone hides it
            out += ["", "Alignment (fraction of captioned objects drawn right: shape, colour, size and cell; higher "
                    "is better; not part of the rule; mean ± std over seeds):",
                    "", "| method | " + " | ".join(f"alignment @{k}" for k in budgets) + " |",
                    "|---|" + "---|" * len(budgets)]
            for m in methods:
                rs = [r for r in pts if r["method"] == m]
                n = len({r["seed"] for r in rs})
                out.append(f"| {m} | " + " | ".join(
                    _ms_n([r["alignment"] for r in rs if r["updates"] == k and r.get("alignment") is not None], n)
                    for k in budgets) + " |")
        floor = floors.get(b)
        others = [m for m in methods if m != CURVE_REF]
        out += [] if not others else [
                "", f"FD − {CURVE_REF} at the same seed (mean ± std over seeds; **bold**: beyond noise, i.e. beyond "
                f"one std of the per-seed differences and beyond the eval's noise floor "
                f"{'—' if floor is None else f'{floor:.3g}'}):", "",
                "| method | " + " | ".join(f"Δ @{k}" for k in budgets) + " |", "|---|" + "---|" * len(budgets)]
        for m in others:
            cells = []
            for k in budgets:
                p = paired(pts, b, m, CURVE_REF, k)
                c = "—" if p is None else f"{p['mean']:+.3g} ± {p['std']:.2g}"
                cells.append(f"**{c}**" if beyond_noise(p, floor) in ("lower", "higher") else c)
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
        for k in budgets:
            means = {m: statistics.mean(v.values()) for m in methods if (v := _fd_at(pts, b, m, k))}
            if not means:
                continue
            best, *rest = sorted(means, key=means.get)
            if not rest:
                out.append(f"- {k} updates: {best} (FD {means[best]:.4g}), the only method measured.")
                continue
            verdict = beyond_noise(paired(pts, b, rest[0], best, k), floor)
            out.append(f"- {k} updates: lowest FD {best} ({means[best]:.4g}); runner-up {rest[0]} "
                       f"({means[rest[0]]:.4g}): " + ("ahead beyond noise" if verdict == "higher" else
                                                        "not beyond noise" if verdict != "too few seeds" else
                                                        "too few paired seeds to say"))
        out.append("")
    v = decoupling_verdict(points, floors, at=budgets[-1] if budgets else 2000)
    per = "; ".join(f"{b}: " + (f"{d['mean']:+.3g} ± {d['std']:.2g} over {d['n']} seeds, floor "
                                f"{'—' if d['floor'] is None else format(d['floor'], '.3g')} → {d['outcome']}"
                                if d["n"] else "no paired seeds") for b, d in v["benchmarks"].items())
    out.append(f"**Step decoupling (docs/decoupling_rule.md, {SHARED} − {CURVE_REF} at {v['at']} updates):** "
               f"{per}. Default by the rule: **{v['default']}** ({v['why']}).")
    if note:
        out += ["", note]
    return "\n".join(out) + "\n"


def plot_budget_curves(benchmark: str, points: list[dict], gap: dict, path: Path) -> bool:
    """FD vs student updates and FD vs single-stream training seconds, one line per method, mean ± std over seeds
    (error bars; in seconds too); the teacher's 8-step FD as a reference line (the naive 2-step one, far above, is
    named in the title rather than drawn, so that the curves keep the height)."""
    pts = [r for r in points if r["benchmark"] == benchmark]
    if not pts:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3), sharey=True)
    for m in sorted({r["method"] for r in pts}, key=lambda m: (m != CURVE_REF, m)):
        rows = []
        for k in sorted({r["updates"] for r in pts if r["method"] == m}):
            rs = [r for r in pts if r["method"] == m and r["updates"] == k]
            rows.append((k, *mean_std([r["fd"] for r in rs]), *mean_std([r["train_s_single"] for r in rs]), len(rs)))
        n = max(r[-1] for r in rows)
        lw = 2.2 if m == CURVE_REF else 1.2
        axes[0].errorbar([r[0] for r in rows], [r[1] for r in rows], yerr=[r[2] for r in rows], marker="o",
                         capsize=3, lw=lw, label=f"{m} ({n} seeds)")
        axes[1].errorbar([r[3] for r in rows], [r[1] for r in rows], yerr=[r[2] for r in rows],
                         xerr=[r[4] for r in rows], marker="o", capsize=3, lw=lw)
    rs = gap.get((benchmark, "teacher-8step"), [])
    if rs:
        for ax in axes:
            ax.axhline(statistics.mean(r["fd"] for r in rs), color="k", ls="--", lw=1,
                       label=REFERENCES["teacher-8step"] if ax is axes[0] else None)
    naive = gap.get((benchmark, "naive-2step-nocfg"), [])
    budgets = sorted({r["updates"] for r in pts})
    axes[0].set_xscale("log")
    axes[0].set_xticks(budgets, [str(k) for k in budgets])
    axes[0].minorticks_off()
    axes[0].set_xlabel("student updates")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("training seconds, single-stream (loop timers × CPU share)")
    axes[0].set_ylabel("FD (lower is better)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{benchmark}: FD by budget, one run per method and seed (mean ± std over seeds)" +
                 (f"; naive 2-step, no CFG: FD {statistics.mean(r['fd'] for r in naive):.3g}" if naive else ""))
    axes[0].legend(fontsize=7)
    _save(fig, path)
    return True


def summarize_curves(points: list[dict], results_dir: Path, gap_dir: Path, note: str = "",
                     eval_num: int | None = None) -> dict:
    """budget_curves.md and budget_curves_<b>.png under results_dir; {name: path} of what was written."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    written = {"budget_curves.md": results_dir / "budget_curves.md"}
    atomic_write_text(written["budget_curves.md"], curves_table(points, noise_floors(gap_dir, eval_num), note))
    gap = load_gap(gap_dir, eval_num)
    for b in sorted({r["benchmark"] for r in points}):
        name = f"budget_curves_{slug(b)}.png"
        if plot_budget_curves(b, points, gap, results_dir / name):
            written[name] = results_dir / name
    return written


# ---------------------------------------------------------------------------------------------------- entry

def summarize(records: list[dict], results_dir: Path, runs_dir: Path, gap_dir: Path, note: str = "",
              eval_num: int | None = None) -> dict:
    """Write runs.md, the plots and comparison.html under results_dir; return {name: path} of what was written."""
    results_dir, runs_dir = Path(results_dir), Path(runs_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    gap = load_gap(gap_dir, eval_num)
    written = {"runs.md": results_dir / "runs.md"}
    atomic_write_text(written["runs.md"], table(records) + (f"\n\n{note}\n" if note else "\n"))
    plots = {}
    for b in benchmarks_of(records, runs_dir):
        for name, fn in ((f"fd_vs_nfe_{slug(b)}.png", plot_fd_vs_nfe), (f"ablations_{slug(b)}.png", plot_ablations)):
            if fn(b, records, gap, results_dir / name):
                plots.setdefault(b, []).append(results_dir / name)
                written[name] = results_dir / name
    written["comparison.html"] = results_dir / "comparison.html"
    write_comparison_html(written["comparison.html"], records, runs_dir, plots, note)
    return written
