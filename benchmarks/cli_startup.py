"""Start-up time of the command line, as a ratio to a bare interpreter (`python -c pass`).

    python benchmarks/cli_startup.py [--repeats 7] [--out benchmarks/results/cli_startup.md]

Times, as the median wall time of --repeats fresh processes each: `python -c pass`, `twostep --version`,
`twostep --help`, `twostep distill --help`, an argument error (`twostep distill --no-such-flag`, exit 2) and, for
scale, `python -c "import torch"` (what every command that computes pays). The console script is the one beside
this interpreter (`.venv/bin/twostep`), else `python -m twostep`. Prints a markdown table and writes it to --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _twostep() -> list[str]:
    script = Path(sys.executable).with_name("twostep")
    if script.exists():
        return [str(script)]
    found = shutil.which("twostep")
    return [found] if found else [sys.executable, "-m", "twostep"]


def median_seconds(cmd: list[str], repeats: int, want_rc: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        times.append(time.perf_counter() - t)
        if r.returncode != want_rc:
            raise SystemExit(f"{' '.join(cmd)}: exit {r.returncode}, expected {want_rc}")
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cli_startup.md")
    a = ap.parse_args()
    tw = _twostep()
    rows = [("`python -c pass`", [sys.executable, "-c", "pass"], 0),
            ("`twostep --version`", tw + ["--version"], 0),
            ("`twostep --help`", tw + ["--help"], 0),
            ("`twostep distill --help`", tw + ["distill", "--help"], 0),
            ("`twostep distill --no-such-flag` (exit 2)", tw + ["distill", "--no-such-flag"], 2),
            ("`python -c \"import torch\"` (for scale)", [sys.executable, "-c", "import torch"], 0)]
    median_seconds(rows[2][1], 1, 0)  # warm the file cache
    base = None
    lines = ["| command | median wall s | ÷ `python -c pass` |", "|---|---|---|"]
    for name, cmd, rc in rows:
        s = median_seconds(cmd, a.repeats, rc)
        base = base or s
        lines.append(f"| {name} | {s:.3f} | {s / base:.1f} |")
    try:
        load = f"{os.getloadavg()[0]:.1f}"
    except OSError:
        load = "n/a"
    lines.append("")
    lines.append(f"`python benchmarks/cli_startup.py --repeats {a.repeats}`: median of {a.repeats} fresh processes each; "
                 f"Python {platform.python_version()}, {os.cpu_count()} CPU cores, 1-min load average {load} at the "
                 f"end; console script {' '.join(Path(x).name for x in tw)}.")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)


if __name__ == "__main__":
    main()
