"""train.keep_best: the EMA student with the lowest quick FD (train.eval_every) kept in RUN/best/.

A GAN-distilled student can peak early and then drift (benchmarks/results/budget_curves: the default Turbo++ on
both benchmarks). With a quick FD every eval_every updates, the run keeps the best EMA so far as a complete student
folder RUN/best/ (config.json records {"best": {"update", "eval_fd"}}); `export`, `sample` and `eval` of the run
folder take it unless given `--weights last` (twostep.sampling.resolve_student). A lora student's frozen base is
hard-linked from the run folder, never copied. Under FSDP every rank takes part in gathering the EMA, rank 0
writes. The best so far is read back from disk, so it survives --resume.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io.checkpoints import link_file
from ..sampling import save_student
from ..student import TwoStepStudent
from .distributed import full_state

BEST = "best"


def best_record(out: Path) -> dict | None:
    """RUN/best/config.json's {"update", "eval_fd"}, or None when the run has kept no best student yet."""
    try:
        rec = json.loads((Path(out) / BEST / "config.json").read_text()).get("best")
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(rec, dict) and isinstance(rec.get("update"), int) and isinstance(rec.get("eval_fd"), (int, float))
    return rec if ok else None


def keep_best(acc, out: Path, ema, update: int, eval_fd: float, scfg: dict, fsdp: bool = False) -> bool:
    """After a quick FD at `update` (the same figure on every rank, viz.quick_eval): write the EMA to RUN/best/
    when it beats the best so far (strictly lower FD). Returns whether it did (the same on every rank)."""
    prev = best_record(out)
    if prev is not None and not eval_fd < prev["eval_fd"]:
        return False
    main = acc is None or acc.is_main_process
    state = full_state(ema, main) if fsdp else ema.state_dict()  # every FSDP rank gathers
    if main:
        folder = Path(out) / BEST
        folder.mkdir(parents=True, exist_ok=True)
        frozen = TwoStepStudent.FROZEN_STEMS[ema.decoupling] if scfg.get("base_sha256") else ()
        for stem in frozen:  # the run folder's base (written once per run): linked, not a second copy
            src = Path(out) / f"{stem}.safetensors"
            if src.is_file() and not (folder / src.name).exists():
                link_file(src, folder / src.name)
        save_student(ema, {**scfg, "updates": update, "best": {"update": update, "eval_fd": float(eval_fd)}},
                     folder, state=state)
        for stem in frozen:  # a best kept before the run's first checkpoint: the run folder links its base
            if not (Path(out) / f"{stem}.safetensors").exists():
                link_file(folder / f"{stem}.safetensors", Path(out) / f"{stem}.safetensors")
    if acc is not None:
        acc.wait_for_everyone()
    return True
