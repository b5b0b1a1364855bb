"""The package as a user meets it: its version, single-sourced."""

from __future__ import annotations

import re
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
