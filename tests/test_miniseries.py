"""`lmlab scaling PRESET --refit` (lmlab.experiments.miniseries) before its first run: a series the fit could not
take is refused by the fit's own rule, and `--budget` plans the series from each depth's steps timed here, or refuses
it with the budget it needs. Verdicts are on the plan and what the runs recorded, never on a timing."""

import dataclasses
import io
import re
import subprocess
import time
from pathlib import Path

import pytest
from rich.console import Console

from lmlab.analysis.runs import summarize
from lmlab.analysis.scaling import fit_loss_surface, surface_refusal
from lmlab.core.errors import UserError
from lmlab.core.humanize import format_duration
from lmlab.experiments.family import MAX_DEPTH, read_fit
from lmlab.experiments.miniseries import Miniseries
from lmlab.experiments.series import LADDER, LR_SEARCHES, MIN_STEPS, PAST_BEST, Series, tokens_text
from lmlab.train.budget import Costs
from tests.helpers import LMLAB, lmlab, refused, refused_process, roomier, write_config


@pytest.fixture(scope="session")
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
    refused(capsys, "scaling", preset, "--budget", "5m", needles=("--budget and --for plan a refit's miniseries",))


@pytest.mark.parametrize("args", [[], ["--tokens", "128k,256k,512k", "--lr-factors", "1"], ["--for", "5m"],
                                  ["--depths", "1,2", "--tokens", "2k,4k,8k"]])
def test_a_refit_without_a_budget_or_a_whole_grid_is_one_sentence_naming_a_command_of_minutes(preset, tmp_path,
                                                                                              capsys, args):
    """A new user's first refit, or one of a grid half named, starts nothing that takes hours: one sentence names the
    command that plans the refit to 10 minutes."""
    refused(capsys, "scaling", preset, "--refit", *args, "--dir", tmp_path / "runs", "--device", "cpu",
            needles=("a refit without --budget trains the grid it is given, all of --depths, --tokens and "
                     f"--lr-factors, and a wide one takes hours: give it a time instead (`lmlab scaling {preset} "
                     "--refit --budget 10m` plans its sizes",))
    assert not (tmp_path / "runs").exists()


def test_for_names_runs_to_plan_for_and_is_refused_where_nothing_is_left_to_plan(preset, tmp_path, capsys):
    refused(capsys, "scaling", preset, "--refit", "--depths", "1,2,3", "--tokens", "2k,4k", "--for", "1m", "--budget",
            "5m", "--dir", tmp_path / "runs", needles=("--for plans a refit's depths or lengths for the runs it names, "
                                                       "and --depths and --tokens name both",))
    refused(capsys, "scaling", preset, "--for", "1m", needles=("--budget and --for plan a refit's miniseries",))
    assert not (tmp_path / "runs").exists()


def _costs(step: float) -> dict[int, Costs]:
    """Costs of every depth, its step growing with the depth's work (d layers of width 16·d: about d³)."""
    return {d: Costs(step * d ** 3, step * d ** 3 / 3, 0.05, 0.05, 0.3) for d in range(1, MAX_DEPTH + 1)}


ASKED = {"planned": Series(), "--for": Series(meant=(30.0, 300.0)), "--lr-factors": Series(lr_factors=(1.0,)),
         "--tokens": Series(tokens=(4096, 16384, 65536)),
         "grid": Series((1, 2, 3, 4, 5, 6), (2048, 4096, 8192), (1.0, 2.0))}


def _plan(preset: Path, folder: Path, asked: Series, budget: float, costs: dict[int, Costs]) -> tuple[Series, str]:
    """The series `asked` planned to `budget` at `costs`, and the line it said."""
    said = io.StringIO()
    runs = Miniseries(preset, asked, folder, "cpu", Console(file=said, width=10000))
    planned = runs.budgeted(budget, time.perf_counter(), lambda depth, deadline: costs[depth])
    return planned, " ".join(said.getvalue().split())


@pytest.mark.parametrize("step", [1e-4, 3e-3, 0.1])
@pytest.mark.parametrize("budget", [10.0, 120.0, 1800.0, 7200.0, 36000.0])
@pytest.mark.parametrize("asked", list(ASKED))
def test_a_budget_plans_a_series_that_fits_it_and_covers_the_runs_it_is_for_or_names_the_budget_it_needs(
        preset, tmp_path, step, budget, asked):
    """Whatever the steps cost, from a machine a hundred times faster than the tiny model's CPU to one thirty times
    slower, and from 10 s to 10 h: the plan fits the budget, its depths are the smallest, 2 at least, up to the first
    past the best for the runs it is for (or the line names those the budget left out), its lengths cover what every
    depth trains in those runs, its LR search is one of the plan's, and the line says it; a planned fit is for the
    longest run budget whose whole plan fits; or the refusal names a budget that a plan fits."""
    costs, folder, runs = _costs(step), tmp_path / "runs", None
    try:
        planned, line = _plan(preset, folder, ASKED[asked], budget, costs)
    except UserError as refusal:
        needed = int(re.search(r"give a budget of at least (\d+) s", str(refusal))[1])
        assert needed > budget and str(refusal).startswith(f"budget {budget:g} s: the fewest runs the fit takes, "), \
            str(refusal)
        _plan(preset, folder, ASKED[asked], needed + 1, costs)  # the budget it names is one a plan fits
        return
    runs = Miniseries(preset, planned, folder, "cpu", Console(file=io.StringIO()))
    depths = planned.depths
    assert depths == tuple(range(1, len(depths) + 1)) and len(depths) >= 2
    assert runs.seconds(planned, costs) <= budget and runs.refusal(planned) is None
    points = [(d, runs.steps(t)) for d in depths for t in planned.tokens if planned.within(d, runs.params(d), t)]
    for depth in depths:  # each depth's longest run can be held out from a fit through the others
        rest = [p for p in points if p != max(p for p in points if p[0] == depth)]
        assert surface_refusal([d for d, _ in rest], [steps for _, steps in rest]) is None
    assert line.startswith(f"miniseries in budget {format_duration(budget)}")
    assert f"depths {','.join(map(str, depths))} at " in line
    assert f", {len(runs.left(planned))} runs to train with the LR searched over " in line and not folder.exists()
    if asked == "grid":
        assert planned.tokens == ASKED["grid"].tokens and "a fit for runs" not in line
        assert len(depths) == 6 or \
            f"depth{'s' * (len(depths) < 5)} {','.join(map(str, range(len(depths) + 1, 7)))} left out" in line
        return
    assert planned.lr_factors in (LR_SEARCHES if asked != "--lr-factors" else ((1.0,),))
    shortest, longest = min(planned.meant), max(planned.meant)

    def trains(depth: int, seconds: float) -> float:
        return seconds / costs[depth].step * runs.tokens_per_step

    past = trains(depths[-1], longest) < PAST_BEST * runs.params(depths[-1])
    assert past or len(depths) == MAX_DEPTH or f"depth {len(depths) + 1} and deeper left out" in line, line
    assert not any(trains(d, longest) < PAST_BEST * runs.params(d) for d in depths[1:-1])
    if asked == "--tokens":
        assert planned.tokens == ASKED[asked].tokens and not planned.reach
    else:  # the lengths cover what each depth trains in the runs the fit is for, from the shortest the deepest trains
        assert planned.tokens[0] <= max(trains(depths[-1], shortest), MIN_STEPS * runs.tokens_per_step)
        assert all(planned.reach[d] >= trains(d, longest) and planned.reach[d] in planned.tokens for d in depths)
    if asked == "--for":
        assert planned.meant == (30.0, 300.0) and "a fit for runs of 30 s to 5.0 min (--for)" in line
        return
    assert planned.meant[0] in LADDER and f"a fit for runs of {format_duration(longest)} (the longest whose plan " \
        "fits it; --for names others)" in line
    longer = [b for b in LADDER if b > longest and 2 * b <= budget]
    if longer and "left out" not in line:  # the next run budget up: its whole plan would not fit
        try:
            _, cut = _plan(preset, folder, dataclasses.replace(ASKED[asked], meant=(float(longer[0]),)), budget, costs)
            assert "left out" in cut, cut
        except UserError:
            pass


@pytest.mark.slow
def test_a_budget_too_small_for_the_fewest_runs_is_refused_before_any_trains(preset, tmp_path):
    done = lmlab("scaling", preset, "--refit", "--budget", "2s", "--dir", tmp_path / "runs", "--device", "cpu",
                 cwd=tmp_path, ok=False)
    refused_process(done, "budget 2 s: the fewest runs the fit takes, depths 1,2 at ", "; give a budget of at least ")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_budgeted_refit_says_its_plan_first_and_trains_what_it_planned(char_dataset, tmp_path):
    """A tiny preset's refit planned to its budget for 2-second runs, end to end: the plan said first, each run it
    names trained for the steps it planned, and the fit written through them, checked as `--size auto` reads it."""
    preset = write_config(tmp_path / "mini.toml", char_dataset)
    args = [LMLAB, "scaling", preset, "--refit", "--for", "2s", "--dir", tmp_path / "runs", "--device", "cpu"]
    done = subprocess.run([*map(str, args), "--budget", "2m"], cwd=tmp_path, capture_output=True, text=True)
    if done.returncode == 2:  # a slow or busy machine: the plan for 2-second runs needs more here
        done = subprocess.run([*map(str, args), "--budget", f"{roomier(120, done.stderr):.0f}"], cwd=tmp_path,
                              capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    out = " ".join(done.stdout.split())
    plan = out.split("miniseries 1/")[0]
    assert plan.startswith("miniseries in budget ") and ", a fit for runs of 2 s (--for): depths 1,2" in plan, out
    runs = int(re.search(r", (\d+) runs to train with the LR searched over (1,2,4|1,2) x the preset's at ", plan)[1])
    folder = tmp_path / "runs" / "mini-miniseries"
    trained = sorted(p for p in folder.iterdir() if p.is_dir())
    assert len(trained) == runs and out.count("miniseries ") == runs + 1  # the plan, then each run
    for run in trained:
        tokens = int(re.match(r"d\d+-t(\d+)-lr", run.name)[1])
        assert summarize(run).status == "finished" and summarize(run).steps == tokens // 256
        assert tokens_text(tokens) in plan
    fit = read_fit(preset)  # its figures within the bounds a fit is read by
    assert {r["depth"] for r in fit.runs} == {int(d) for d in re.search(r"depths ([\d,]+) at", plan)[1].split(",")}
    assert fit.held_out and fit.measured["command"].endswith("--for 2s") and " --budget " in fit.measured["command"]
