"""Can the Turbo++ discriminator tell the teacher's 8-step samples from a blurry 2-step sample at all?

In every 100-update sweep run (benchmarks/results/runs.md) the discriminator's loss stayed at 2·ln 2 = 1.386
and its accuracy at chance, so the student's adversarial gradient carried no information. This probe trains
ONLY the discriminator heads (the frozen teacher is the feature extractor, exactly the `Discriminator` and
`critic_gan_loss` the methods use), with REAL = the teacher's cached 8-step samples and FAKE = the student at
initialisation (= the teacher's naive 2-step sample, no CFG, same noise and caption). No student moves, so a
discriminator that cannot separate these two sets cannot guide a student either.

It reports held-out accuracy ((real > 0) + (fake < 0)) / 2 per re-noising σ after each block of updates, for
several settings (learning rate, the σ distribution of the re-noising, head type, R1), and writes
benchmarks/results/disc_probe.{json,md}.

    .venv/bin/python benchmarks/disc_probe.py [--data photos] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twostep.discriminator import Discriminator, critic_gan_loss  # noqa: E402
from twostep.model import load_teacher  # noqa: E402
from twostep.sampling import NaiveSampler  # noqa: E402
from twostep.teacher.cache import build_cache, load_cache  # noqa: E402
from twostep.train import optimizer_step  # noqa: E402

SETTINGS = {  # name: (head, lr_disc, sigma_mean, r1)
    "default (grid, lr 2e-4, σ-mean 0)": ("grid", 2e-4, 0.0, 0.0),
    "grid, lr 2e-4, σ-mean −1.5": ("grid", 2e-4, -1.5, 0.0),
    "grid, lr 1e-3, σ-mean 0": ("grid", 1e-3, 0.0, 0.0),
    "grid, lr 1e-3, σ-mean −1.5": ("grid", 1e-3, -1.5, 0.0),
    "grid, lr 1e-3, σ-mean −1.5, R1 0.1": ("grid", 1e-3, -1.5, 0.1),
    "pooled, lr 1e-3, σ-mean −1.5": ("pooled", 1e-3, -1.5, 0.0),
}
EVAL_SIGMAS = (0.05, 0.25, 0.5, 0.75)


def naive_two_step(teacher, text, noise, bs=64):
    naive = NaiveSampler(teacher)  # no CFG: the student at initialisation
    return torch.cat([naive.generate(text[i:i + bs], noise[i:i + bs]).x0 for i in range(0, len(noise), bs)])


@torch.no_grad()
def held_out_accuracy(disc, real, fake, text, seed=0):
    g = torch.Generator().manual_seed(seed)
    res = {}
    for s in EVAL_SIGMAS:
        sig = torch.full((len(real),), s)
        eps = torch.randn(real.shape, generator=g)
        lr = disc(real, text, sig, eps)
        lf = disc(fake, text, sig, eps)  # same ε for both: only the images differ
        res[s] = 0.5 * ((lr > 0).float().mean().item() + (lf < 0).float().mean().item())
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="photos", choices=["shapes", "photos"])
    p.add_argument("--teacher", help="default models/teacher-<data>")
    p.add_argument("--cache", help="default benchmarks/work/cache-<data>-2048 (the sweep's cache; built if absent)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8, help="as in the sweep")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--num-train", type=int, default=512)
    p.add_argument("--num-test", type=int, default=256)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/disc_probe"))
    a = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    teacher_dir = Path(a.teacher or ROOT / f"models/teacher-{a.data}")
    cache_dir = Path(a.cache or ROOT / f"benchmarks/work/cache-{a.data}-2048")
    if not (cache_dir / "manifest.json").exists():
        build_cache(teacher_dir, a.data, 2048, cache_dir)
    cache = load_cache(cache_dir, expect_teacher=teacher_dir)
    teacher = load_teacher(teacher_dir)
    n = a.num_train + a.num_test
    real, noise, text = cache.final[:n], cache.noise[:n], cache.text[:n]
    t0 = time.time()
    fake = naive_two_step(teacher, text, noise)
    print(f"[probe] {n} naive 2-step fakes in {time.time() - t0:.0f} s; real = cached teacher 8-step samples",
          file=sys.stderr)
    tr, te = slice(0, a.num_train), slice(a.num_train, n)
    results = {"data": a.data, "teacher": str(teacher_dir.relative_to(ROOT)) if teacher_dir.is_relative_to(ROOT)
               else str(teacher_dir), "steps": a.steps, "batch": a.batch, "num_train": a.num_train,
               "num_test": a.num_test, "eval_sigmas": list(EVAL_SIGMAS),
               "command": "python benchmarks/disc_probe.py " + " ".join(argv or sys.argv[1:]), "settings": {}}
    for name, (head, lr, smean, r1) in SETTINGS.items():
        torch.manual_seed(0)
        disc = Discriminator(teacher.backbone, blocks=(1, 2, 3), head=head, hidden=64, text_cond=True,
                             sigma_mean=smean)
        params = list(disc.parameters())
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.0, 0.99), weight_decay=0.0)
        g = torch.Generator().manual_seed(1)
        curve, t1 = [], time.time()
        curve.append({"step": 0, **{str(k): v for k, v in held_out_accuracy(disc, real[te], fake[te], text[te]).items()}})
        for step in range(1, a.steps + 1):
            idx = torch.randint(0, a.num_train, (a.batch,), generator=g).tolist()
            bt = [text[i] for i in idx]
            loss, logs = critic_gan_loss(disc, real[idx], bt, fake[idx], bt, "ns", r1)
            optimizer_step(opt, params, loss, grad_clip=0.0)  # the loop's update step, unclipped
            if step % a.eval_every == 0 or step == a.steps:
                acc = held_out_accuracy(disc, real[te], fake[te], text[te])
                curve.append({"step": step, "d_loss": round(logs["d_loss"], 4),
                              **{str(k): round(v, 4) for k, v in acc.items()}})
                print(f"[probe] {name}: step {step} d_loss {logs['d_loss']:.3f} held-out acc " +
                      " ".join(f"σ={k}: {v:.3f}" for k, v in acc.items()), file=sys.stderr, flush=True)
        results["settings"][name] = {"head": head, "lr_disc": lr, "sigma_mean": smean, "r1": r1, "curve": curve,
                                     "seconds": round(time.time() - t1, 1)}
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = [f"Held-out discriminator accuracy, teacher 8-step (real) vs naive 2-step = student at init (fake), "
             f"`{a.data}`, after {a.steps} head updates at batch {a.batch} ({a.num_train} train / {a.num_test} "
             f"held-out pairs, same ε for both; 0.5 = chance). Command: `{results['command']}`.", "",
             "| setting | " + " | ".join(f"σ = {s}" for s in EVAL_SIGMAS) + " | final d_loss |",
             "|---|" + "---|" * (len(EVAL_SIGMAS) + 1)]
    for name, r in results["settings"].items():
        last = r["curve"][-1]
        lines.append(f"| {name} | " + " | ".join(f"{last[str(s)]:.3f}" for s in EVAL_SIGMAS) +
                     f" | {last.get('d_loss', float('nan')):.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
