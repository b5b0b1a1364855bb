"""Prompt files (twostep/data/prompts.py): four formats, the draw, the held-out split, bad input, streaming."""

import csv
import json
import tracemalloc
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twostep.data import get_captions
from twostep.data import folder as folder_mod
from twostep.data.folder import FolderDataset
from twostep.data.prompts import HOLDOUT, describe_draw, draw_prompts, head_prompts, prompt_file_identity, read_prompts
from twostep.errors import UserError

PROMPTS = [f"prompt number {i}, a photo" for i in range(300)]


def write(path, prompts, fmt=None, key="text", row_group=64):
    """`prompts` as a prompt file of the format of `path`'s extension."""
    fmt = fmt or path.suffix[1:]
    if fmt == "txt":
        path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({key: p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", key])
            w.writerows([i, p] for i, p in enumerate(prompts))
    elif fmt == "parquet":
        pq.write_table(pa.table({"id": list(range(len(prompts))), key: prompts}), path, row_group_size=row_group)
    return path


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet"])
def test_same_prompts_draw_alike_in_every_format(tmp_path, fmt):
    ref = read_prompts(write(tmp_path / "ref.txt", PROMPTS), 40, seed=3)
    f = write(tmp_path / f"p.{fmt}", PROMPTS)
    assert read_prompts(f, 40, seed=3) == ref
    assert len(set(ref)) == 40 and set(ref) <= set(PROMPTS)
    assert head_prompts(f, 5) == PROMPTS[:5]


@pytest.mark.parametrize("key", ["text", "prompt", "caption"])
def test_default_keys_and_prompt_key(tmp_path, key):
    for fmt in ("jsonl", "csv", "parquet"):
        f = write(tmp_path / f"p.{fmt}", PROMPTS[:20], key=key)
        assert head_prompts(f) == PROMPTS[:20]
        g = write(tmp_path / f"q.{fmt}", PROMPTS[:20], key="my_col")
        with pytest.raises(UserError, match="--prompt-key"):
            head_prompts(g)
        assert head_prompts(g, key="my_col") == PROMPTS[:20]
        with pytest.raises(UserError, match="'nope'.*--prompt-key"):
            head_prompts(g, key="nope")


def test_csv_quoted_fields_and_jsonl_key_order(tmp_path):
    tricky = ['a cat, sitting', 'a "quoted" dog', "two\nlines", "ünïcödé ☃"]
    f = write(tmp_path / "p.csv", tricky)
    assert head_prompts(f) == tricky
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"caption": "c", "text": "t"}) + "\n" + json.dumps({"prompt": "p", "caption": "c"}))
    assert head_prompts(j) == ["t", "p"]  # text before prompt before caption


def test_draw_is_deterministic_and_seeded(tmp_path):
    f = write(tmp_path / "p.txt", PROMPTS)
    a = read_prompts(f, 50, seed=0)
    assert a == read_prompts(f, 50, seed=0)
    assert a != read_prompts(f, 50, seed=1)
    assert read_prompts(f, 20, seed=0) == a[:20]  # a prefix: num only cuts
    assert len(set(read_prompts(f, 280, seed=0, split="all"))) == 280  # without replacement while it can


def test_seeds_per_prompt_repeats_each_prompt_in_a_row(tmp_path):
    f = write(tmp_path / "p.txt", PROMPTS)
    one = read_prompts(f, 4, seed=2)
    assert read_prompts(f, 10, seed=2, seeds_per_prompt=3) == [p for p in one for _ in range(3)][:10]


def test_more_rows_than_prompts_uses_every_prompt_evenly(tmp_path):
    f = write(tmp_path / "p.txt", PROMPTS[:7])
    got = read_prompts(f, 30, seed=0, allow_repeats=True)
    c = Counter(got)
    assert set(c) == set(PROMPTS[:7]) and max(c.values()) - min(c.values()) <= 1
    assert got[:7] != got[7:14]  # a fresh order each round


def test_a_draw_larger_than_its_split_is_refused_or_declared(tmp_path):
    """Issue 27: the split sizes are counted; a draw needing more distinct prompts than its split holds is refused
    with the count needed and the file size that gives it, or takes them all with repeats it counts."""
    f = write(tmp_path / "p.txt", PROMPTS)   # 300 prompts
    held = sum(HOLDOUT.held_out(p) for p in PROMPTS)
    caps, d = draw_prompts(f, 5, split="test")
    assert (d["prompts"], d["held_out"], d["train"], d["split_size"]) == (300, held, 300 - held, held)
    assert (d["needed"], d["distinct"], d["repeats"]) == (5, 5, 0) and len(set(caps)) == 5
    line = describe_draw(d)
    assert f"300 prompts ({300 - held} for training, {held} held out)" in line and "no repeats" in line
    with pytest.raises(UserError) as e:
        read_prompts(f, held + 1, split="test")
    msg = str(e.value)
    assert f"{held} prompts in the held-out split" in msg and f"needs {held + 1} distinct" in msg
    assert f"about {(held + 1) * 20:,} prompts" in msg and "--allow-repeats" in msg and "\n" not in msg
    with pytest.raises(UserError, match=f"{300 - held} prompts in the training split, this draw needs 300 "
                                        r"distinct ones \(--num 600 / --seeds-per-prompt 2\)"):
        read_prompts(f, 600, split="train", seeds_per_prompt=2)
    caps, d = draw_prompts(f, held + 3, split="test", allow_repeats=True)
    assert (d["distinct"], d["repeats"]) == (held, 3) and len(caps) == held + 3 and len(set(caps)) == held
    assert "3 repeats (--allow-repeats)" in describe_draw(d)
    small = write(tmp_path / "s.txt", PROMPTS[:7])   # no held-out split: every split is the whole file
    with pytest.raises(UserError, match="7 prompts in the file .too few for a held-out split., this draw needs 8"):
        read_prompts(small, 8)
    assert draw_prompts(small, 7)[1]["repeats"] == 0


def test_heldout_split_is_disjoint_by_text_and_stable(tmp_path):
    prompts = [f"p{i}" for i in range(4000)]
    f = write(tmp_path / "p.txt", prompts)
    held = {p for p in prompts if HOLDOUT.held_out(p)}
    assert 0.035 < len(held) / len(prompts) < 0.065  # 5 % by hash
    train = read_prompts(f, 3000, split="train")
    test = read_prompts(f, 100, split="test")
    assert not set(train) & held and set(test) <= held
    assert read_prompts(f, 100, split="ref") != test and set(read_prompts(f, 100, split="ref")) <= held
    # the same text is always on the same side, wherever it sits; appending lines moves no other prompt
    g = write(tmp_path / "g.txt", list(reversed(prompts)) + ["new one"] * 3)
    held_g = held | ({"new one"} if HOLDOUT.held_out("new one") else set())
    assert set(read_prompts(g, 1000, split="test", allow_repeats=True)) == held_g  # more rows than held out: all


def test_small_file_has_no_heldout_split(tmp_path, capsys):
    f = write(tmp_path / "p.txt", PROMPTS[:10])
    assert set(read_prompts(f, 10, split="train")) == set(PROMPTS[:10])
    assert set(read_prompts(f, 10, split="test")) == set(PROMPTS[:10])
    assert "no held-out split" in capsys.readouterr().err


def test_streamed_memory_is_bounded_by_num(tmp_path):
    f = tmp_path / "big.txt"
    f.write_text("".join(f"a long enough prompt number {i} with some words\n" for i in range(20_000)))
    tracemalloc.start()
    got = read_prompts(f, 100, seed=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(got) == 100
    assert peak < 300_000, peak  # a 1 MB file (reading it whole: 3 MB); kept: ~100 prompts and one line buffer


def case(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


BAD = [  # (file name, bytes, key, expected in the message)
    ("empty.txt", b"", None, "empty file"),
    ("blank.txt", b"\n\n  \n", None, "no prompts"),
    ("binary.txt", bytes(range(256)) * 4, None, "binary file"),
    ("utf16.txt", "a cat\n".encode("utf-16"), None, "UTF-16"),
    ("badutf8.txt", b"a cat\n\xff\xfe dog\n", None, "line 2: not valid UTF-8"),
    ("gap.txt", b"a cat\n\n   \na dog\n", None, "line 2: empty line"),
    ("nul.txt", b"a cat\n" + b"x" * 9000 + b"\na\x00dog\n", None, "line 3: holds a NUL byte"),
    ("long.txt", b"a cat\n" + b"y" * (1 << 20 + 1) + b"\n", None, "line 2: longer than"),
    ("key.txt", b"a cat\n", "text", "has no keys"),
    ("json.jsonl", b'{"text": "a"}\n{"text": "b"\n', None, "line 2: not valid JSON"),
    ("array.jsonl", b'{"text": "a"}\n["b"]\n', None, "line 2: expected a JSON object"),
    ("nokey.jsonl", b'{"text": "a"}\n{"file": "b"}\n', None, 'line 2: no a "text", "prompt" or "caption" key'),
    ("num.jsonl", b'{"text": "a"}\n{"text": 3}\n', None, 'line 2: "text" must be a string'),
    ("emptyval.jsonl", b'{"text": "a"}\n{"text": " "}\n', None, 'line 2: "text" is empty'),
    ("surrogate.jsonl", b'{"text": "a"}\n{"text": "\\ud800"}\n', None, "line 2: \"text\" holds an invalid"),
    ("nocol.csv", b"id,name\n1,a\n", None, "no column named text"),
    ("short.csv", b"id,text\n1,a\n2\n", None, "line 3: has 1 fields"),
    ("emptycell.csv", b"id,text\n1,a\n2,\n", None, "line 3: the prompt is empty"),
    ("quote.csv", b'id,text\n1,a\n2,"b"x\n', None, "line 3: not valid CSV"),
    ("notparquet.parquet", b"PAR1 this is not parquet", None, "not a readable Parquet file"),
    ("unknown.json", b'["a"]', None, "unknown prompt file type '.json'"),
]


@pytest.mark.parametrize("name,data,key,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_user_error(tmp_path, name, data, key, msg):
    p = case(tmp_path, name, data)
    with pytest.raises(UserError) as e:
        read_prompts(p, 2, key=key)
    assert msg in str(e.value) and "\n" not in str(e.value)
    assert str(p) in str(e.value) or "--prompt-key" in str(e.value)


def test_bad_parquet_columns(tmp_path):
    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), p)
    with pytest.raises(UserError, match="holds int64, not strings"):
        read_prompts(p, 1)
    pq.write_table(pa.table({"text": ["a", None, "c"]}), p)
    with pytest.raises(UserError, match="row 1: column 'text' is null"):
        read_prompts(p, 1)
    assert read_prompts(p, 2, skip_bad=True, split="all") and head_prompts(p, skip_bad=True) == ["a", "c"]
    with pytest.raises(UserError, match="not found"):
        read_prompts(tmp_path / "missing.txt", 1)
    with pytest.raises(UserError, match="is a folder"):
        read_prompts(tmp_path, 1)


def test_skip_bad_counts_and_keeps_the_rest(tmp_path, capsys):
    p = case(tmp_path, "p.jsonl", b'{"text": "a"}\n\n{"text": 3}\nnot json\n{"text": "b"}\n\n\n')
    assert head_prompts(p, skip_bad=True) == ["a", "b"]
    err = capsys.readouterr().err
    assert "skipped 3 of 5 prompt lines" in err and "1 empty" in err and "first:" in err and "line 2" in err
    only_bad = case(tmp_path, "q.txt", b"\xff\n\xfe\nfine\n")
    assert read_prompts(only_bad, 3, skip_bad=True, allow_repeats=True) == ["fine"] * 3
    with pytest.raises(UserError, match="no usable prompts"):
        read_prompts(case(tmp_path, "r.txt", b"\xff\n\xfe\n"), 3, skip_bad=True)


def test_trailing_blank_lines_crlf_and_bom_are_fine(tmp_path):
    p = case(tmp_path, "p.txt", b"\xef\xbb\xbfa cat\r\n a dog \r\n\r\n\n")
    assert head_prompts(p) == ["a cat", " a dog "]  # verbatim but for the line ending


def test_prompt_file_identity(tmp_path):
    f = write(tmp_path / "p.jsonl", PROMPTS[:5])
    a = prompt_file_identity(f)
    assert a["format"] == "jsonl" and a["key"] == "auto" and len(a["sha256"]) == 64 and a["holdout"]["fraction"]
    assert prompt_file_identity(f, key="text")["key"] == "text"
    g = tmp_path / "moved.jsonl"
    g.write_bytes(f.read_bytes())
    assert prompt_file_identity(g) == a  # content only: neither path nor name
    write(f, PROMPTS[:6])
    assert prompt_file_identity(f)["sha256"] != a["sha256"]


def test_folder_captions_without_decoding_images(tmp_path, monkeypatch):
    from test_folder_dataset import good_folder

    root = good_folder(tmp_path / "data", n=6)
    want = FolderDataset(root, resolution=8).sample(10, seed=4).captions

    def never(*a, **k):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(folder_mod, "_load_image", never)
    ds = FolderDataset(root, resolution=8, decode=False)
    assert ds.captions_sample(10, seed=4) == want
    assert get_captions(str(root), 10, seed=4, resolution=8) == want
    with pytest.raises(RuntimeError, match="captions only"):
        ds.sample(2)
    (root / "img0.png").unlink()  # existence is still checked
    with pytest.raises(UserError, match="not found"):
        FolderDataset(root, decode=False)


# -- the CLI flags -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from conftest import make_tiny_teacher

    return make_tiny_teacher(tmp_path_factory.mktemp("prompts") / "teacher")


def run_cli(argv, capsys):
    import torch

    from twostep.cli import main

    rc = main(["--threads", str(torch.get_num_threads()), *argv])  # keep the test's thread count
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_sample_prompts_file_is_the_same_grid_as_prompt_flags(teacher, tmp_path, capsys):
    f = case(tmp_path, "p.jsonl", b'{"prompt": "a red circle"}\n\n{"prompt": 3}\n{"prompt": "a blue square"}\n'
             b'{"prompt": "unused third"}\n')
    common = ["sample", "--model", str(teacher), "--seeds-per-prompt", "2", "--scale", "1"]
    rc, _, err = run_cli([*common, "--prompt", "a red circle", "--prompt", "a blue square", "--out",
                          str(tmp_path / "a.png")], capsys)
    assert rc == 0, err
    rc, so, err = run_cli([*common, "--prompts", str(f), "--rows", "2", "--skip-bad", "--out", str(tmp_path / "b.png")],
                          capsys)
    assert rc == 0 and "4 images" in so and "skipped 2 of 4 prompt lines" in err
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    rc, _, err = run_cli([*common, "--prompts", str(f), "--out", str(tmp_path / "c.png")], capsys)
    assert rc == 2 and "line 2: empty line" in err and "--skip-bad" in err and not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("argv,needle", [
    (["sample", "--model", "M", "--prompt", "a", "--prompts", "F", "--out", "o.png"], "give one of --prompt"),
    (["sample", "--model", "M", "--prompt", "a", "--prompt-key", "k", "--out", "o.png"], "go with --prompts"),
    (["teacher", "cache", "--teacher", "T", "--num", "2", "--out", "c"], "give either --data"),
    (["teacher", "cache", "--teacher", "T", "--data", "shapes", "--prompts", "F", "--num", "2", "--out", "c"],
     "give either --data"),
    (["teacher", "cache", "--teacher", "T", "--data", "shapes", "--prompt-key", "k", "--num", "2", "--out", "c"],
     "--prompt-key goes with --prompts"),
])
def test_flag_combinations_are_refused_in_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and needle in err and err.count("\n") == 1


def test_seeds_per_prompt_range_and_help(capsys):
    from twostep.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["teacher", "cache", "--teacher", "T", "--prompts", "F", "--num", "2", "--out",
                                   "c", "--seeds-per-prompt", "0"])
    assert e.value.code == 2 and "--seeds-per-prompt" in capsys.readouterr().err
    for argv in (["teacher", "cache", "--help"], ["sample", "--help"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        h = " ".join(capsys.readouterr().out.split())
        assert "--prompts FILE" in h and "--prompt-key KEY" in h and "--skip-bad" in h and "--seeds-per-prompt" in h
        assert ".parquet" in h


def test_teacher_cache_from_a_prompt_file(teacher, tmp_path, capsys):
    from twostep.teacher.cache import load_cache

    f = write(tmp_path / "p.csv", PROMPTS[:30], key="caption")
    out = tmp_path / "cache"
    rc, _, err = run_cli(["teacher", "cache", "--teacher", str(teacher), "--prompts", str(f), "--num", "5",
                          "--seeds-per-prompt", "2", "--seed", "1", "--out", str(out), "--no-progress"], capsys)
    assert rc == 0, err
    want = read_prompts(f, 5, seed=1, split="train", seeds_per_prompt=2)
    assert load_cache(out).captions == want and want[0] == want[1] != want[2]
    rc, _, err = run_cli(["teacher", "cache", "--teacher", str(teacher), "--prompts", str(f), "--prompt-key",
                          "nope", "--num", "5", "--out", str(tmp_path / "c2"), "--no-progress"], capsys)
    assert rc == 2 and "no column 'nope'" in err and not (tmp_path / "c2").exists()


def test_cache_and_eval_print_the_split_and_refuse_a_short_one_before_any_weight(teacher, tmp_path, capsys,
                                                                                 monkeypatch):
    """Issue 27: `teacher cache` and `eval` print the file's split sizes; a draw larger than the split is refused
    (exit 2, one line) before the teacher or model is read; --allow-repeats builds it and the manifest counts the
    repeats."""
    import twostep.sampling as S
    import twostep.teacher.cache as C

    f = write(tmp_path / "p.txt", PROMPTS)   # 300 prompts
    held = sum(HOLDOUT.held_out(p) for p in PROMPTS)
    real_load = C.load_teacher
    monkeypatch.setattr(C, "load_teacher", lambda *a, **k: pytest.fail("the teacher was read"))
    monkeypatch.setattr(S, "load_generator", lambda *a, **k: pytest.fail("the model was read"))
    argv = ["teacher", "cache", "--teacher", str(teacher), "--prompts", str(f), "--num", "300", "--out",
            str(tmp_path / "c"), "--no-progress"]
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2 and err.count("\n") == 1 and f"{300 - held} prompts in the training split" in err
    assert "needs 300 distinct" in err and not (tmp_path / "c").exists()
    rc, out, err = run_cli(["eval", "--model", str(teacher), "--prompts", str(f), "--num", str(held + 5),
                            "--no-progress"], capsys)
    assert rc == 2 and err.count("\n") == 1 and f"{held} prompts in the held-out split" in err
    assert f"needs {held + 5} distinct" in err and f"about {(held + 5) * 20:,} prompts" in err

    monkeypatch.setattr(C, "load_teacher", real_load)
    rc, out, err = run_cli(argv + ["--allow-repeats"], capsys)
    assert rc == 0, err
    assert f"prompts: {f}: 300 prompts ({300 - held} for training, {held} held out); drew 300 from the train " \
           f"split: {300 - held} distinct, {held} repeats (--allow-repeats)" in out
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert (m["prompt_draw"]["repeats"], m["prompt_draw"]["distinct"]) == (held, 300 - held)
    assert "--allow-repeats" in m["command"]


def test_skip_bad_summary_is_said_once_under_a_launcher(tmp_path, capsys, monkeypatch):
    """Every rank of a launcher reads the prompt file; only rank 0 prints the skipped-lines warning."""
    p = case(tmp_path, "p.jsonl", b'{"text": "a"}\nnot json\n{"text": "b"}\n')
    monkeypatch.setenv("RANK", "1")
    assert head_prompts(p, skip_bad=True) == ["a", "b"] and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert head_prompts(p, skip_bad=True) == ["a", "b"] and "skipped 1 of 3" in capsys.readouterr().err
