"""Config: YAML + --set overrides; unknown keys, wrong types and bad choices are one-line UserErrors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twostep.config import Config, dump_config, load_config
from twostep.errors import UserError


def test_overrides_and_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("student:\n  sigma_mid: 0.5\ntrain:\n  lr_student: 1e-4\n")
    c = load_config(f, ["loss.step1_loss=adv", "disc.blocks=[0, 2]", "train.lr_disc=3e-5"])
    assert c.student.sigma_mid == 0.5 and c.train.lr_student == 1e-4 and c.train.lr_disc == 3e-5
    assert c.loss.step1_loss == "adv" and c.disc.blocks == [0, 2]
    assert load_config(None, []) == Config()
    # the dump round-trips
    g = tmp_path / "d.yaml"
    g.write_text(dump_config(c))
    assert load_config(g) == c


@pytest.mark.parametrize("sets,needle", [
    (["student.nope=1"], "student.nope"),
    (["train.updates=abc"], "train.updates"),
    (["train.updates=1.5"], "train.updates"),
    (["loss.step1_loss=xyz"], "loss.step1_loss"),
    (["nosection.x=1"], "nosection"),
    (["student=3"], "student"),
    (["noequals"], "noequals"),
])
def test_bad_overrides(sets, needle):
    with pytest.raises(UserError) as e:
        load_config(None, sets)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("student: [unclosed\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(f)
    f.write_text("- a list\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(f)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["student", "disc", "loss", "train", "x", "student.sigma_mid",
                                           "train.updates", "loss.step1_loss", "disc.blocks", "method"]),
                          st.text(max_size=12)), max_size=4))
def test_fuzz_overrides_only_raise_user_errors(pairs):
    sets = [f"{k}={v}" for k, v in pairs]
    try:
        load_config(None, sets)
    except UserError:
        pass
