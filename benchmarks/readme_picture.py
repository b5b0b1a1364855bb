"""The README's picture: teacher 8-step | naive 2-step | student 2-step, the same prompts and noise, both benchmarks.

    .venv/bin/python benchmarks/readme_picture.py     # writes benchmarks/results/readme_picture.png

Each panel is one `twostep sample --eval-prompts DATA` grid (run here in-process through the CLI's own `main`, with
the arguments printed): rows are the first test-split captions `twostep eval` scores, columns the eval protocol's
noises, the same for the three models. Models: the committed teacher at its default 8 steps and CFG
(models/teacher-DATA), the same teacher at 2 steps without CFG (the naive 2-step baseline, 2 NFE) and the
committed Turbo++ student (models/turbopp-DATA, 2 NFE). The panels are then laid side by side with their titles.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "readme_picture.png"
ROWS, NOISES, SCALE = 3, 3, 3
PANELS = (("teacher, 8 steps", ["--model", "models/teacher-{d}"]),
          ("naive, 2 steps", ["--model", "models/teacher-{d}", "--steps", "2", "--guidance", "0"]),
          ("Turbo++ student, 2 steps", ["--model", "models/turbopp-{d}"]))


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from twostep.cli import main as twostep

    font = ImageFont.load_default(size=16)
    gap, head, side = 12, 26, 70
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for d in ("photos", "shapes"):
            panels = []
            for i, (title, args) in enumerate(PANELS):
                out = Path(tmp) / f"{d}-{i}.png"
                argv = ["--threads", "2", "sample", *[a.format(d=d) for a in args], "--eval-prompts", d, "--rows",
                        str(ROWS), "--num", str(NOISES), "--scale", str(SCALE), "--out", str(out)]
                print("twostep " + shlex.join(argv), flush=True)
                if twostep(argv) != 0:
                    raise SystemExit(f"twostep {shlex.join(argv)} failed")
                panels.append((title, Image.open(out).convert("RGB")))
            rows.append((d, panels))
        pw, ph = panels[0][1].size
        canvas = Image.new("RGB", (side + 3 * pw + 2 * gap, len(rows) * (head + ph + gap)), "white")
        draw = ImageDraw.Draw(canvas)
        for r, (d, panels) in enumerate(rows):
            y = r * (head + ph + gap)
            draw.text((4, y + head + ph // 2 - 8), d, fill="black", font=font)
            for i, (title, im) in enumerate(panels):
                x = side + i * (pw + gap)
                draw.text((x, y + 4), title, fill="black", font=font)
                canvas.paste(im, (x, y + head))
        canvas.save(OUT)
    print(f"written {OUT.relative_to(ROOT)} ({canvas.size[0]}x{canvas.size[1]})")


if __name__ == "__main__":
    main()
