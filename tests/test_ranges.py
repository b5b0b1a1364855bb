"""Ranges declared once: every numeric config field (the distill sections of every method, teacher training,
feature-net training) declares a Range next to its default, refused outside it (NaN and ±inf for every float) by
from_dict with a one-line UserError naming the key, the value and the range; the values that only make sense
together (RULES) likewise; every numeric CLI flag takes its argparse type from the same Range objects (argparse's
one-line error, exit 2) and the library function behind it checks the same range; block indices are refused
outside the teacher's blocks (never taken modulo the count)."""

import argparse
import math
import typing
from dataclasses import fields, is_dataclass
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twostep import config as C
from twostep.cli import build_parser, main
from twostep.config import Range, field_range, from_dict, load_typed
from twostep.errors import UserError
from twostep.methods import METHODS, REGISTRY, build_method, config_class, load_config
from twostep.metrics.features import FeatureTrainConfig
from twostep.teacher.train import TeacherTrainConfig

from tiny import BLOCKS_1, tiny_teacher_backbone

SHARED = ("student", "disc", "train")
STRING_LISTS = {"validation_prompts"}  # train.validation_prompts: prompts, checked by TrainConfig.RULES


# -- every numeric config field of every config class -------------------------------------------------------

def _numeric(cls, name) -> bool:
    hint = typing.get_type_hints(cls)[name]
    if hint in (int, float):
        return True
    if hint is list:  # a list of numbers (block indices, betas, scales); lora_targets is a list of names
        f = {x.name: x for x in fields(cls)}[name]
        default = f.default_factory()
        if not default:  # an empty default says nothing: numeric unless it is a known list of strings
            return name not in STRING_LISTS
        return all(isinstance(x, (int, float)) for x in default)
    return False


def _cases():
    """(owner, key path, section class, field name): the shared sections once (under turbopp), each method's own
    sections under that method, and the flat teacher / feature-net configs."""
    out = []
    for m in METHODS:
        cls = config_class(m)
        for sec in fields(cls):
            sub = typing.get_type_hints(cls)[sec.name]
            if not is_dataclass(sub) or (sec.name in SHARED and m != "turbopp"):
                continue
            out += [(m, f"{sec.name}.{f.name}", sub, f.name) for f in fields(sub) if _numeric(sub, f.name)]
    for flat in (TeacherTrainConfig, FeatureTrainConfig):
        out += [(flat, f.name, flat, f.name) for f in fields(flat) if _numeric(flat, f.name)]
    return out


CASES = _cases()
IDS = [f"{o if isinstance(o, str) else o.__name__}:{k}" for o, k, _, _ in CASES]


def _parse(owner, key, value):
    """from_dict of the owner's config with one key set (a distill key inside its section)."""
    if isinstance(owner, str):
        sec, name = key.split(".")
        return from_dict(config_class(owner), {"method": owner, sec: {name: value}})
    return from_dict(owner, {key: value})


def _yaml(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_yaml(x) for x in v) + "]"
    if isinstance(v, float) and math.isnan(v):
        return ".nan"
    if isinstance(v, float) and math.isinf(v):
        return ".inf" if v > 0 else "-.inf"
    return repr(v)


def _set(owner, key, value):
    """The same through the YAML `--set` path (load_config / load_typed)."""
    if isinstance(owner, str):
        return load_config(None, [f"method={owner}", f"{key}={_yaml(value)}"])
    return load_typed(owner, None, [f"{key}={_yaml(value)}"])


def _outside(r: Range) -> list:
    """Values just outside `r` (and NaN / ±inf for floats; for lists: a bad item, a bad length, an empty list)."""
    one = 1 if r.integer else 1.0
    vals = []
    if r.lo is not None:
        vals.append(r.lo if r.lo_open else r.lo - one)
    if r.hi is not None:
        vals.append(r.hi if r.hi_open else r.hi + one)
    if not r.integer:
        vals += [math.nan, math.inf, -math.inf]
    if not r.items:
        return vals
    ok_item = _inside_item(r)
    n = r.length or max(r.min_items, 1)
    lists = [[ok_item] * (n - 1) + [v] for v in vals]
    if r.length is not None:
        lists.append([ok_item] * (r.length + 1))
    if r.min_items or r.length:
        lists.append([])
    return lists


def _inside_item(r: Range):
    """One value inside `r` (a list range: one item)."""
    lo = 0 if r.lo is None else r.lo
    if r.integer:
        return int(lo) + (1 if r.lo_open else 0)
    v = lo + (0.5 if r.lo_open else 0.0)
    return float(v if r.hi is None or v < r.hi else (lo + r.hi) / 2)


def test_every_numeric_field_declares_a_range_that_holds_its_default():
    assert len(CASES) >= 60
    for owner, key, cls, name in CASES:
        r = field_range(cls, name)
        assert isinstance(r, Range), f"{key} of {owner}: no range declared"
        hint = typing.get_type_hints(cls)[name]
        assert r.items == (hint is list), key
        if hint is int:
            assert r.integer, f"{key}: an int field with a float range"
        if hint is float:
            assert not r.integer, f"{key}: a float field with an integer range"
        default = getattr(cls(), name)
        assert r.contains(default), f"{key}: default {default!r} outside its own range {r.text}"
        assert C.check_rules(cls()) is None


@pytest.mark.parametrize("owner,key,cls,name", CASES, ids=IDS)
def test_a_value_outside_its_range_is_refused_naming_the_key(owner, key, cls, name):
    r = field_range(cls, name)
    for v in _outside(r):
        for parse in (_parse, _set):
            with pytest.raises(UserError) as e:
                parse(owner, key, v)
            msg = str(e.value)
            assert key in msg and "out of range" in msg and r.text in msg and "\n" not in msg, (v, msg)


def test_integers_beyond_float_and_huge_literals_are_one_line_errors():
    for sets in (["train.lr_student=1" + "0" * 400], ["train.updates=" + "9" * 5000]):
        with pytest.raises(UserError) as e:
            load_config(None, sets)
        assert "\n" not in str(e.value) and len(str(e.value)) < 300


@pytest.mark.parametrize("owner,values,needle", [
    ("dmd2", {"dmd": {"sigma_min": 0.9, "sigma_max": 0.5}}, "dmd.sigma_min=0.9, dmd.sigma_max=0.5"),
    (TeacherTrainConfig, {"dim": 40, "n_heads": 2}, "dim=40, n_heads=2"),
    (TeacherTrainConfig, {"resolution": 30, "patch_size": 4}, "resolution=30, patch_size=4"),
    (FeatureTrainConfig, {"data": "shapes", "num_features": 64}, "num_features=64"),
])
def test_values_that_only_make_sense_together(owner, values, needle):
    with pytest.raises(UserError) as e:
        if isinstance(owner, str):
            from_dict(config_class(owner), {"method": owner, **values})
        else:
            from_dict(owner, values)
    assert needle in str(e.value) and "\n" not in str(e.value)
    # the values inside: photos feature nets have no cell grid, so 64 features are fine
    assert from_dict(FeatureTrainConfig, {"data": "photos", "num_features": 64}).num_features == 64


def test_the_issue_examples_are_refused():
    bad = ["train.batch_size=0", "train.batch_size=-4", "train.lr_student=0", "train.lr_disc=-1e-3",
           "train.lr_student=nan", "train.betas=[0.9, 1.0]", "train.betas=[0.9]", "train.betas=[-0.1, 0.9]",
           "student.lora_rank=0", "train.log_every=0", "train.updates=0", "train.updates=-1", "train.minutes=-1",
           "train.ema=nan", "train.ema=1.0", "student.sigma_mid=0", "disc.blocks=[-1]", "disc.blocks=[]",
           "train.seed=-1", "train.keep_checkpoints=0", "train.max_nonfinite=0", "disc.sigma_std=-1"]
    for s in bad:
        with pytest.raises(UserError) as e:
            load_config(None, [s])
        assert s.split("=")[0] in str(e.value), s
    assert load_config(None, ["train.minutes=0"]).train.minutes == 0.0            # 0 = no budget (distill)
    with pytest.raises(UserError, match="minutes"):
        load_typed(TeacherTrainConfig, None, ["minutes=0"])                          # a teacher needs a budget
    with pytest.raises(UserError, match="minutes"):
        load_typed(FeatureTrainConfig, None, ["minutes=0"])


# -- hypothesis over the declared ranges --------------------------------------------------------------------

def _inside_strategy(r: Range):
    if r.integer:
        lo = None if r.lo is None else int(r.lo) + (1 if r.lo_open else 0)
        hi = None if r.hi is None else int(r.hi) - (1 if r.hi_open else 0)
        item = st.integers(min_value=lo, max_value=hi if hi is not None else (lo or 0) + 10 ** 6)
    else:
        item = st.floats(min_value=r.lo, max_value=r.hi, exclude_min=r.lo_open and r.lo is not None,
                         exclude_max=r.hi_open and r.hi is not None, allow_nan=False, allow_infinity=False)
    if not r.items:
        return item
    n = r.length
    return st.lists(item, min_size=n if n is not None else r.min_items, max_size=n if n is not None else r.min_items + 4)


def _outside_strategy(r: Range):
    parts = []
    if r.lo is not None:
        parts.append(st.integers(max_value=int(r.lo) - (0 if r.lo_open else 1)) if r.integer else
                     st.floats(max_value=r.lo, exclude_max=not r.lo_open, allow_nan=False, allow_infinity=False))
    if r.hi is not None:
        parts.append(st.integers(min_value=int(r.hi) + (0 if r.hi_open else 1)) if r.integer else
                     st.floats(min_value=r.hi, exclude_min=not r.hi_open, allow_nan=False, allow_infinity=False))
    if not r.integer:
        parts.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    item = st.one_of(parts)
    if not r.items:
        return item
    ok = _inside_strategy(Range(r.text, r.lo, r.hi, r.lo_open, r.hi_open, r.integer))
    n = r.length or max(r.min_items, 1)
    return st.tuples(st.lists(ok, min_size=n - 1, max_size=n - 1), item).map(lambda t: t[0] + [t[1]])


def _refused_by_a_rule_only(e: UserError, key: str) -> bool:
    return str(e).startswith("config keys ") and key.split(".")[-1] in str(e)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_hypothesis_values_inside_parse_and_outside_are_refused(data):
    owner, key, cls, name = data.draw(st.sampled_from(CASES))
    r = field_range(cls, name)
    v = data.draw(_inside_strategy(r), label="inside")
    try:
        cfg = _parse(owner, key, v)
        got = getattr(getattr(cfg, key.split(".")[0]), name) if "." in key else getattr(cfg, name)
        assert got == v
    except UserError as e:  # only a cross-field rule may refuse a value inside its own range
        assert _refused_by_a_rule_only(e, key), str(e)
    bad = data.draw(_outside_strategy(r), label="outside")
    with pytest.raises(UserError) as e:
        _parse(owner, key, bad)
    assert key in str(e.value) and "\n" not in str(e.value)


# -- every numeric CLI flag -----------------------------------------------------------------------------------

def _subparsers(p, prefix=()):
    """(command words, parser) for the root and every (sub)subcommand."""
    yield prefix, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _subparsers(sp, (*prefix, name))


def _flag_cases():
    out = []
    for words, p in _subparsers(build_parser()):
        for a in p._actions:
            if a.option_strings and a.type is not None:
                out.append((words, a.option_strings[0], a.type))
    return out


FLAGS = _flag_cases()


def _required(words) -> list[str]:
    """Dummy values for the required arguments of a command (in-range for ranged flags)."""
    p = dict(_subparsers(build_parser()))[words]
    argv = []
    for a in p._actions:
        if a.required and a.option_strings:
            r = getattr(a.type, "range", None)
            argv += [a.option_strings[0], str(_inside_item(r)) if r else (a.choices[0] if a.choices else "x")]
    return argv


def test_every_numeric_flag_has_a_range():
    assert not [(w, f) for w, f, t in FLAGS if t in (int, float)], "numeric flags without a Range"
    ranged = {(" ".join(w), f) for w, f, t in FLAGS if hasattr(t, "range")}
    expected = {("", "--threads"), ("teacher cache", "--num"), ("teacher cache", "--seed"),
                ("teacher cache", "--shard-size"), ("teacher cache", "--batch-size"),
                ("teacher tune-guidance", "--grid"), ("teacher tune-guidance", "--num"),
                ("teacher tune-guidance", "--seed"), ("eval", "--steps"), ("eval", "--guidance"), ("eval", "--num"),
                ("eval", "--seed"), ("demo", "--cache-num"), ("demo", "--minutes"), ("demo", "--eval-num"),
                ("demo", "--seed"), ("speed", "--batch"), ("speed", "--repeats"), ("sample", "--rows"),
                ("sample", "--steps"), ("sample", "--guidance"), ("sample", "--seed"), ("sample", "--num"),
                ("sample", "--scale"), ("teacher train", "--minutes"), ("teacher train", "--lr"),
                ("teacher train", "--batch-size"), ("teacher train", "--ema"), ("metrics train", "--lr"),
                ("metrics train", "--minutes"), ("metrics train", "--seed")}
    assert expected <= ranged, expected - ranged


def _bad_texts(r: Range) -> list[str]:
    item = Range(r.text, r.lo, r.hi, r.lo_open, r.hi_open, r.integer)
    return [_yaml(v) if not isinstance(v, float) or math.isfinite(v) else str(v) for v in _outside(item)] + ["abc"]


@pytest.mark.parametrize("words,flag,typ", [c for c in FLAGS if hasattr(c[2], "range")],
                         ids=[f"{' '.join(w) or 'twostep'} {f}" for w, f, t in FLAGS if hasattr(t, "range")])
def test_a_flag_outside_its_range_exits_2_with_one_error_line(words, flag, typ, capsys):
    for bad in _bad_texts(typ.range):
        if words:
            argv = [*words, *_required(words), flag, bad]
        else:  # the root's --threads, before any subcommand
            argv = [flag, bad, "sample", *_required(("sample",))]
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        lines = [l for l in err.splitlines() if "error:" in l]
        assert e.value.code == 2 and len(lines) == 1 and flag in lines[0] and "Traceback" not in err, (argv, err)


def test_demo_minutes_0_is_refused_not_100000_updates(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--minutes", "0", "--out", str(tmp_path / "demo")])
    assert e.value.code == 2 and "--minutes" in capsys.readouterr().err
    from twostep.demo import run_demo
    with pytest.raises(UserError, match="minutes"):
        run_demo(tmp_path / "demo", minutes=0)
    with pytest.raises(UserError, match="train.minutes=0"):  # nor through a --set after the flag
        run_demo(tmp_path / "demo", minutes=1, sets=["train.minutes=0"])
    assert not (tmp_path / "demo").exists()


# -- the library functions behind the flags check the same ranges -------------------------------------------

def test_library_functions_check_the_ranges_of_their_flags(tmp_path):
    from twostep import evaluate, report, speed
    from twostep.model import Teacher
    from twostep.sampling import TeacherSampler
    from twostep.teacher.cache import build_cache

    nan = math.nan
    calls = [
        (lambda: build_cache(tmp_path / "t", "shapes", 0, tmp_path / "c"), "num"),
        (lambda: build_cache(tmp_path / "t", "shapes", 4, tmp_path / "c", shard_size=0), "shard_size"),
        (lambda: build_cache(tmp_path / "t", "shapes", 4, tmp_path / "c", batch_size=-1), "batch_size"),
        (lambda: build_cache(tmp_path / "t", "shapes", 4, tmp_path / "c", seed=-1), "seed"),
        (lambda: evaluate.evaluate(None, "shapes", num=5), "num"),
        (lambda: evaluate.evaluate(None, "shapes", num=20, seed=-3), "seed"),
        (lambda: evaluate.tune_guidance(tmp_path / "t", "shapes", grid=[1.0, nan]), "grid"),
        (lambda: evaluate.tune_guidance(tmp_path / "t", "shapes", grid=[]), "grid"),
        (lambda: evaluate.tune_guidance(tmp_path / "t", "shapes", num=0), "num"),
        (lambda: speed.measure_folders(tmp_path / "t", tmp_path / "s", batch=0), "batch"),
        (lambda: speed.measure_folders(tmp_path / "t", tmp_path / "s", repeats=0), "repeats"),
        (lambda: report.prompt_grid(None, ["a"], tmp_path / "x.png", per_prompt=0), "per_prompt"),
        (lambda: report.prompt_grid(None, ["a"], tmp_path / "x.png", scale=0), "scale"),
        (lambda: report.prompt_grid(None, ["a"], tmp_path / "x.png", seed=-1), "seed"),
        (lambda: report.protocol_grid(None, "shapes", tmp_path / "x.png", prompts=0), "prompts"),
    ]
    stub = SimpleNamespace(sampling={"steps": 8, "guidance": 1.0, "shift": 3.0})
    calls += [
        (lambda: TeacherSampler(stub, guidance=nan), "guidance"),
        (lambda: TeacherSampler(stub, guidance=-1.0), "guidance"),
        (lambda: TeacherSampler(stub, steps=0), "steps"),
        (lambda: Teacher.sample(stub, [], torch.zeros(1, 3, 8, 8), guidance=nan), "guidance"),
        (lambda: Teacher.sample(SimpleNamespace(sampling={"steps": 8, "guidance": nan}), [], torch.zeros(1)),
         "guidance"),
    ]
    for fn, name in calls:
        with pytest.raises(UserError) as e:
            fn()
        assert str(e.value).startswith(f"{name}:") and "out of range" in str(e.value), str(e.value)
    assert not (tmp_path / "c").exists() and not (tmp_path / "x.png").exists()


# -- block indices: into the teacher's blocks, never modulo ------------------------------------------------

def test_block_indices_outside_the_teacher_are_refused_before_anything_is_built(monkeypatch):
    from twostep.discriminator import Discriminator, check_blocks
    from twostep.methods import base
    bb = tiny_teacher_backbone()                                      # 2 blocks
    assert check_blocks([1, 0, 1], 2) == [0, 1]
    assert Discriminator(bb, blocks=[1]).blocks == [1]
    for blocks in ([2], [0, 3], [-1]):
        with pytest.raises(UserError, match="out of range for a teacher with 2 blocks"):
            Discriminator(bb, blocks=blocks)
    cases = [("turbopp", ["disc.blocks=[0, 2]"], "disc.blocks"), ("ladd", ["disc.blocks=[1, 2, 3]"], "disc.blocks"),
             ("dmd2", ["disc.blocks=[5]"], "disc.blocks"), ("diffusion2gan", ["d2g.blocks=[0, 2]"], "d2g.blocks")]
    for method, sets, key in cases:
        shared = [] if method == "turbopp" else ["student.decoupling=shared"]
        cfg = load_config(None, [f"method={method}", *shared, *sets])
        with monkeypatch.context() as mp:                            # refused before the student is built
            mp.setattr(base, "TwoStepStudent", lambda *a, **k: pytest.fail("student built before the check"))
            with pytest.raises(UserError) as e:
                build_method(cfg, bb)
        assert str(e.value).startswith(f"{key}=") and "use indices 0 to 1" in str(e.value) and "\n" not in str(e.value)
    # Diffusion2GAN reads d2g.blocks only: the unused disc.blocks default is not held against a small teacher
    assert REGISTRY["diffusion2gan"].block_keys == ("d2g.blocks",)
    build_method(load_config(None, ["method=diffusion2gan", "student.decoupling=shared"]), bb)


def test_distill_refuses_an_out_of_range_block_before_training(tiny_loop, tmp_path, capsys):
    root, teacher, cache = tiny_loop                                  # a 1-block teacher
    out = tmp_path / "run"
    rc = main(["--threads", "1", "distill", "--teacher", str(teacher), "--cache", str(cache), "--out", str(out),
               "--set", "train.updates=1", "--no-progress"])                  # the default disc.blocks [1, 2, 3]
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "disc.blocks=[1, 2, 3]" in err[0] and "Traceback" not in err[0], err
    assert not out.exists() or not any(out.rglob("*.safetensors"))
    rc = main(["--threads", "1", "distill", "--teacher", str(teacher), "--cache", str(cache), "--out", str(out),
               "--set", BLOCKS_1, "--dry-run"])
    assert rc == 0, capsys.readouterr().err
