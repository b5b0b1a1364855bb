"""The comparison sweep's summary step (benchmarks/sweep_outputs.py, run by benchmarks/run.py) on synthetic
records and tiny PNGs: runs.md, the plots and comparison.html; no training."""

import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import sweep_outputs as so  # noqa: E402
from twostep.images import save_png  # noqa: E402

BUDGET = {"updates": 600, "batch": 16, "cache_num": 2048, "num": 1000}


def _png(path):
    save_png(np.random.default_rng(0).integers(0, 255, (8, 6, 3), dtype=np.uint8), path)


def _record(runs, bench, method, seed, fd, **over):
    r = {"fd": fd, "kid": 0.01 + seed * 1e-3, "swd": 50.0 + seed, "alignment": 0.4, "psnr_vs_teacher": 20.0,
         "diversity": 2.0, "nfe": 2, "sec_per_image": 0.01, "train_sec_per_update": 1.0, "peak_rss_mb": 900.0,
         "method": method, "benchmark": bench, "seed": seed, **BUDGET, **over}
    (runs / f"{so.run_stem(bench, method, seed)}.json").write_text(json.dumps(r))


def _gap(gap, bench, setting, seed, fd, nfe):
    (gap / f"{bench}-{setting}-n1000-seed{seed}.json").write_text(json.dumps(
        {"fd": fd, "nfe": nfe, "num": 1000, "seed": seed, "benchmark": bench, "setting": setting}))


class _Srcs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.img, self.href = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.img.append(a["src"])
        if tag == "a":
            self.href.append(a["href"])


@pytest.fixture
def sweep(tmp_path):
    """shapes: turbopp ×3 seeds, ladd ×2, one ablation, no dmd2; photos: turbopp seed 1 only; the teacher-gap
    records of both; grids for most runs and two of the three shapes reference grids."""
    res, runs, gap = tmp_path / "results", tmp_path / "results" / "runs", tmp_path / "gap"
    runs.mkdir(parents=True)
    gap.mkdir()
    for k in range(3):
        _record(runs, "shapes", "turbopp", k, 3.0 + 0.1 * k)
        _png(runs / f"{so.run_stem('shapes', 'turbopp', k)}.png")
    for k in range(2):
        _record(runs, "shapes", "ladd", k, 4.0 + 0.2 * k)
    _png(runs / "shapes-ladd-seed0.png")
    _record(runs, "shapes", "ablate-no-adv (regression only)", 0, 5.0)
    _png(runs / f"{so.run_stem('shapes', 'ablate-no-adv (regression only)', 0)}.png")
    _record(runs, "shapes", "dmd2", 0, 9.0, updates=2)  # another budget: not part of this sweep
    _record(runs, "photos", "turbopp", 1, 7.0)
    _png(runs / "photos-turbopp-seed1.png")
    _png(runs / "shapes-teacher-8step.png")
    _png(runs / "shapes-naive-2step-nocfg.png")
    (runs / "shapes-grids.json").write_text(json.dumps({
        "prompts": ["a red circle", "a <blue> square"], "seed": 0, "noises_per_prompt": 4,
        "grids": {"teacher-8step": {"label": "teacher 8-step (g=0)", "nfe": 8}}}))
    for b in ("shapes", "photos"):
        for k in range(3):
            _gap(gap, b, "teacher-8step", k, 2.0 + 0.1 * k, 8)
            _gap(gap, b, "naive-2step-nocfg", k, 8.0 + 0.1 * k, 2)
            _gap(gap, b, "naive-2step-cfg", k, 6.0 + 0.1 * k, 4)
        (gap / f"{b}-teacher-8step-n1000-seed9.json").write_text(json.dumps(
            {"fd": 99.0, "nfe": 8, "num": 300, "seed": 9, "benchmark": b, "setting": "teacher-8step"}))
    recs = so.load_records(runs, BUDGET)
    written = so.summarize(recs, res, runs, gap, "note: 600 updates", eval_num=1000)
    assert [len(so.load_gap(gap, 1000)[("shapes", s)]) for s in so.REFERENCES] == [3, 3, 3]  # not the 300-image one
    assert not so.load_gap(gap, 20)  # FD at another sample count is not comparable
    return res, runs, recs, written


def test_summary_writes_plots_table_and_html(sweep):
    res, runs, recs, written = sweep
    assert {r["method"] for r in recs} == {"turbopp", "ladd", "ablate-no-adv (regression only)"}
    for b in ("shapes", "photos"):
        for name in (f"fd_vs_nfe_{b}.png", f"ablations_{b}.png"):
            assert (res / name).stat().st_size > 1000 and written[name] == res / name
    page = (res / "comparison.html").read_text()
    md = (res / "runs.md").read_text()
    # mean ± std per method (3 seeds of turbopp on shapes: FD 3.0, 3.1, 3.2)
    assert re.search(r"\| shapes \| turbopp \| 3 \| 3\.1 ± 0\.1 \|", md), md
    assert re.search(r"<td>turbopp</td><td>3</td><td>3\.1 ± 0\.1</td>", page)
    for text in (md, page):
        assert "ladd" in text and "4.1 ± 0.14" in text  # 2 seeds: FD 4.0, 4.2
    assert "note: 600 updates" in md
    # FD minus turbopp's at the same seed: ladd seeds 0, 1 → 4.0 − 3.0, 4.2 − 3.1; the ablation's seed 0 → 2.0
    assert re.search(r"\| shapes \| ladd \| 2 \| 4\.1 ± 0\.14 \| 1\.05 ± 0\.071 \|", md), md
    assert re.search(r"\| ablate-no-adv \(regression only\) \| 1 \| 5 \| 2 \|", md), md
    assert "<td>photos</td>" not in page and re.search(r"<td>turbopp</td><td>1</td><td>7</td><td>0</td>", page)


def test_html_references_every_grid_and_only_existing_files(sweep):
    res, runs, recs, written = sweep
    page = (res / "comparison.html").read_text()
    p = _Srcs()
    p.feed(page)
    refs = p.img + p.href
    assert all(not Path(s).is_absolute() and (res / s).exists() for s in refs), refs  # relative and present
    grids = {f"runs/{f.name}" for f in runs.glob("*.png")} - {"runs/shapes-dmd2-seed0.png"}
    assert grids <= set(refs), grids - set(refs)
    # side by side in page order: teacher | naive | methods (by FD); the seed-0 grid is the shown one
    shapes_imgs = [s for s in p.img if "/shapes-" in s]
    assert shapes_imgs[:3] == ["runs/shapes-teacher-8step.png", "runs/shapes-naive-2step-nocfg.png",
                               "runs/shapes-turbopp-seed0.png"]
    assert {"fd_vs_nfe_shapes.png", "ablations_shapes.png", "fd_vs_nfe_photos.png"} <= set(p.img)
    assert "photos-turbopp-seed1.png" in page  # no seed 0 yet: its lowest seed
    assert "teacher 8-step (g=0), 8 NFE" in page and "a &lt;blue&gt; square" in page
    assert "data-images-ok" in page or "imagesOk" in page  # report.py's images-load check


def test_missing_methods_are_absent(sweep):
    res, runs, recs, written = sweep
    page, md = (res / "comparison.html").read_text(), (res / "runs.md").read_text()
    assert "dmd2" not in page and "dmd2" not in md  # only another budget's record
    assert "diffusion2gan" not in page and "naive-2step-cfg.png" not in page  # never run / no grid yet
    photos = page[page.index("<h2>photos</h2>"):page.index("<h2>shapes</h2>")]
    assert "ladd" not in photos and "teacher-8step.png" not in photos


def test_empty_sweep_writes_an_empty_page(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    written = so.summarize([], tmp_path, runs, tmp_path / "nogap", eval_num=1000)
    assert written["comparison.html"].exists() and set(written) == {"runs.md", "comparison.html"}


CHROMIUM = __import__("shutil").which("chromium") or __import__("shutil").which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it with apt)")
def test_comparison_images_load_in_chromium(sweep, tmp_path):
    from test_report import _render

    res = sweep[0]
    dom = _render(res / "comparison.html", tmp_path)
    assert 'data-images-ok="true"' in dom, dom[:500]


def test_run_summary_only_and_readme_links(sweep, tmp_path, monkeypatch):
    import run
    import update_readme

    # run.py's summary step alone, on a results folder with the synthetic runs in it
    res = sweep[0]
    run.main(["--summary-only", "--out", str(res), "--data", "shapes"])
    assert "3.1 ± 0.1" in (res / "runs.md").read_text() and (res / "fd_vs_nfe_shapes.png").exists()
    # docs/benchmarks.md's runs block: the table, then links (from docs/) to the page and the plots that exist
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    (root / "benchmarks" / "results").symlink_to(res)
    (root / "docs").mkdir()
    (root / "docs" / "benchmarks.md").write_text("x\n<!-- BEGIN runs -->\nold\n<!-- END runs -->\ny\n")
    monkeypatch.setattr(update_readme, "ROOT", root)
    update_readme.main()
    block = (root / "docs" / "benchmarks.md").read_text().split("<!-- BEGIN runs -->")[1].split("<!-- END runs -->")[0]
    assert "old" not in block and "| shapes | turbopp | 3 |" in block
    assert "(../benchmarks/results/comparison.html)" in block
    for f in ("fd_vs_nfe_shapes.png", "ablations_shapes.png", "fd_vs_nfe_photos.png", "ablations_photos.png"):
        assert f"(../benchmarks/results/{f})" in block


def test_sample_eval_prompts_grid_is_the_eval_protocol(tiny_teacher, tmp_path, capsys):
    """`twostep sample --eval-prompts` (the sweep's grids): rows = eval's first test prompts, column 0 = the very
    images `twostep eval --seed 0` scores first; --prompt and --eval-prompts exclude each other."""
    import torch
    from PIL import Image

    from twostep.cli import main
    from twostep.data import get_dataset
    from twostep.evaluate import NOISE_OFFSET
    from twostep.sampling import load_generator
    from twostep.images import to_uint8

    out = tmp_path / "g.png"
    assert main(["--threads", "1", "sample", "--model", str(tiny_teacher), "--eval-prompts", "shapes", "--rows", "3",
                 "--num", "2", "--steps", "2", "--scale", "1", "--out", str(out)]) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (2 + 3 * 34, 2 + 2 * 34, 3)
    gen = load_generator(tiny_teacher, steps=2)
    caps = get_dataset("shapes", 32).sample(3, seed=0, split="test").captions
    with torch.no_grad():
        x = to_uint8(gen.decode(gen.generate(gen.encode(caps), gen.noise(3, NOISE_OFFSET)).x0))
    for i in range(3):
        assert np.array_equal(img[2 + 34 * i: 34 + 34 * i, 2:34], x[i])
    capsys.readouterr()
    assert main(["sample", "--model", str(tiny_teacher), "--eval-prompts", "shapes", "--prompt", "a",
                 "--out", str(tmp_path / "h.png")]) == 2
    assert "--eval-prompts" in capsys.readouterr().err


def test_study_set_reaches_every_variant_and_a_variants_own_change_wins(tmp_path, monkeypatch):
    """`run.py --set` is a study (every method at another σm, say): its change must be in every distill command
    and in the record's overrides, yet a variant that sets the same key keeps its one change."""
    import run

    a = run.parse_args(["--out", str(tmp_path), "--set", "student.sigma_mid=0.5", "--set", "train.lr_disc=0.002"])
    cmds = []
    monkeypatch.setattr(run, "ensure_cache", lambda *x, **k: tmp_path / "cache")
    monkeypatch.setattr(run, "run_child", lambda cmd, env, log: (cmds.append(cmd), (1, 0.0))[1])  # distill "fails"
    for variant in ("dmd2", "choice-sigma-mid-0.9"):
        assert run.one_run("shapes", variant, 0, a, tmp_path, {}, tmp_path / "log", tmp_path / "runs") is None
    sets = [[c[i + 1] for i, x in enumerate(c) if x == "--set"] for c in cmds]
    assert "student.sigma_mid=0.5" in sets[0] and "train.lr_disc=0.002" in sets[0]
    assert sets[0].index("student.sigma_mid=0.5") > sets[0].index("train.seed=0")  # after the budget's own
    assert "student.sigma_mid=0.9" in sets[1] and "student.sigma_mid=0.5" not in sets[1]
    assert run.study_sets(["student.sigma_mid=0.5"], ["student.sigma_mid=0.9"]) == ["student.sigma_mid=0.9"]


@pytest.mark.parametrize("argv, msg", [(["--set", "student.sigma_mid=0.5"], "--out"),
                                       (["--out", "x", "--set", "student.sigmamid=0.5"], "sigmamid"),
                                       (["--out", "x", "--set", "student.sigma_mid"], "key=value")])
def test_study_set_refuses_a_main_folder_and_bad_keys(argv, msg, capsys):
    import run

    with pytest.raises(SystemExit) as e:
        run.parse_args(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err
