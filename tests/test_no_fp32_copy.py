"""Every loader reads straight into its target dtype: `teacher cache --dtype bf16` and `export` (bf16, the default
for a latent student) of a model saved with the 6B model's dtype conventions (transformer and text encoder bf16 on
disk, VAE fp32; a lora run's frozen base bf16, its adapters and full students' trained weights fp32) never hold an
fp32 copy of the bf16 model.

The spy: at checkpoints inside the commands (after each loader returns, before sampling, before saving) it walks
every live tensor (gc) and sums the fp32 bytes of those shaped like one of the model's weight matrices; more than a
quarter of an fp32 copy of them is a failure. It is shown to catch the old behaviour (the transformer read in fp32).
"""

import gc
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from test_export import main, make_run  # noqa: E402
from test_pipeline_teacher import build_tiny_pipeline  # noqa: E402


def _to_bf16(folder: Path, names=("transformer", "text_encoder")) -> Path:
    """Rewrite a saved pipeline's transformer and text encoder in bf16, as Z-Image-Turbo is published."""
    for name in names:
        for f in (folder / name).glob("*.safetensors"):
            sd = load_file(str(f))
            save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, str(f),
                      metadata={"format": "pt"})
    return folder


class Fp32Spy:
    """fp32 tensors shaped like the models' weight matrices, summed over everything alive at each checkpoint
    (storages counted once) beyond what was alive before; `worst` is the largest total seen, as a fraction of the
    smallest model's matrices in fp32 (1.0: a whole fp32 copy of it)."""

    def __init__(self, modules):
        per = [[tuple(p.shape) for p in m.parameters() if p.dim() >= 2] for m in modules]
        self.shapes = {s for shapes in per for s in shapes}
        self.full = min(4 * sum(torch.Size(s).numel() for s in shapes) for shapes in per)   # the smallest model
        self.baseline, self.worst, self.where, self.points = 0, 0.0, None, []
        self.baseline = self._bytes()

    def _bytes(self) -> int:
        gc.collect()   # only what is really alive
        seen, total = set(), 0
        for o in gc.get_objects():
            if isinstance(o, torch.Tensor) and o.dtype == torch.float32 and not o.is_meta \
                    and tuple(o.shape) in self.shapes:
                ptr = o.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    total += o.untyped_storage().nbytes()
        return total

    def check(self, where: str):
        frac = max(0, self._bytes() - self.baseline) / self.full
        self.points.append(where)
        if frac > self.worst:
            self.worst, self.where = frac, where

    def wrap(self, monkeypatch, owner, name: str, before: bool = False):
        fn = getattr(owner, name)

        def spied(*a, **k):
            if before:
                self.check(f"before {name}")
            out = fn(*a, **k)
            self.check(f"after {name}")
            return out

        monkeypatch.setattr(owner, name, spied)


@pytest.fixture(scope="module")
def bf16_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    return root, _to_bf16(build_tiny_pipeline(root / "zpipe"))


def _shapes_of(folder: Path):
    from twostep.model import load_teacher

    t = load_teacher(folder, torch.bfloat16)
    t.parts.place("cpu", torch.bfloat16)
    return t, [t.backbone, t.parts._text().text_encoder]


def test_the_spy_catches_an_fp32_read(bf16_teacher):
    from twostep.model import load_teacher

    _, pipe = bf16_teacher
    t, modules = _shapes_of(pipe)
    spy = Fp32Spy(modules)
    del t, modules
    kept = load_teacher(pipe)   # read as fp32: what `teacher cache` did
    spy.check("fp32 load")
    assert spy.worst > 0.9, spy.worst
    del kept
    spy2 = Fp32Spy([load_teacher(pipe, torch.bfloat16).backbone])
    kept = load_teacher(pipe, torch.bfloat16)
    spy2.check("bf16 load")
    assert spy2.worst == 0
    del kept


def test_teacher_cache_bf16_holds_no_fp32_copy(bf16_teacher, monkeypatch, capsys):
    import twostep.flow as flow
    import twostep.teacher.cache as C
    import twostep.teacher.pipeline_folder as PF

    root, pipe = bf16_teacher
    t, modules = _shapes_of(pipe)
    spy = Fp32Spy(modules)
    del t, modules
    spy.wrap(monkeypatch, C, "load_teacher")
    spy.wrap(monkeypatch, C, "place_weights")
    spy.wrap(monkeypatch, PF.PipelineParts, "encode")
    spy.wrap(monkeypatch, flow, "sample_euler", before=True)
    prompts = root / "prompts.txt"
    prompts.write_text("".join(f"a red circle number {i}\n" for i in range(40)))
    monkeypatch.setenv("TWOSTEP_CACHE", str(root / "tcache"))
    rc = main(["teacher", "cache", "--teacher", str(pipe), "--prompts", str(prompts), "--num", "2",
               "--out", str(root / "cache"), "--dtype", "bf16", "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert spy.points   # the checkpoints ran
    assert spy.worst < 0.25, (spy.worst, spy.where)


@pytest.mark.parametrize("decoupling,flags", [("lora", []), ("lora", ["--merge"]), ("full", [])])
def test_export_bf16_holds_no_fp32_copy(bf16_teacher, decoupling, flags, monkeypatch, tmp_path):
    import diffusers

    import twostep.export as E
    from twostep.model import load_teacher

    root, pipe = bf16_teacher
    t = load_teacher(pipe, torch.bfloat16)   # a lora run's base is the bf16 teacher; full copies train in fp32
    run = make_run(tmp_path / "run", t.backbone, t.config, decoupling, sigma_mid=0.75)
    spy = Fp32Spy([t.backbone])
    del t
    for name in ("load_student_generator", "_cast", "build_pipeline", "build_stock_pipeline"):
        spy.wrap(monkeypatch, E, name)
    spy.wrap(monkeypatch, diffusers.DiffusionPipeline, "save_pretrained", before=True)
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "exp"), *flags]) == 0
    assert json.loads((tmp_path / "exp" / "twostep_export.json").read_text())["dtype"] == "bf16"
    assert spy.points   # the checkpoints ran
    assert spy.worst < 0.25, (spy.worst, spy.where)
