"""The demo runs today's Turbo++ defaults, and its report shows the critic: accuracy curve, one at-chance line,
curves that fit a page, the metric table once."""

import dataclasses
from pathlib import Path

from PIL import Image

from twostep.demo import DEMO_CONFIG, run_demo
from twostep.methods import REGISTRY, default_config, load_config
from twostep.report import critic_curve, critic_line, critic_summary, log_curves, write_report

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BUDGET = {"updates", "batch_size", "grid_every", "checkpoint_every"}  # all the demo config may change


def test_demo_config_is_the_defaults_but_its_budget():
    """No legacy loss settings (paired regression, trajectory step-1 loss) and the default head start."""
    import inspect
    assert inspect.signature(run_demo).parameters["minutes"].default <= 9  # + cache + eval ≤ 15 min on 2 cores
    c, d = load_config(CONFIGS / DEMO_CONFIG), default_config()
    assert (c.method, c.loss, c.disc, c.student) == (d.method, d.loss, d.disc, d.student)
    differ = {f.name for f in dataclasses.fields(d.train) if getattr(c.train, f.name) != getattr(d.train, f.name)}
    assert differ <= BUDGET, differ
    assert (c.loss.paired_weight, c.loss.step1_loss, c.train.d_warmup) == (0.0, "adv", 300)


def _log(chance_from):
    warm = {"update": 0, "d_warmup": 300, "d_loss": 0.9, "d_acc_real": 0.9, "d_acc_fake": 0.8}
    recs = [{"update": u, "g_loss": 1.0 / u, "d_loss": 1.3, "d_acc_real": 0.5 if u >= chance_from else 0.9,
             "d_acc_fake": 0.5 if u >= chance_from else 0.8, "d_at_chance": u >= chance_from}
            for u in range(10, 110, 10)]
    return [warm, *recs]


def test_critic_summary_and_line():
    s = critic_summary(_log(chance_from=1000))
    assert (s["records"], s["at_chance"], s["sat_at_chance"], s["warmup_updates"]) == (10, 0, False, 300)
    assert critic_line(s).startswith("Critic: did not sit at chance: at chance (") and "0 of 10" in critic_line(s)
    s = critic_summary(_log(chance_from=50))  # 6 of 10 records at chance
    assert (s["at_chance"], s["sat_at_chance"]) == (6, True) and critic_line(s).startswith("Critic: sat at chance")
    assert "\n" not in critic_line(s)
    assert critic_summary([{"update": 10, "g_loss": 1.0}]) is None and "no accuracies" in critic_line(None)


def test_curves_fit_the_page_and_the_table_appears_once(tmp_path):
    log = _log(chance_from=50)
    assert log_curves(log, REGISTRY["turbopp"].log_keys, tmp_path / "loss.png")
    assert critic_curve(log, tmp_path / "critic.png")
    for f in ("loss.png", "critic.png"):
        assert Image.open(tmp_path / f).size[0] <= 800, f  # a page's width (4 panels at most per row)
    assert not critic_curve([{"update": 10, "g_loss": 1.0}], tmp_path / "none.png")
    rows = [{"model": "teacher", "nfe": 16, "fd": 1.0}, {"model": "student", "nfe": 2, "fd": 1.1}]
    write_report(tmp_path / "r.html", "t", [], [], rows, extra_images=[("Critic accuracy", "critic.png")])
    page = (tmp_path / "r.html").read_text()
    assert page.count("<table>") == 1 and "<pre>" not in page and "max-width:100%" in page
