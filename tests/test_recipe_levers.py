"""benchmarks/recipe_levers.py's verdict, its rule for keeping a lever, on made-up scores."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from recipe_levers import verdict  # noqa: E402


def test_a_lever_is_kept_where_it_wins_at_the_longest_budget_beyond_the_spread_and_holds_at_the_shortest():
    base = {60: [1.650, 1.657], 300: [1.490, 1.499]}
    assert verdict(base, {60: [1.634, 1.668], 300: [1.481, 1.486]}, [60, 300]) == \
        "kept: 0.0110 lower at 300 s (spread 0.0090)"
    assert verdict(base, {60: [1.700, 1.702], 300: [1.470, 1.472]}, [60, 300]) == \
        "not kept: wins 0.0235 at 300 s but loses 0.0475 at 60 s"


def test_a_lever_not_kept_is_said_with_its_change_signed_as_the_table_signs_it():
    base = {60: [1.648, 1.663], 300: [1.487, 1.501]}
    said = verdict(base, {60: [1.660, 1.664], 300: [1.491, 1.500]}, [60, 300])  # higher: the lever lost
    assert said == "not kept: +0.0015 at 300 s, not lower by more than the seeds' spread 0.0140"
    said = verdict(base, {60: [1.660, 1.664], 300: [1.485, 1.495]}, [60, 300])  # lower, within the noise
    assert said == "not kept: -0.0040 at 300 s, not lower by more than the seeds' spread 0.0140"
