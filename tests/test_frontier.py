"""bench/frontier.py's verdict on the moonshot, checked against hand-computed interpolations.

The study's conclusion rests on this comparison: an S-strategy point against full fine-tuning's
frontier (its undominated points and the base model as learning rate zero), KL interpolated
linearly at the same recall. No training here: the records are written by hand.
"""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("frontier", Path(__file__).parents[1] / "bench" / "frontier.py")
frontier = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(frontier)


def rec(method, lr, recall, kl, seed=0, steps=40):
    return {"method": method, "lr": lr, "steps": steps, "seed": seed, "heldout_mcq": recall, "kl": kl}


FULL = [rec("base", 0.0, 0.1, 0.0, steps=0), rec("full", 1e-4, 0.6, 0.3), rec("full", 5e-4, 0.95, 1.4),
        rec("full", 1e-3, 0.7, 1.5, steps=80)]  # the last is dominated: (0.95, 1.4) has more recall, less KL


def verdict_line(results, method):
    lines = [ln for ln in frontier.moonshot(results).splitlines() if ln.startswith(f"- {method} ")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("recall,kl,full_kl,less,met", [
    (0.9, 1.0, 0.3 + 0.3 / 0.35 * 1.1, True, True),        # 1.243 on the frontier: forgets less, recall >= 0.9
    (0.92, 1.31, 0.3 + 0.32 / 0.35 * 1.1, False, False),   # 1.306: just more
    (0.5, 0.3, 0.4 / 0.5 * 0.3, False, False),             # 0.24, between the base model and full at 1e-4
    (0.65, 0.6, 0.3 + 0.05 / 0.35 * 1.1, False, False),    # 0.457; through the dominated point it would be 0.9
    (0.8, 0.5, 0.3 + 0.2 / 0.35 * 1.1, True, False),       # less KL, but recall under 0.9
])
def test_moonshot_interpolates_full_frontier(recall, kl, full_kl, less, met):
    line = verdict_line([*FULL, rec("slayer", 5e-3, recall, kl)], "slayer")
    assert f"full fine-tuning at that recall: KL {full_kl:.3f}" in line
    assert line.split(" -> S strategy forgets ")[1].startswith("less" if less else "more")
    assert ("moonshot met" in line) == met


def test_below_the_base_model_is_not_compared():
    line = verdict_line([*FULL, rec("slayer+blocks3", 5e-3, 0.05, 0.1)], "slayer+blocks3")
    assert "no comparison" in line and "moonshot met" not in line


def test_points_are_seed_means_per_lr_and_length():
    rs = [*FULL, rec("slayer", 5e-3, 0.9, 1.0, seed=0), rec("slayer", 5e-3, 1.0, 1.2, seed=1),
          rec("slayer", 5e-3, 0.2, 0.1, steps=80)]
    m = frontier.means(rs)
    assert m[("slayer", 5e-3, 40)] == pytest.approx((0.95, 1.1, 2))
    assert m[("slayer", 5e-3, 80)] == pytest.approx((0.2, 0.1, 1))
    assert frontier.run_name("slayer+blocks3", 5e-3, 80, 2) == "slayer+blocks3_lr0.005_st80_s2"


@pytest.mark.parametrize("kl,met", [(1.0, True), (1.5, False)])
def test_beyond_full_recall_counts_only_when_it_dominates(kl, met):
    line = verdict_line([*FULL, rec("slayer+blocks3", 7e-3, 0.98, kl)], "slayer+blocks3")
    assert "beyond full fine-tuning's highest recall (0.950 at KL 1.400)" in line
    assert ("more recall and less KL" in line) == met and ("moonshot met" in line) == met
