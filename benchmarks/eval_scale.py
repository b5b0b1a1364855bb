"""Peak memory of the streamed `twostep eval` against the number of images (issue 16 §4: "never holds all images").

A random tiny Z-Image teacher at 128×128 pixels (1 block, like the test teachers) is evaluated at 2 steps against its
own 8-step samples (`--ref teacher`: the teacher reference is generated and stored too) for N and 4·N prompts of a
40,000-line prompt file (its held-out split), FD in the shapes feature net, each in a fresh process (peak RSS =
ru_maxrss). SWD_MAX_BYTES is lowered to 8 MiB so both sets count as "large" (at real
sizes, 1000 images of 512² or more already are): they are embedded batch by batch and never held. The script prints
and writes benchmarks/results/eval_scale.json: peak RSS per N, the bytes all generated images of a set would take
in float32, and the ratio of the two peaks (target: close to 1 while the image bytes grow 4×).

    python benchmarks/eval_scale.py [--num 100] [--batch-size 25]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "eval_scale.json"
RES = 128

CHILD = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
from twostep import evaluate as E
from twostep.sampling import load_generator
E.SWD_MAX_BYTES = 8 << 20
teacher, num, bs, work, prompts, feats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]
gen = load_generator(teacher, steps=2, guidance=0.0)
r = E.evaluate(gen, None, num=num, seed=0, ref="teacher", prompts=prompts, extractor=feats, work=work, batch_size=bs,
               device="cpu", progress=False)
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "fd": r["fd"],
                  "psnr_vs_teacher": r["psnr_vs_teacher"], "swd": r["swd"]}))
"""


def make_teacher(folder: Path) -> Path:
    from twostep import flow
    from twostep.backbones.zimage import ZImageBackbone, tiny_zimage_config
    from twostep.data.shapes import VERSION
    from twostep.io.folders import save_model_folder

    tcfg = tiny_zimage_config(dim=32, n_layers=1, n_heads=1, n_refiner_layers=1, patch_size=4)
    bb = ZImageBackbone.from_config(tcfg, seed=0)
    cfg = {"kind": "teacher", "backbone": "zimage", "transformer": tcfg, "resolution": RES,
           "text_encoder": "all-MiniLM-L6-v2", "data": "shapes", "data_version": VERSION,
           "sampling": {"steps": 8, "shift": flow.DEFAULT_SHIFT, "guidance": 0.0}}
    save_model_folder(bb.transformer.state_dict(), cfg, folder)
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=25)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="twostep-eval-scale-") as tmp:
        teacher = make_teacher(Path(tmp) / "teacher")
        prompts = Path(tmp) / "prompts.txt"
        colours, shapes = ["red", "green", "blue", "yellow", "white"], ["circle", "square", "triangle", "cross"]
        prompts.write_text("".join(f"a {colours[i % 5]} {shapes[i // 5 % 4]} number {i}\n" for i in range(40_000)))
        rows = []
        for n in (a.num, 4 * a.num):
            out = subprocess.run([sys.executable, "-c", CHILD, str(teacher), str(n), str(a.batch_size),
                                  str(Path(tmp) / f"work-{n}"), str(prompts),
                                  str(ROOT / "models" / "features-shapes")], check=True, capture_output=True, text=True,
                                 env={**__import__("os").environ, "TWOSTEP_CACHE": str(Path(tmp) / "cache")})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update({"num": n, "images_bytes_mib": n * 3 * RES * RES * 4 / 2 ** 20})
            rows.append(r)
            print(json.dumps(r), flush=True)
    res = {"what": "peak RSS of `twostep eval` (streamed, --ref teacher) vs the number of images", "resolution": RES,
           "batch_size": a.batch_size, "rows": rows,
           "peak_ratio_4x_images": rows[1]["peak_rss_mib"] / rows[0]["peak_rss_mib"],
           "cmd": f"python benchmarks/eval_scale.py --num {a.num} --batch-size {a.batch_size}"}
    RESULT.write_text(json.dumps(res, indent=1) + "\n")
    print(f"peak RSS {rows[0]['peak_rss_mib']:.0f} MiB at N={rows[0]['num']}, {rows[1]['peak_rss_mib']:.0f} MiB at "
          f"N={rows[1]['num']} (x{res['peak_ratio_4x_images']:.3f}) while the images grow "
          f"{rows[0]['images_bytes_mib']:.0f} -> {rows[1]['images_bytes_mib']:.0f} MiB per set -> {RESULT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
