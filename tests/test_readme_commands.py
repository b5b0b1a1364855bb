"""Every command the docs print, run as printed (issue 27).

A fenced shell block preceded by the line `<!-- verbatim -->` (in README.md or docs/*.md) is run here, command by
command, at a tiny size. Only model, data and size names change (SIZES and NAMES below; nothing else):

- The model and data are made in a scratch working folder UNDER THEIR DOCUMENTED NAMES, so the commands name them
  as printed: `Z-Image-Turbo` is a tiny random-weight ZImagePipeline saved with save_pretrained; `prompts.jsonl`,
  `prompts.parquet` (column `caption`) and `my_prompts.txt` hold the same PROMPTS; `my_folder` is a small folder
  dataset; `pt_inception-2015-12-05-6726825d.pth` is a random FID Inception saved in the published format and
  `pt_inception.safetensors` its conversion; `clip-vit-large-patch14` is a tiny random CLIPModel folder;
  `configs/` holds the documented presets with tiny training sizes (TINY_TRAIN; the discriminator on the tiny
  model's one block) and links `configs/accelerate`.
- NAMES: the placeholder `RUN` is the lora run folder step 3 writes.
- SIZES: counts (`--num`, `--rows`, `--minutes`, the launchers' process counts) at a tiny value.

`twostep ...` lines run in this process through `twostep.cli.main` (the console script's entry point, checked
against pyproject.toml); multi-process lines (`twostep launch`, `accelerate launch`, `torchrun`) run as
subprocesses with the real launcher. Blocks
of "Distil your own Z-Image-Turbo" run first, in order (they make the run the other blocks use). A command that
exits non-zero fails the test. (That the launcher's 2-process cache is byte-identical to a 1-process one, and
resumes one, is tests/test_cache_scale.py, through the same launcher.)
"""

import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- verbatim -->"
SECTION = "## Distil your own Z-Image-Turbo"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# (subcommand, flag) -> the test's value
SIZES = {("teacher cache", "--num"): "4", ("eval", "--num"): "10",
         ("sample", "--num"): "2", ("sample", "--rows"): "2",
         ("metrics train", "--minutes"): "0.01"}
LAUNCH_SIZES = {"--processes": "2", "--num_processes": "2", "--nproc_per_node": "2", "--nproc-per-node": "2"}
NAMES = {"RUN": "runs/zit-lora"}
TINY_TRAIN = {"updates": 2, "d_warmup": 1, "warmup": 1, "grad_accum": 1, "checkpoint_every": 0, "grid_every": 0,
              "log_every": 1}
PROMPTS = [f"a {c} {a} {p}, {s}" for c in ("red", "blue", "green", "golden", "pale")
           for a in ("fox", "owl", "cat", "boat", "tower", "tree") for p in ("at dawn", "in the rain", "on a hill",
                                                                           "by the sea")
           for s in ("photo", "oil painting", "sketch", "render", "woodcut")]   # 600: 30 held out (>= 10 for eval)


# ---- the blocks -----------------------------------------------------------------------------------------------

def marked_blocks(path: Path) -> list[dict]:
    """The fenced blocks that follow a MARK line: {file, line, section, text}. A mark not followed by a fence is an
    error (a marker must not silently mark nothing)."""
    lines = path.read_text().splitlines()
    out, section = [], None
    for i, line in enumerate(lines):
        if line.startswith("## "):
            section = line.strip()
        if line.strip() != MARK:
            continue
        fence = lines[i + 1] if i + 1 < len(lines) else ""
        assert re.fullmatch(r"```(bash|sh|shell)?", fence.strip()), f"{path.name}:{i + 1}: {MARK} not before a fence"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
        out.append({"file": path.name, "line": i + 2, "section": section, "text": "\n".join(lines[i + 2:end])})
    return out


def commands(block: str) -> list[list[str]]:
    """The block's commands as argv lists (backslash continuations joined, comments dropped)."""
    return [argv for line in block.replace("\\\n", " ").splitlines() if (argv := shlex.split(line, comments=True))]


def subcommand(argv: list[str]) -> str:
    words = [w for w in argv if not w.startswith("-")][:2]
    return " ".join(words) if words and words[0] in ("teacher", "metrics") else words[0]


def resize(argv: list[str], table: dict, cmd: str | None = None) -> list[str]:
    out = list(argv)
    for i, w in enumerate(out[:-1]):
        key = (cmd, w) if cmd is not None else w
        if key in table:
            out[i + 1] = table[key]
    return [NAMES.get(w, w) for w in out]


def all_blocks() -> list[dict]:
    blocks = [b for p in DOCS for b in marked_blocks(p)]
    return [b for b in blocks if b["section"] == SECTION] + [b for b in blocks if b["section"] != SECTION]


def test_the_distil_section_has_marked_blocks():
    """Deleting the markers (or renaming the section) cannot make the verbatim test pass by running nothing: the
    section's blocks include the dry-run, the 2-process cache, both distills, the eval and the export."""
    mine = [argv for b in all_blocks() if b["section"] == SECTION for argv in commands(b["text"])]
    text = [" ".join(a) for a in mine]
    assert any(re.match(r"twostep launch --processes \d+ teacher cache ", t) for t in text), text
    for needle in ("twostep distill --dry-run", "twostep distill --teacher", "twostep launch --processes 8 distill",
                   "twostep eval", "twostep export"):
        assert any(needle in t for t in text), (needle, text)


# ---- the scratch folder ---------------------------------------------------------------------------------------

def make_world(cwd: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_extractors import _clip_folder, _folder_dataset
    from test_pipeline_teacher import build_tiny_pipeline

    from twostep.metrics import extractors as X

    build_tiny_pipeline(cwd / "Z-Image-Turbo")
    (cwd / "prompts.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    pq.write_table(pa.table({"caption": PROMPTS}), cwd / "prompts.parquet")
    (cwd / "my_prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    _folder_dataset(cwd / "my_folder", n=24, res=32)
    torch.manual_seed(0)
    torch.save(X.FIDInceptionV3().eval().state_dict(), cwd / "pt_inception-2015-12-05-6726825d.pth")
    X.convert_inception(cwd / "pt_inception-2015-12-05-6726825d.pth", cwd / "pt_inception.safetensors")
    (cwd / "hf").mkdir()
    _clip_folder(cwd / "hf").rename(cwd / "clip-vit-large-patch14")
    (cwd / "configs").mkdir()
    (cwd / "configs" / "accelerate").symlink_to(ROOT / "configs" / "accelerate")
    for p in (ROOT / "configs").glob("zimage-turbo-*.yaml"):
        cfg = yaml.safe_load(p.read_text())
        cfg["train"].update(TINY_TRAIN, batch_size=2)
        cfg.setdefault("disc", {})["blocks"] = [0]
        (cwd / "configs" / p.name).write_text(yaml.safe_dump(cfg))


# ---- running them ---------------------------------------------------------------------------------------------

def cpu_s() -> float:
    """CPU seconds of this process and its finished children (the cost of a command on a loaded machine)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def test_console_script_is_cli_main():
    """The in-process runs call the same entry point as the `twostep` console script."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["twostep"] == "twostep.cli:main"


def test_documented_commands_run_as_printed(tmp_path, monkeypatch, capsys):
    from twostep.cli import main

    cwd = tmp_path / "work"
    cwd.mkdir()
    make_world(cwd)
    env = {"TWOSTEP_CACHE": str(tmp_path / "twostep-cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(cwd)
    ran, times = [], []

    def inproc(argv, what):
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(True)  # a fresh process as printed: no Accelerator left by earlier tests
        monkeypatch.setattr(sys, "argv", ["twostep", *argv])
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
        cap = capsys.readouterr()
        assert rc == 0, f"{what}: exit {rc}\n{cap.out[-2000:]}\n{cap.err[-3000:]}"

    for b in all_blocks():
        for argv in commands(b["text"]):
            what = f"{b['file']}:{b['line']}: {shlex.join(argv)}"
            t0, c0 = time.time(), cpu_s()
            if argv[0] == "twostep" and argv[1] != "launch":
                inproc(resize(argv[1:], SIZES, subcommand(argv[1:])), what)
            elif argv[:2] in (["accelerate", "launch"], ["twostep", "launch"]) or argv[0] == "torchrun":
                if argv[1] == "launch" and argv[0] == "twostep":
                    k = 4 if argv[2] == "--processes" else 3
                else:
                    assert "-m" in argv and argv[argv.index("-m") + 1] == "twostep", what
                    k = argv.index("-m") + 2
                full = resize(argv[:k], LAUNCH_SIZES) + resize(argv[k:], SIZES, subcommand(argv[k:]))
                p = subprocess.run(full, capture_output=True, text=True, timeout=600)
                assert p.returncode == 0, f"{what}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
            else:
                pytest.fail(f"{what}: no runner for {argv[0]!r} (twostep, twostep launch, accelerate launch, torchrun)")
            ran.append(what)
            times.append(round(time.time() - t0, 1))
            if os.environ.get("TWOSTEP_TIMES"):  # wall and CPU seconds per command
                with open(os.environ["TWOSTEP_TIMES"], "a") as f:
                    f.write(f"{times[-1]:6.1f} s  {cpu_s() - c0:6.1f} cpu-s  {what}\n")
    print("\n".join(f"{t:6.1f} s  {w}" for t, w in zip(times, ran)), file=sys.__stderr__)
    assert len(ran) >= 8


# ---- bad input under the launcher --------------------------------------------------------------------------------

def test_bad_input_under_the_launcher_is_one_line_before_any_weight(tmp_path, capsys, monkeypatch):
    """The README's watch flag (`--set train.eval_every=N`) on a prompt-file cache without train.eval_features,
    started in 2 processes by `twostep launch`: one `error:` line (rank 0's), exit 2, no launcher report, and
    before any weight is read (the teacher's transformer weights here are garbage: reading them fails otherwise)."""
    from test_pipeline_teacher import build_tiny_pipeline

    from twostep.teacher.cache import build_cache

    pipe = build_tiny_pipeline(tmp_path / "pipe")
    (tmp_path / "p.txt").write_text("a red fox\na blue owl\n")
    cache = build_cache(pipe, None, 2, tmp_path / "cache", prompts=tmp_path / "p.txt", progress=False)
    for f in (pipe / "transformer").glob("*.safetensors"):
        f.write_bytes(b"\0" * f.stat().st_size)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TWOSTEP_CACHE": str(tmp_path / "tc")}
    p = subprocess.run([str(Path(sys.executable).parent / "twostep"), "launch", "--processes", "2", "distill",
                        "--teacher", str(pipe), "--cache", str(cache), "--out", str(tmp_path / "run"),
                        "--set", "train.eval_every=250", "--no-progress"],
                       capture_output=True, text=True, timeout=600, env=env)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr[-4000:]
    assert err[0].startswith("error: train.eval_every: this cache's prompts (a prompt file) have no committed "
                             "feature net; set train.eval_features") and "rank" not in err[0]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    # in one process, the config's other checks against the teacher's config files come before its weights too
    from twostep.cli import main

    monkeypatch.setenv("TWOSTEP_CACHE", str(tmp_path / "tc"))
    rc = main(["distill", "--teacher", str(pipe), "--cache", str(cache), "--out", str(tmp_path / "run"),
               "--set", "disc.blocks=[0, 5]", "--no-progress"])
    assert rc == 2 and "disc.blocks=[0, 5]: block 5 is out of range" in capsys.readouterr().err


# ---- help texts that state a rule: pinned against the code -----------------------------------------------------

def test_sample_help_states_the_seed_rule_the_code_uses(tmp_path, monkeypatch, capsys):
    """`sample --help` says row j draws its --num noises in one batch from a generator seeded --seed + S·j; the
    noises `sample` draws are exactly those (S read from the help text)."""
    from conftest import make_tiny_teacher

    from twostep.cli import build_parser, main
    from twostep.model import SampleSpace

    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    stride = int(re.search(r"generator seeded --seed \+ (\d+)·j", helptext).group(1))
    assert "row j (counting from 0) draws its --num noises in one batch" in helptext
    drawn, noise = [], SampleSpace.noise

    def spy(self, n, seed):
        drawn.append((n, seed))
        return noise(self, n, seed)
    monkeypatch.setattr(SampleSpace, "noise", spy)
    teacher = make_tiny_teacher(tmp_path / "t")
    assert main(["sample", "--model", str(teacher), "--prompt", "a", "--prompt", "b", "--prompt", "c", "--num", "2",
                 "--seed", "7", "--steps", "1", "--scale", "1", "--out", str(tmp_path / "g.png")]) == 0
    assert drawn == [(2, 7), (2, 7 + stride), (2, 7 + 2 * stride)]
