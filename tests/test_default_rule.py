"""benchmarks/default_rule.py applies docs/default_rule.md's screen as written: on shapes a lead passes on FD
(below the default by more than τ) or on alignment (above by more than 0.02), on photos it must not be worse than
the default by more than τ, and on both its FD at 2000 must not exceed its own FD at 300 by more than τ."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import default_rule as R  # noqa: E402


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "RUNS", tmp_path)

    def put(data, method, fds, aligns=(0.25, 0.25, 0.25)):
        for u, fd, al in zip(R.BUDGETS, fds, aligns):
            (tmp_path / f"{data}-{method}-seed0-u{u}.json").write_text(json.dumps({"fd": fd, "alignment": al}))
    put("shapes", "turbopp", (11.0, 11.0, 11.7), (0.25, 0.22, 0.19))
    put("photos", "turbopp", (1.3, 1.9, 2.5))
    return put


def test_shapes_passes_on_fd_or_alignment_and_never_with_a_decay(runs):
    runs("shapes", "a", (11.0, 11.0, 11.0))                       # Δ −0.70 < −0.557
    runs("shapes", "b", (11.5, 11.5, 11.5), (0.25, 0.25, 0.211))  # Δ −0.2, alignment +0.021
    runs("shapes", "c", (11.5, 11.5, 11.5), (0.25, 0.25, 0.209))  # Δ −0.2, alignment +0.019
    runs("shapes", "d", (10.0, 10.5, 11.1))                       # Δ −0.6 but 300 → 2000 +1.1 > τ
    assert [R.screen("shapes", m)[0] for m in "abcd"] == ["passes", "passes", "fails", "fails"]
    assert R.screen("shapes", "none")[0] == "pending"


def test_photos_may_not_be_worse_than_the_default_beyond_tau(runs):
    runs("photos", "a", (2.6, 2.6, 2.64))   # +0.14 ≤ 0.144
    runs("photos", "b", (2.6, 2.6, 2.65))   # +0.15 > 0.144
    runs("photos", "c", (1.0, 1.5, 2.0))    # better than the default, but 300 → 2000 +1.0 > τ
    assert [R.screen("photos", m)[0] for m in "abc"] == ["passes", "fails", "fails"]


def test_revised_photos_screen_judges_fd_teacher_the_teacher_fd_and_no_decay_toward_the_teacher(runs, tmp_path, monkeypatch):
    """Revision 2: fd_teacher at 2000 within τ of the default rerun's, FD within τ of the teacher's 8-step FD, and
    fd_teacher at 2000 within τ of the lead's own at 300; a lead or default without fd_teacher is pending."""
    monkeypatch.setattr(R, "teacher_fd", lambda data: 3.16)

    def put(method, fds, fdts):
        for u, fd, ft in zip(R.BUDGETS, fds, fdts):
            (tmp_path / f"photos-{method}-seed0-u{u}.json").write_text(json.dumps({"fd": fd, "fd_teacher": ft}))
    assert R.screen_teacher("a")[0] == "pending"
    put(R.RERUN, (1.3, 1.9, 2.5), (1.0, 0.6, 0.50))
    put("a", (2.1, 2.5, 3.0), (0.7, 0.3, 0.34))    # closer to the teacher than the default, FD 3.0 ≤ 3.16 + τ
    put("b", (2.1, 2.5, 3.4), (0.7, 0.3, 0.34))    # FD 3.4 > 3.16 + 0.144
    put("c", (2.1, 2.5, 2.5), (0.7, 0.6, 0.65))    # fd_teacher +0.15 over the default's
    put("d", (2.1, 2.5, 2.5), (0.3, 0.3, 0.45))    # fd_teacher 300 → 2000 +0.15: away from the teacher
    assert [R.screen_teacher(m)[0] for m in "abcd"] == ["passes", "fails", "fails", "fails"]
    # the first screen is unchanged by it: "a" is worse than the default against the data
    assert R.screen("photos", "a")[0] == "fails"


def test_decision_pairs_by_seed_with_noise_the_larger_of_sd_and_tau(tmp_path, monkeypatch):
    """Decision: shapes m < −max(sd, τ) on FD; photos (revision 2) m < max(sd, τ) on fd_teacher against the
    default rerun, and FD within τ of the teacher's at every seed; a missing seed leaves it pending."""
    monkeypatch.setattr(R, "RUNS", tmp_path)
    monkeypatch.setattr(R, "teacher_fd", lambda data: 3.16)

    def put(data, method, seed, **rec):
        (tmp_path / f"{data}-{method}-seed{seed}-u2000.json").write_text(json.dumps(rec))
    for s, (base, mine) in enumerate([(11.7, 10.0), (12.8, 11.4)]):       # d = −1.7, −1.4: m −1.55, sd 0.21
        put("shapes", "turbopp", s, fd=base)
        put("shapes", "c", s, fd=mine)
    assert R.decide("c", (0, 1), revised=True)[0] == "pending"             # no photos yet
    put("shapes", "n", 0, fd=11.5)
    put("shapes", "n", 1, fd=12.6)                                         # d = −0.2, −0.2: shapes not met
    verdict, why = R.decide("n", (0, 1), revised=True)
    assert verdict == "not met" and "not met" in why[0] and "0 of 2" in why[1], why   # photos need not run
    for s, (base, mine) in enumerate([(0.7, 0.8), (0.6, 0.75)]):          # d = +0.1, +0.15: m 0.125 < τ 0.144
        put("photos", R.RERUN, s, fd=2.5, fd_teacher=base)
        put("photos", "c", s, fd=2.3, fd_teacher=mine)
    verdict, why = R.decide("c", (0, 1), revised=True)
    assert verdict == "met", why
    put("photos", "c", 1, fd=3.4, fd_teacher=0.75)                         # FD above the teacher's + τ at seed 1
    verdict, why = R.decide("c", (0, 1), revised=True)
    assert verdict == "not met" and "m < noise" in why[1] and why[1].endswith("above τ: not met"), why
    put("shapes", "c", 1, fd=12.6)                  # d = −1.7, −0.2: m −0.95, not below −sd (−1.06)
    for s in (0, 1):
        put("photos", "turbopp", s, fd=2.5)
    verdict, why = R.decide("c", (0, 1))            # the first rule: photos on FD against the data
    assert verdict == "not met" and "not met" in why[0] and "m < noise" in why[1], why


def test_a_combination_is_a_candidate_only_when_its_parts_passed_both_screens(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "COMBINATIONS", {"ab": ("a", "b")})
    monkeypatch.setattr(R, "LEADS", ("a", "b", "ab"))
    passing = {"ab": 9.9, "a": 10.0, "b": 11.0}
    monkeypatch.setattr(R, "screen", lambda data, m: ("passes", ""))
    monkeypatch.setattr(R, "record", lambda data, m, u, seed=0: {"fd": passing[m]})
    monkeypatch.setattr(R, "screen_teacher", lambda m: ("passes", ""))
    assert R.candidate(revised=True) == "ab"                        # lowest shapes FD, both parts passed
    monkeypatch.setattr(R, "screen_teacher", lambda m: ("fails" if m == "a" else "passes", ""))
    assert R.candidate(revised=True) == "b"                         # "a" failed photos: "ab" is not a candidate


def test_the_new_default_is_the_confirmed_candidate_with_the_lower_shapes_fd_over_seeds_0_to_4(monkeypatch):
    """Revision 3: both candidates are judged alone; a candidate counts only when met at seeds 0–1 and 2–4; of two
    confirmed, the lower mean shapes FD at 2000 over seeds 0–4 becomes the default; none confirmed keeps it."""
    stages = {"p": ("met", "met"), "q": ("met", "met"), "r": ("met", "not met"), "s": ("met", "pending")}
    fds = {"p": [11.0] * 5, "q": [10.0, 10.0, 10.0, 10.0, 12.1], "r": [9.0] * 5, "s": [9.0] * 5}
    monkeypatch.setattr(R, "verdicts", lambda c: stages[c])
    monkeypatch.setattr(R, "record", lambda data, m, u, seed=0: {"fd": fds[m][seed]})
    assert R.chosen(("p", "q")) == "q"          # mean 10.42 < 11.0
    assert R.chosen(("p", "r")) == "p"          # r is lower but not confirmed
    assert R.chosen(("s", "r", None)) is None   # pending and failed confirmations keep the default


def test_revision_4_pairs_the_fd_clause_with_the_teachers_fd_at_the_same_eval_seed(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.setattr(R, "RUNS", runs)
    monkeypatch.setattr(R, "TEACHER_AT_SEED", tmp_path)

    def put(method, seed, fd, ft):
        (runs / f"photos-{method}-seed{seed}-u2000.json").write_text(json.dumps({"fd": fd, "fd_teacher": ft}))
    for s, tfd in zip(R.R4_SEEDS, (2.8, 3.0, 5.0)):
        put(R.RERUN, s, 2.0, 0.6)
        put(R.SECOND, s, tfd + 0.1, 0.4)        # 0.1 over the teacher at its own seed: within τ
    assert R.decide_r4()[0] == "pending"          # the teacher's FD at those seeds not measured yet
    for s, tfd in zip(R.R4_SEEDS, (2.8, 3.0, 5.0)):
        (tmp_path / f"photos-teacher-8step-seed{s}.json").write_text(json.dumps({"fd": tfd}))
    verdict, why = R.decide_r4()
    assert verdict == "met" and "within τ" in why[0], why   # 5.1 would fail revision 3's clause (3.16 + τ)
    put(R.SECOND, 7, 5.2, 0.4)                    # 0.2 over the teacher's 5.0 at seed 7
    assert R.decide_r4()[0] == "not met"
    put(R.SECOND, 7, 5.1, 0.9)                    # d = −0.2, −0.2, +0.3: m −0.03 < noise; still met
    assert R.decide_r4()[0] == "met"
    for s in R.R4_SEEDS:
        put(R.SECOND, s, 2.0, 0.9)                # d = +0.3 at every seed: m 0.3 > max(sd 0, τ)
    assert R.decide_r4()[0] == "not met"
