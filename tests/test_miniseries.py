"""`lmlab scaling PRESET --refit` (lmlab.experiments.miniseries) before its first run: a series the fit could not
take is refused by the fit's own rule, and `--budget` plans the series from each depth's steps timed here, or refuses
it with the budget it needs. Verdicts are on the plan and what the runs recorded, never on a timing."""

import io
import re
import time
from pathlib import Path

import pytest
from rich.console import Console

from lmlab.analysis.runs import summarize
from lmlab.analysis.scaling import fit_loss_surface
from lmlab.core.errors import UserError
from lmlab.experiments.family import read_fit
from lmlab.experiments.miniseries import Miniseries, Series
from lmlab.train.budget import Costs
from tests.helpers import lmlab, refused, refused_process, write_config


@pytest.fixture(scope="module")
def preset(tmp_path_factory, char_dataset) -> Path:
    """The tiny preset: 256 tokens a step, so 2k tokens are 8 steps (the fewest a miniseries run trains)."""
    return write_config(tmp_path_factory.mktemp("preset") / "mini.toml", char_dataset)


SURFACE = "a loss surface L(N, D) needs at least 5 runs of at least 2 sizes and 2 lengths, and "


@pytest.mark.parametrize("args, message", [
    (["--depths", "1,1,2", "--tokens", "2k,4k,8k"], "--depths names 1 twice, and each is one size of the fit"),
    (["--depths", "1,2,3", "--tokens", "2k,4k,2048"], "--tokens names 2048 twice, and each is one length of the fit"),
    (["--depths", "1,2,3", "--tokens", "2k,2100"], "--tokens 2048 and 2100 both train 8 steps of 256 tokens"),
    (["--depths", "1,2,3", "--tokens", "64,128,4k"], "--tokens 64 and 128 both train 8 steps of 256 tokens"),
    (["--depths", "1,2", "--tokens", "2k,4k"], SURFACE + "--depths 1,2 at --tokens 2048,4096 are 4 runs of 2 sizes"),
    (["--depths", "3", "--tokens", "2k,4k,8k"], SURFACE + "--depths 3 at --tokens 2048,4096,8192 are 3 runs of 1 size"),
    # depth 1 (4,000 weights that multiply) alone has 6·N·D under 1e8, at 2k and 4k tokens
    (["--depths", "1,2,3", "--tokens", "2k,4k", "--max-flops", "1e8"],
     "within --max-flops 1e+08 are 2 runs of 1 size and 2 lengths; add depths (--depths) or lengths (--tokens), or "
     "raise --max-flops."),
])
def test_a_series_the_fit_could_not_take_is_refused_before_any_run(preset, tmp_path, capsys, args, message):
    refused(capsys, "scaling", preset, "--refit", *args, "--dir", tmp_path / "runs", "--device", "cpu",
            needles=(message,))
    assert not (tmp_path / "runs").exists()


def test_the_fit_counts_a_run_of_the_same_size_and_length_once():
    with pytest.raises(UserError, match=re.escape(SURFACE + "there are 4 runs of 2 sizes and 2 lengths")):
        fit_loss_surface([1e4, 1e4, 2e4, 2e4, 2e4], [1e3, 2e3, 1e3, 2e3, 2e3], [3.0, 2.8, 2.9, 2.7, 2.7])


def test_budget_needs_refit(preset, capsys):
    refused(capsys, "scaling", preset, "--budget", "5m", needles=("--budget plans a refit's miniseries",))


def _costs(step: float) -> dict[int, Costs]:
    """Costs of depths 1-6 whose step grows with the depth's work (d layers of width 16·d: about d³)."""
    return {d: Costs(step * d ** 3, step * d ** 3 / 3, 0.05, 0.05, 0.3) for d in range(1, 7)}


@pytest.mark.parametrize("step", [1e-4, 3e-3, 0.05, 1.0])
@pytest.mark.parametrize("budget", [10.0, 90.0, 900.0, 36000.0])
def test_a_budget_keeps_the_smallest_depths_whose_runs_fit_or_names_the_budget_the_fewest_need(preset, tmp_path,
                                                                                              step, budget):
    """Whatever the steps cost: the depths kept are the smallest, at least the fewest the fit takes (2 at 3 lengths),
    their runs fit the budget and the next depth's would not; or the refusal names the budget the fewest need."""
    said = io.StringIO()
    runs = Miniseries(preset, Series((1, 2, 3, 4, 5, 6), (2048, 4096, 8192), (1.0, 2.0)), tmp_path / "runs", "cpu",
                      Console(file=said, width=1000))
    costs = _costs(step)
    started = time.perf_counter()
    try:
        kept = runs.budgeted(budget, started, lambda depth, deadline: costs[depth]).depths
    except UserError as refusal:
        needed = int(re.search(r"give a budget of at least (\d+)s", str(refusal))[1])
        assert needed > budget and 0 <= needed - runs.seconds((1, 2), costs) < 2, str(refusal)
        assert str(refusal).startswith(f"budget {budget:g} s: the fewest runs the fit takes, depths 1,2 at ")
        return
    assert kept == tuple(range(1, len(kept) + 1)) and len(kept) >= 2
    assert runs.seconds(kept, costs) <= budget
    if len(kept) < 6:
        assert runs.seconds(kept + (len(kept) + 1,), costs) > budget - (time.perf_counter() - started)
    line = " ".join(said.getvalue().split())
    assert line.startswith("miniseries in budget ") and f"depths {','.join(map(str, kept))} at " in line
    assert f"{len(runs.left(kept))} runs to train" in line and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_budget_too_small_for_the_fewest_runs_is_refused_before_any_trains(preset, tmp_path):
    done = lmlab("scaling", preset, "--refit", "--depths", "1,2,3", "--tokens", "2k,4k", "--lr-factors", "1,2",
                 "--budget", "2s", "--dir", tmp_path / "runs", "--device", "cpu", cwd=tmp_path, ok=False)
    refused_process(done, "budget 2 s: the fewest runs the fit takes, depths 1,2,3 at 2,048, 4,096 tokens (8, 16 "
                    "steps), 9 runs to train with the LR search, about ", "; give a budget of at least ")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_budgeted_refit_says_its_plan_first_and_trains_what_it_planned(char_dataset, tmp_path):
    preset = write_config(tmp_path / "mini.toml", char_dataset)
    done = lmlab("scaling", preset, "--refit", "--depths", "1,2,3", "--tokens", "2k,4k", "--lr-factors", "1,2",
                 "--budget", "5m", "--dir", tmp_path / "runs", "--device", "cpu", cwd=tmp_path)
    out = " ".join(done.stdout.split())
    plan = out.split("miniseries 1/")[0]
    assert plan.startswith("miniseries in budget 5.0 min: depths 1,2,3 at 2,048, 4,096 tokens (8, 16 steps), 9 runs "
                           "to train with the LR search, about "), out
    folder = tmp_path / "runs" / "mini-miniseries"
    trained = sorted(p for p in folder.iterdir() if p.is_dir())
    assert len(trained) == 9 and out.count("miniseries ") == 10  # the plan, then each run
    for run in trained:
        tokens = int(re.match(r"d\d-t(\d+)-lr", run.name)[1])
        assert summarize(run).status == "finished" and summarize(run).steps == {2048: 8, 4096: 16}[tokens]
    fit = read_fit(preset)
    assert {r["depth"] for r in fit.runs} == {1, 2, 3} and "--budget" not in fit.measured["command"]
