"""Copy the benchmark-produced markdown tables into README.md between <!-- BEGIN name --> / <!-- END name -->
markers, so the README's numbers are never typed by hand.   .venv/bin/python benchmarks/update_readme.py"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES = {"teacher_gap": "benchmarks/results/teacher_gap.md", "demo": "benchmarks/results/demo.md",
          "teacher_guidance": "benchmarks/results/teacher_guidance.md"}


def main():
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, rel in TABLES.items():
        f = ROOT / rel
        if not f.exists():
            continue
        pat = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        text = pat.sub(lambda m: m.group(1) + f.read_text().rstrip() + "\n" + m.group(2), text)
    readme.write_text(text)


if __name__ == "__main__":
    main()
