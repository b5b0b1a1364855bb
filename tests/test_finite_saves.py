"""Everything saved is finite, and runs that go non-finite stop (issue 15): the mechanisms behind the fuzz table's
"garbage" and "never-stops" rows, pinned at the library level (docs/reliability.md, "Numerical faults")."""

import json

import pytest
import torch

from tiny import BLOCKS_1
from twostep.errors import NonFiniteWeights, UserError
from twostep.io.checkpoints import latest_checkpoint
from twostep.io.files import atomic_save_tensors, load_tensors, nonfinite_parts
from twostep.methods import load_config
from twostep.train import distill


def _cfg(updates, *extra):
    return load_config(None, [f"train.updates={updates}", "train.batch_size=2", "train.log_every=1",
                              "train.checkpoint_every=2", "train.grid_every=0", "train.d_warmup=0",
                              "student.decoupling=shared", BLOCKS_1, *extra])


def test_nonfinite_parts_names_each_state_dict():
    ok, bad = {"w": torch.ones(3), "i": torch.tensor([1])}, {"a": torch.ones(2), "b": torch.tensor([float("nan")])}
    assert nonfinite_parts({"student": ok, "ema": bad}) == ["ema (1 of 2 tensors)"]
    assert nonfinite_parts({"student": ok}) == []


def test_an_empty_state_dict_is_saved_readably(tmp_path):
    """safetensors writes an unreadable header for no tensors and {} metadata (the state of an optimizer that never
    stepped: a run whose first updates were all skipped could not be rolled back to)."""
    atomic_save_tensors({}, tmp_path / "e.safetensors")
    assert load_tensors(tmp_path / "e.safetensors") == {}


def test_a_nan_ema_is_never_saved_even_when_the_student_is_finite(tiny_loop):
    """train.ema=nan is refused by its range; the save check stands on its own: forced past the range, the EMA is
    NaN while every loss is finite, and the run refuses to save it (no checkpoint, no model files) instead of
    writing 'complete' garbage."""
    root, teacher, cache = tiny_loop
    cfg = _cfg(4)
    cfg.train.ema = float("nan")
    out = root / "nan_ema"
    with pytest.raises(UserError, match=r"NaN/inf weights in ema \(\d+ of \d+ tensors\)") as e:
        distill(cfg, teacher, cache, out, progress=False)
    assert "\n" not in str(e.value) and "no checkpoint to roll back to" in str(e.value)
    assert latest_checkpoint(out / "checkpoints") is None
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    status = json.loads((out / "status.json").read_text()) if (out / "status.json").exists() else {}
    assert not status.get("complete")


def test_nonfinite_losses_give_up_after_max_nonfinite_rollbacks(tiny_loop, monkeypatch):
    """Losses that stay non-finite: each train.max_nonfinite in a row rolls back (learning rates halved); after
    train.max_nonfinite rollbacks the run gives up with one line (it used to roll back for ever)."""
    root, teacher, cache = tiny_loop
    from twostep.methods.turbopp import TurboPP
    orig = TurboPP.student_loss
    calls = {"n": 0}

    def broken(self, batch):
        calls["n"] += 1
        loss, logs = orig(self, batch)
        return (loss * float("nan") if calls["n"] > 2 else loss), logs

    monkeypatch.setattr(TurboPP, "student_loss", broken)
    with pytest.raises(UserError, match="after 2 rollbacks") as e:
        distill(_cfg(1000, "train.max_nonfinite=2"), teacher, cache, root / "stuck", progress=False)
    assert "\n" not in str(e.value) and "--resume" in str(e.value)
    assert calls["n"] < 20  # 2 good updates, then 2 in a row × (2 rollbacks + the last try)


def test_teacher_training_rolls_back_then_gives_up(tmp_path, monkeypatch, capsys):
    """teacher train: a non-finite loss is skipped but the step and time budgets advance; MAX_NONFINITE in a row
    roll back to the newest checkpoint (learning rate halved); after MAX_NONFINITE rollbacks it gives up."""
    from twostep.backbones.zimage import ZImageBackbone
    from twostep.teacher import train as tt
    orig = ZImageBackbone.raw_output
    calls = {"n": 0}

    def broken(self, *a, **k):
        calls["n"] += 1
        u = orig(self, *a, **k)
        return u * float("nan") if calls["n"] > 3 else u

    monkeypatch.setattr(ZImageBackbone, "raw_output", broken)
    cfg = tt.TeacherTrainConfig(dim=32, n_heads=1, n_layers=1, num_train=16, batch_size=4, minutes=2.0,
                                checkpoint_minutes=0.0)  # a checkpoint after every update
    with pytest.raises(UserError, match=f"after {tt.MAX_NONFINITE} rollbacks") as e:
        tt.train_teacher(cfg, tmp_path / "t", progress=False)
    out = capsys.readouterr().out
    assert out.count("rolled back to step-00000003") == tt.MAX_NONFINITE and "learning rate halved" in out
    assert "\n" not in str(e.value)
    assert calls["n"] == 3 + tt.MAX_NONFINITE * (tt.MAX_NONFINITE + 1)
    assert all(torch.isfinite(v).all() for v in load_tensors(tmp_path / "t" / "model.safetensors").values())


def test_teacher_training_never_saves_a_nan_ema(tmp_path):
    from twostep.teacher import train as tt
    cfg = tt.TeacherTrainConfig(dim=32, n_heads=1, n_layers=1, num_train=16, batch_size=4, max_steps=2)
    cfg.ema = float("nan")  # past the range check: the save check must stand on its own
    with pytest.raises(NonFiniteWeights, match="ema"):
        tt.train_teacher(cfg, tmp_path / "t", progress=False)
    assert not (tmp_path / "t" / "model.safetensors").exists() and not (tmp_path / "t" / "config.json").exists()
