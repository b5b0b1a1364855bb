"""HTML report: sample grids side by side (same prompts and noise), the metric table, loss curves, the critic's
accuracy curve and whether it sat at chance."""

from __future__ import annotations

import html
from pathlib import Path

import torch

from . import plan
from .config import COUNT, SEED, UPSCALE
from .data import get_dataset
from .evaluate import NOISE_OFFSET, TABLE_COLUMNS, format_cell
from .images import grid, save_png
from .io.files import atomic_write_text
from .io.folders import PNG_IMAGE, check_output_path


def comparison_grids(gens: dict, captions: list[str], out_dir: Path, seed: int = 0, per_prompt: int = 4) -> list[dict]:
    """One PNG per generator: rows = prompts, columns = `per_prompt` noises shared by every generator."""
    out_dir = Path(out_dir)
    first = next(iter(gens.values()))
    text = first.encode([c for c in captions for _ in range(per_prompt)])
    noise = first.noise(len(text), 424242 + seed)
    items = []
    for i, (name, gen) in enumerate(gens.items()):
        with torch.no_grad():
            x = gen.decode(gen.generate(text, noise).x0)
        f = out_dir / f"grid_{i}.png"
        save_png(grid(x, nrow=per_prompt, scale=3), f)
        items.append({"name": name, "file": f.name, "nfe": gen.nfe})
    return items


GRID_PROMPTS, GRID_NOISES = 8, 4


def protocol_grid(gen, data: str, path: Path, seed: int = 0, prompts: int = GRID_PROMPTS,
                  per_prompt: int = GRID_NOISES, scale: int = 2, device="cpu") -> list[str]:
    """A grid for the eval protocol's fixed prompts and noise, identical for every generator of a benchmark:
    rows = the first `prompts` test-split captions `twostep eval --seed seed` draws, columns = `per_prompt` noises
    drawn with the eval noise seed (column 0 is exactly the noise eval gives those prompts, so it shows the first
    images eval scores). `device`: where `gen` runs (the noise is drawn on the CPU, as eval's). Returns the
    captions."""
    _check_grid(seed, per_prompt, scale, prompts=prompts)
    plan_grid(gen, prompts, per_prompt, scale)
    check_output_path(path, "--out", writes=PNG_IMAGE)  # before the work
    caps = get_dataset(data, gen.image_resolution).sample(prompts, seed=seed, split="test").captions
    noise = gen.noise(prompts * per_prompt, NOISE_OFFSET + seed)  # noise[j * prompts + i]: prompt i, column j
    order = [j * prompts + i for i in range(prompts) for j in range(per_prompt)]
    text = gen.encode([c for c in caps for _ in range(per_prompt)])
    with torch.no_grad():
        x = gen.decode(gen.generate(text, noise[order].to(device)).x0).cpu()
    save_png(grid(x, nrow=per_prompt, scale=scale), path)
    return caps


PROMPT_SEED_STRIDE = 1000  # row j of a prompt grid draws its noise with seed + 1000·j


def _check_grid(seed, per_prompt, scale, **counts) -> None:
    """The ranges of a grid's arguments (the CLI's --seed, --num, --scale, --rows), before any sampling."""
    SEED.check(seed, "seed")
    COUNT.check(per_prompt, "per_prompt")
    UPSCALE.check(scale, "scale")
    for name, v in counts.items():
        COUNT.check(v, name)


def plan_grid(gen, rows: int, per_prompt: int, scale: int) -> None:
    """Plan before work (twostep/plan.py): a grid of `rows` x `per_prompt` images is held whole (float images,
    their noise and states, the upscaled uint8 grid): refused before any sampling when it cannot fit in memory."""
    h, w = gen.image_height, gen.image_width
    plan.check("--num (--seeds-per-prompt)", per_prompt, f"a grid of {rows:,} x {per_prompt:,} images of {h}x{w} "
               f"(x{scale})", memory=rows * per_prompt * 3 * h * w * (3 * 4 + scale * scale),
               fix="lower --num / --seeds-per-prompt (or --rows, --scale)")


def prompt_grid(gen, prompts: list[str], path: Path, seed: int = 0, per_prompt: int = 8, scale: int = 4,
                device="cpu") -> int:
    """`twostep sample --prompt ...`: one row per prompt, `per_prompt` images each (row j: noise seeded by
    seed + PROMPT_SEED_STRIDE·j, drawn on the CPU); `device`: where `gen` runs. Returns the number of images."""
    _check_grid(seed, per_prompt, scale)
    plan_grid(gen, len(prompts), per_prompt, scale)
    check_output_path(path, "--out", writes=PNG_IMAGE)  # before the work
    rows = []
    for j, pr in enumerate(prompts):
        text = gen.encode([pr] * per_prompt)
        noise = gen.noise(per_prompt, seed + PROMPT_SEED_STRIDE * j)
        rows.append(gen.decode(gen.generate(text, noise.to(device)).x0).cpu())
    x = torch.cat(rows)
    save_png(grid(x, nrow=per_prompt, scale=scale), path)
    return len(x)


# Every page sets body[data-images] / body[data-images-ok] once loaded: the images-load check (tests/test_report.py).
STYLE = """body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}
img{image-rendering:pixelated;max-width:100%}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}"""
IMAGES_LOAD_CHECK = """<script>window.addEventListener("load", () => { const imgs = [...document.images];
document.body.dataset.images = imgs.length;
document.body.dataset.imagesOk = imgs.every(i => i.complete && i.naturalWidth > 0); });</script>"""


def html_page(title: str, body: str, style: str = "") -> str:
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            f"<style>{STYLE}{style}</style>\n{IMAGES_LOAD_CHECK}</head><body><h1>{html.escape(title)}</h1>\n"
            f"{body}</body></html>")


def figure_html(src: str, caption: str, extra_html: str = "") -> str:
    return (f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}{extra_html}</figcaption></figure>")


def table_html(header: list[str], rows: list[list]) -> str:
    return ("<table><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in header) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows) + "</table>")


def write_report(path: Path, title: str, grids: list[dict], captions: list[str], rows: list[dict],
                 extra_images: list[tuple[str, str]] = (), notes: str = ""):
    table = table_html(TABLE_COLUMNS, [[format_cell(r.get(c)) for c in TABLE_COLUMNS] for r in rows])
    figs = "".join(figure_html(g["file"], f'{g["name"]} ({g["nfe"]} NFE)') for g in grids)
    caps = "".join(f"<li>{html.escape(c)}</li>" for c in captions)
    extras = "".join(f'<h2>{html.escape(t)}</h2><img src="{html.escape(f)}" alt="{html.escape(t)}">'
                     for t, f in extra_images)
    body = (f"<p>{notes}</p><h2>Samples (rows = prompts below, same noise in every panel)</h2>{figs}<ol>{caps}</ol>\n"
            f"<h2>Metrics</h2>{table}{extras}")  # the table once (format_table's text copy is in the terminal)
    atomic_write_text(Path(path), html_page(title, body))


CURVE_COLS, CURVE_INCHES, CURVE_DPI = 4, 2.4, 80  # a curve figure ≤ 4 panels wide: 4 × 2.4 in × 80 dpi = 768 px


def _save_fig(fig, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")  # a viewer never sees a half-written PNG (as images.save_png)
    fig.savefig(tmp, dpi=CURVE_DPI)
    tmp.replace(path)


def log_curves(records: list[dict], keys, path: Path) -> bool:
    """A run's log.jsonl records as one panel per key of `keys` the records hold, against the update, wrapped into
    rows of at most CURVE_COLS panels so the figure fits a page. The discriminator head start's record (update 0,
    `d_warmup`) is left out: its averages are over critic-only updates. Returns whether a figure was written."""
    recs = [r for r in records if "d_warmup" not in r]
    keys = [k for k in keys if not k.startswith("d_acc") and any(k in r for r in recs)]
    if not keys:
        return False
    import matplotlib  # heavy: only when a report is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(CURVE_COLS, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(CURVE_INCHES * cols, 0.85 * CURVE_INCHES * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, k in zip(axes.flat, keys):
        ax.plot([r["update"] for r in recs if k in r], [r[k] for r in recs if k in r])
        ax.set_title(k, fontsize=9); ax.set_xlabel("update", fontsize=8); ax.tick_params(labelsize=7)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return True


def critic_summary(records: list[dict]) -> dict | None:
    """Whether the discriminator sat at chance during the student's updates: the records' `d_at_chance` (the
    training loop's flag, train/viz.py at_chance: mean of d_acc_real and d_acc_fake within 0.05 of 0.5). None when
    the log has no critic accuracies. `sat_at_chance`: at chance in at least half the records."""
    recs = [r for r in records if "d_at_chance" in r and "d_warmup" not in r]
    if not recs:
        return None
    n = sum(bool(r["d_at_chance"]) for r in recs)
    last = recs[-1]
    warm = next((r for r in records if "d_warmup" in r and "d_acc_real" in r), None)
    return {"records": len(recs), "at_chance": n, "sat_at_chance": 2 * n >= len(recs),
            "first_update": recs[0]["update"], "last_update": last["update"],
            "final_acc_real": last["d_acc_real"], "final_acc_fake": last["d_acc_fake"],
            "warmup_updates": warm["d_warmup"] if warm else 0,
            "warmup_acc": (warm["d_acc_real"], warm["d_acc_fake"]) if warm else None}


def critic_line(s: dict | None) -> str:
    """critic_summary as the report's one line."""
    if s is None:
        return "The critic reports no accuracies (no discriminator in this method)."
    verdict = ("sat at chance" if s["sat_at_chance"] else
               "did not sit at chance" if s["at_chance"] == 0 else "mostly stayed off chance")
    return (f"Critic: {verdict}: at chance (mean of real/fake accuracy within 0.05 of 0.5) in {s['at_chance']} of "
            f"{s['records']} log records, updates {s['first_update']}–{s['last_update']}; final accuracy real "
            f"{s['final_acc_real']:.2f} / fake {s['final_acc_fake']:.2f}"
            + (f"; after its {s['warmup_updates']}-update head start" if s["warmup_updates"] else "") + ".")


def critic_curve(records: list[dict], path: Path) -> bool:
    """d_acc_real / d_acc_fake of log.jsonl against the update, with chance (0.5) and the at_chance band (±0.05);
    the head start's averages (update 0) as points. Returns whether a figure was written."""
    recs = [r for r in records if "d_acc_real" in r and "d_warmup" not in r]
    if not recs:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2 * CURVE_INCHES * 1.2, CURVE_INCHES))
    xs = [r["update"] for r in recs]
    for k, c in (("d_acc_real", "C0"), ("d_acc_fake", "C1")):
        ax.plot(xs, [r[k] for r in recs], c=c, label=k)
    for r in records:
        if "d_warmup" in r and "d_acc_real" in r:
            ax.scatter([0, 0], [r["d_acc_real"], r["d_acc_fake"]], c=["C0", "C1"], marker="x",
                       label=f"head start ({r['d_warmup']} critic updates)")
    ax.axhspan(0.45, 0.55, color="gray", alpha=0.2, label="at chance (±0.05)")
    ax.axhline(0.5, ls="--", c="gray")
    ax.set_ylim(-0.02, 1.02); ax.set_xlabel("update", fontsize=8); ax.set_ylabel("accuracy", fontsize=8)
    ax.tick_params(labelsize=7); ax.legend(fontsize=7, loc="lower right")
    ax.set_title("critic accuracy", fontsize=9)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return True
