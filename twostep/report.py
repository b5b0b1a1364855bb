"""HTML report: sample grids side by side (same prompts and noise), the metric table, loss curves."""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from .ckpt import atomic_write_text
from .images import grid, save_png


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


def write_report(path: Path, title: str, grids: list[dict], captions: list[str], rows: list[dict],
                 extra_images: list[tuple[str, str]] = (), notes: str = ""):
    from .evaluate import format_table

    cols = ["model", "nfe", "fd", "kid", "swd", "alignment", "psnr_vs_teacher", "diversity", "sec_per_image"]

    def cell(v):
        if v is None:
            return "—"
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    table = "<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows) + "</table>"
    figs = "".join(f'<figure><img src="{html.escape(g["file"])}" alt="{html.escape(g["name"])}">'
                   f'<figcaption>{html.escape(g["name"])} ({g["nfe"]} NFE)</figcaption></figure>' for g in grids)
    caps = "".join(f"<li>{html.escape(c)}</li>" for c in captions)
    extras = "".join(f'<h2>{html.escape(t)}</h2><img src="{html.escape(f)}" alt="{html.escape(t)}">'
                     for t, f in extra_images)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}figure{{display:inline-block;margin:0 1em 1em 0;vertical-align:top}}
img{{image-rendering:pixelated}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;
text-align:right}}</style>
<script>window.addEventListener("load", () => {{ const imgs = [...document.images];
document.body.dataset.images = imgs.length;
document.body.dataset.imagesOk = imgs.every(i => i.complete && i.naturalWidth > 0); }});</script></head><body><h1>{html.escape(title)}</h1>
<p>{notes}</p><h2>Samples (rows = prompts below, same noise in every panel)</h2>{figs}<ol>{caps}</ol>
<h2>Metrics</h2>{table}<pre>{html.escape(format_table(rows))}</pre>{extras}</body></html>"""
    atomic_write_text(Path(path), page)
