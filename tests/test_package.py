"""The package as a user meets it: its version, single-sourced."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import twostep
from twostep.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_single_sourced_and_printed(capsys):
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "twostep.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", twostep.__version__)
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"twostep {twostep.__version__}"
    # the CHANGELOG's newest entry is this version
    first = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M).group(1)
    assert first == twostep.__version__


HEAVY = ("torch", "diffusers", "transformers", "numpy")


def test_help_and_argument_errors_import_no_heavy_library():
    """`twostep --help`, every command's --help, a bad flag and a bad value: parsed and answered without torch,
    diffusers, transformers or numpy (each command imports what it runs inside its function)."""
    code = textwrap.dedent("""
        import contextlib, io, json, sys
        from twostep.cli import build_parser, main
        p = build_parser()
        cmds = []
        def walk(parser, prefix):
            subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
            if not subs:
                cmds.append(prefix)
            for a in subs:
                for name, sp in a.choices.items():
                    walk(sp, prefix + [name])
        walk(p, [])
        argvs = [["--help"], ["--version"], ["--no-such-flag"], ["distill", "--no-such-flag"],
                 ["eval", "--model", "m", "--num", "3"], ["sample", "--model", "m"]] + [c + ["--help"] for c in cmds]
        codes = []
        for argv in argvs:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    main(argv)
                    codes.append(None)
                except SystemExit as e:
                    codes.append(e.code)
        print(json.dumps({"cmds": cmds, "codes": codes, "heavy": [m for m in %r if m in sys.modules]}))
    """ % (HEAVY,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(r["cmds"]) >= 11 and ["teacher", "train"] in r["cmds"] and ["distill"] in r["cmds"], r["cmds"]
    assert r["codes"][:6] == [0, 0, 2, 2, 2, 2] and set(r["codes"][6:]) == {0}, r["codes"]
    assert r["heavy"] == [], f"parsing imported {r['heavy']}"


def test_flag_defaults_read_from_source_equal_the_library():
    """The CLI reads its flags' defaults from the library's source (no import); each equals the real one."""
    import importlib
    import inspect

    from twostep import cli

    calls = [n for n in ast.walk(ast.parse((ROOT / "twostep" / "cli.py").read_text()))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("default", "static")
             and all(isinstance(a, ast.Constant) for a in n.args)]
    assert len(calls) >= 30
    for c in calls:
        ref, name = (a.value for a in c.args)
        if c.func.id == "default":
            mod, fn = ref.split(":")
            want = inspect.signature(getattr(importlib.import_module(f"twostep.{mod}"), fn)).parameters[name].default
            assert cli.default(ref, name) == want, (ref, name)
        else:
            assert cli.static(ref, name) == getattr(importlib.import_module(f"twostep.{ref}"), name), (ref, name)
    with pytest.raises(LookupError):
        cli.default("teacher.cache:build_cache", "no_such_parameter")


def test_config_presets_found_by_name(capsys, monkeypatch, tmp_path):
    """The presets are package data (twostep/presets), found by name; configs/NAME.yaml in the repository is the
    same file; --config with a path still works; an unknown name lists the presets."""
    from twostep.errors import UserError
    from twostep.paths import PRESETS, committed_config, config_file, preset_names

    monkeypatch.delenv("TWOSTEP_CONFIGS", raising=False)
    monkeypatch.chdir(ROOT)
    names = set(preset_names())
    assert {"zimage-turbo-lora-1gpu", "zimage-turbo-full-fsdp8", "turbopp", "demo-defaults"} <= names
    for name in names:
        assert (ROOT / "configs" / f"{name}.yaml").read_bytes() == (PRESETS / f"{name}.yaml").read_bytes()
    lora = PRESETS / "zimage-turbo-lora-1gpu.yaml"
    assert config_file("zimage-turbo-lora-1gpu") == config_file("zimage-turbo-lora-1gpu.yaml") == lora
    assert config_file("configs/turbopp.yaml") == Path("configs/turbopp.yaml")
    with pytest.raises(UserError, match="no preset of that name.*zimage-turbo-lora-1gpu"):
        config_file("no-such-preset")
    assert committed_config("demo-defaults.yaml", "--config") == PRESETS / "demo-defaults.yaml"
    monkeypatch.setenv("TWOSTEP_CONFIGS", str(tmp_path))      # searched first when set
    (tmp_path / "zimage-turbo-lora-1gpu.yaml").write_text("method: turbopp\n")
    assert config_file("zimage-turbo-lora-1gpu") == tmp_path / "zimage-turbo-lora-1gpu.yaml"
    with pytest.raises(UserError, match="--config"):
        committed_config("demo-defaults.yaml", "--config")
    monkeypatch.delenv("TWOSTEP_CONFIGS")

    teacher = str(ROOT / "models" / "teacher-shapes")
    outs = []
    for c in ("zimage-turbo-lora-1gpu", "configs/zimage-turbo-lora-1gpu.yaml"):
        assert main(["distill", "--dry-run", "--teacher", teacher, "--config", c]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and "decoupling: lora" in outs[0]
    assert main(["distill", "--dry-run", "--teacher", teacher, "--config", "zimage-turbo-lora"]) == 2
    assert "no preset of that name" in capsys.readouterr().err


PROCESS_WORDS = re.compile(
    r"\b[Ss]essions?[ -]?\d"                                  # session 4, session-4, sessions 3–5
    r"|\b(?:[Tt]his|[Tt]hat|later|earlier|next|previous|last|end of) session\b"
    r"|\b[Ss]prints?\b"
    r"|\b[Ss]tatus \(\d{4}-\d\d"                               # a dated status block
    r"|\b[Ii]ssues? #?\d+")                                    # a work item's number


def test_product_files_do_not_speak_of_how_they_were_developed():
    """README, docs and the package describe the product as it is; its history is CHANGELOG.md and git's."""
    for s in ("## Status (2026-12-01, session 11)", "the session-4 default", "(issue 18)", "sprint 3", "this session"):
        assert PROCESS_WORDS.search(s), s
    for s in ("runs_session4_default/", "an InferenceSession", "status (see docs)", "tissue 3"):
        assert not PROCESS_WORDS.search(s), s
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "twostep").rglob("*.py")),
             *sorted((ROOT / "twostep").rglob("*.yaml"))]
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()[:120]}" for f in files
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if PROCESS_WORDS.search(line)]
    assert not hits, "development-process words in product files:\n" + "\n".join(hits)


def test_readme_is_a_product_page():
    """≤ 250 lines, with its picture (a committed file), the real-job section and links that resolve; the study
    tables live in docs/benchmarks.md (benchmarks/update_readme.py writes them there)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert "## Distil your own Z-Image-Turbo" in text and "<!-- BEGIN" not in text
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert "benchmarks/results/readme_picture.png" in links
    missing = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert not missing, missing
    bench = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    for name in ("teacher_gap", "students", "runs", "budget_curves", "demo", "memory", "teacher_guidance"):
        assert f"<!-- BEGIN {name} -->" in bench and f"<!-- END {name} -->" in bench, name
    for f in sorted((ROOT / "docs").glob("*.md")):
        for link in re.findall(r"\]\(([^)#]+)\)", f.read_text(encoding="utf-8")):
            assert "://" in link or (f.parent / link).exists(), f"{f.name}: {link}"
