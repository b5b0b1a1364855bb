"""Does a run's discriminator tell the teacher's samples it trained on from fresh ones of the same teacher?

For each run folder's last checkpoint: the critic's per-token accuracy and mean logit on
  train-real — the teacher's samples in the run's cache (the discriminator's REAL images),
  held-out  — the same teacher's samples for other captions and noise (a cache built at another seed),
  fake      — the checkpoint's student outputs (not the EMA: the student the critic was trained against),
each at the same σ and re-noising ε per row. A critic that generalises scores train-real and held-out alike;
one that memorised its 2048 real images calls held-out samples fake. And wrong-caption — the train reals under
another row's caption: a critic that checks image against caption calls them fake.

  python benchmarks/critic_memorization.py --runs benchmarks/results/budget_curves/work/run-shapes-turbopp-seed0 ...
  python benchmarks/critic_memorization.py --table-only   # the markdown table (--out with .md) from the JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twostep.io.checkpoints import latest_checkpoint  # noqa: E402
from twostep.methods import load_config  # noqa: E402
from twostep.teacher.cache import build_cache, load_cache  # noqa: E402
from twostep.train.batches import load_inputs  # noqa: E402
from twostep.train.distributed import load_module  # noqa: E402
from twostep.train.loop import prepare_method  # noqa: E402


SETS = ("train-real", "held-out", "wrong-caption", "fake")


def table(results: dict) -> str:
    """The JSON's fraction of tokens called real, a row per run."""
    lines = ["| run | checkpoint | " + " | ".join(SETS) + " |", "|---|---|" + "---|" * len(SETS)]
    for run, row in results.items():
        lines.append(f"| {run} | {row['checkpoint']} | " +
                     " | ".join(f"{row[k]['p_real']:.2f}" if k in row else "—" for k in SETS) + " |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def scores(critic, images, text, seed: int, batch: int = 64) -> dict:
    acc, logit = [], []
    for i in range(0, len(images), batch):
        x, t = images[i:i + batch], text[i:i + batch]
        g = torch.Generator().manual_seed(seed + i)
        sigma = getattr(critic, "discs", [critic])[0].sample_sigma(len(x), x.device, generator=g)  # multi-scale: σ of scale 1
        noise = torch.randn(x.shape, generator=g)
        z = critic(x, t, sigma=sigma, noise=noise)
        acc.append((z > 0).float().mean(1))
        logit.append(z.mean(1))
    a, z = torch.cat(acc), torch.cat(logit)
    return {"p_real": round(a.mean().item(), 4), "mean_logit": round(z.mean().item(), 3)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", type=Path, default=[])
    ap.add_argument("--num", type=int, default=512, help="images per set")
    ap.add_argument("--heldout-seed", type=int, default=1, help="seed of the held-out teacher cache")
    ap.add_argument("--work", type=Path, default=Path("benchmarks/results/budget_curves/work"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/budget_curves/critic_memorization.json"))
    ap.add_argument("--table-only", action="store_true", help="only rewrite the .md table from --out")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = json.loads(a.out.read_text()) if a.out.exists() else {}
    for run in [] if a.table_only else a.runs:
        rc = json.loads((run / "config.json").read_text())
        ck = latest_checkpoint(run / "checkpoints")
        cfg = load_config(run / "config.yaml")
        teacher_dir, cache_dir, data = Path(rc["teacher"]), Path(rc["cache"]), rc["data"]
        held_dir = build_cache(teacher_dir, data, a.num, a.work / f"cache-{data}-heldout-seed{a.heldout_seed}-{a.num}",
                               seed=a.heldout_seed, progress=False)
        teacher, cache = load_inputs(teacher_dir, cache_dir)
        held = load_cache(held_dir, expect_teacher=teacher_dir)
        method, ema = prepare_method(cfg, teacher, torch.device("cpu"))
        load_module(method.critic, ck / "critic.safetensors", False)
        load_module(method.student, ck / "student.safetensors", False, strict=False)
        method.student.eval()
        idx = torch.randperm(len(cache), generator=torch.Generator().manual_seed(0))[:a.num]
        r = cache.rows(idx, ["noise", "final"])
        text = cache.text_rows(idx)
        hidx = torch.arange(min(a.num, len(held)))
        with torch.no_grad():
            fake = method.student(r["noise"], text)["x0_2"]
        row = {"checkpoint": ck.name,
               "train-real": scores(method.critic, r["final"], text, 7),
               "held-out": scores(method.critic, held.rows(hidx, ["final"])["final"], held.text_rows(hidx), 7),
               "fake": scores(method.critic, fake, text, 7),
               # the train reals under another row's caption: a critic that reads the caption calls them fake
               "wrong-caption": scores(method.critic, r["final"], text[1:] + text[:1], 7)}
        results[run.name] = row
        print(run.name, json.dumps(row), flush=True)
        a.out.write_text(json.dumps(results, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(table(results))
    print(a.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
