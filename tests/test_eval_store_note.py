"""`twostep eval` never fills $TWOSTEP_CACHE silently: the first eval that stores the teacher's samples (its PSNR
reference) says where, about how large, and how to free it; a later eval that reuses them says nothing."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from test_eval_scale import _teacher_2step  # noqa: E402

from twostep import evaluate as E


def test_eval_says_where_the_teacher_samples_are_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TWOSTEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(E, "DIVERSITY_PROMPTS", 2)
    folder, gen = _teacher_2step(tmp_path)
    E.evaluate(gen, "shapes", num=10, seed=3, ref="data", batch_size=4, device="cpu", teacher_dir=folder)
    err = capsys.readouterr().err
    note = [ln for ln in err.splitlines() if "the teacher's samples (PSNR reference) are kept in" in ln]
    assert len(note) == 1 and str(tmp_path / "cache") in note[0] and "delete the folder" in note[0]
    E.evaluate(gen, "shapes", num=10, seed=3, ref="data", batch_size=4, device="cpu", teacher_dir=folder)
    assert "are kept in" not in capsys.readouterr().err
