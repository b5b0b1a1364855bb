"""HTML report: sample grids side by side (same prompts and noise), the metric table, loss curves."""

from __future__ import annotations

import html
from pathlib import Path

import torch

from .config import COUNT, SEED, UPSCALE
from .data import get_dataset
from .evaluate import NOISE_OFFSET, TABLE_COLUMNS, format_cell, format_table
from .images import grid, save_png
from .io.files import atomic_write_text
from .io.folders import check_output_path


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
                  per_prompt: int = GRID_NOISES, scale: int = 2) -> list[str]:
    """A grid for the eval protocol's fixed prompts and noise, identical for every generator of a benchmark:
    rows = the first `prompts` test-split captions `twostep eval --seed seed` draws, columns = `per_prompt` noises
    drawn with the eval noise seed (column 0 is exactly the noise eval gives those prompts, so it shows the first
    images eval scores). Returns the captions."""
    _check_grid(seed, per_prompt, scale, prompts=prompts)
    check_output_path(path, "--out")  # before the work
    caps = get_dataset(data, gen.image_resolution).sample(prompts, seed=seed, split="test").captions
    noise = gen.noise(prompts * per_prompt, NOISE_OFFSET + seed)  # noise[j * prompts + i]: prompt i, column j
    order = [j * prompts + i for i in range(prompts) for j in range(per_prompt)]
    text = gen.encode([c for c in caps for _ in range(per_prompt)])
    with torch.no_grad():
        x = gen.decode(gen.generate(text, noise[order]).x0)
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


def prompt_grid(gen, prompts: list[str], path: Path, seed: int = 0, per_prompt: int = 8, scale: int = 4) -> int:
    """`twostep sample --prompt ...`: one row per prompt, `per_prompt` images each (row j: noise seeded by
    seed + PROMPT_SEED_STRIDE·j). Returns the number of images."""
    _check_grid(seed, per_prompt, scale)
    check_output_path(path, "--out")  # before the work
    rows = []
    for j, pr in enumerate(prompts):
        text = gen.encode([pr] * per_prompt)
        noise = gen.noise(per_prompt, seed + PROMPT_SEED_STRIDE * j)
        rows.append(gen.decode(gen.generate(text, noise).x0))
    x = torch.cat(rows)
    save_png(grid(x, nrow=per_prompt, scale=scale), path)
    return len(x)


# Every page sets body[data-images] / body[data-images-ok] once loaded: the images-load check (tests/test_report.py).
STYLE = """body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}
img{image-rendering:pixelated}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;
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
            f"<h2>Metrics</h2>{table}<pre>{html.escape(format_table(rows))}</pre>{extras}")
    atomic_write_text(Path(path), html_page(title, body))
