"""`--size auto|DEPTH` (lmlab.experiments.sizing): the size a budget trains best, chosen from the fit kept beside a
preset and the candidates timed here; recorded in the run's config.toml and its `sizing` event, which compare and
the report read; `plan --budget` weighs the same sizes; refusals. The fit file itself: `lmlab scaling PRESET
--refit` (lmlab.experiments.miniseries). Every verdict is on what the runs recorded, never on a timing."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from rich.console import Console

from lmlab.analysis.runs import summarize
from lmlab.api.training import parse_duration, train
from lmlab.commands import main
from lmlab.core import cache
from lmlab.core.cache import cache_path
from lmlab.core.config_toml import load_config
from lmlab.core.errors import UserError
from lmlab.core.machine import MEASURED, READ_BACK, Machine
from lmlab.core.peak import step_ceiling
from lmlab.core.threads import ThreadChooser
from lmlab.data.shards import read_meta
from lmlab.experiments import size_search, sizing
from lmlab.experiments.family import Family, fit_path, preset_sha256, read_fit
from lmlab.experiments.gputime import gpu_step_time
from lmlab.experiments.size_search import TIMING_SHARE
from lmlab.experiments.sizing import choose_size, with_vocab
from lmlab.model import build_model
from lmlab.run.rundir import RunDir
from lmlab.train.timing import Timing, timing_key, timing_seconds
from tests.helpers import (
    LMLAB,
    ROOT,
    a_machine,
    cpu_ticks,
    meta_reads,
    run_cli,
    trusted,
    wait_until,
    write_config,
    write_fit,
)


@pytest.fixture(scope="session")
def preset(tmp_path_factory, char_dataset) -> Path:
    """The tiny preset (2 layers of 32, heads of 16: depth d is d layers of 16 x d) with a fit that predicts depths 1
    and 2 (within EXTRAPOLATION x its largest run), the larger the better: 2 is the choice at any speed."""
    path = write_config(tmp_path_factory.mktemp("preset") / "tiny.toml", char_dataset)
    with torch.device("meta"):
        params = build_model(with_vocab(load_config(path)).model).num_params()
    write_fit(path, char_dataset, params // 2)
    return path


@pytest.fixture(scope="session")
def sized_cache(tmp_path_factory, own_cache) -> Path:
    """The cache `sized` times its sizes into: the session's peaks, no step timings. The session's cache holds what
    other tests' runs of the same tiny shapes timed, under whatever load they had, which a sized run would read back."""
    folder = tmp_path_factory.mktemp("sized-cache")
    shutil.copytree(own_cache, folder, dirs_exist_ok=True)
    path = folder / "lmlab" / "machine.json"
    kept = json.loads(path.read_text())
    path.write_text(json.dumps({**kept, "entries": {k: v for k, v in kept["entries"].items() if v["kind"] == "peak"}}))
    return folder


@pytest.fixture(scope="session")
def sized(preset, tmp_path_factory, sized_cache):
    """A run sized by --size auto for a 20 s budget, on one thread; a longer budget where a busy machine's start-up
    left it no evaluation, or its timings left no share of the budget to time depth 2 (the verdicts are on what the
    run recorded, whatever its budget)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(sized_cache))
        for budget in (20, 60, 180):
            run = tmp_path_factory.mktemp("sized") / "run"
            out = Console(record=True, width=100)
            done = train(preset, run=run, budget=f"{budget}s", size="auto", device="cpu",
                         set=["train.threads=1"], console=out).path
            (run.parent / "said.txt").write_text(out.export_text())  # what the command printed
            hurried = any(c["note"].startswith("not timed: about") for c in sizing_of(done)["candidates"])
            if not hurried and [e for e in RunDir(done).events() if e["event"] == "eval"]:
                return done
    pytest.fail("three budgets in a row ended before an evaluation or left no time to time depth 2")


def sizing_of(run: Path) -> dict:
    return next(e for e in RunDir(run).events() if e["event"] == "sizing")


@pytest.mark.slow
def test_size_auto_trains_the_size_it_predicts_best_and_records_it_as_an_ordinary_run(sized, preset):
    event, cfg = sizing_of(sized), RunDir(sized).config()
    assert event["depth"] == 2 and "beyond the fit" in event["candidates"][-1]["note"]
    planned = [c for c in event["candidates"] if c["steps"]]
    assert event["depth"] == min(planned, key=lambda c: c["predicted_val"])["depth"]  # the lowest predicted val
    fit = read_fit(preset)
    chosen = Family.of(load_config(preset), "tiny").config(event["depth"], fit)
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head) == (chosen.model.n_layer, chosen.model.n_embd,
                                                                       chosen.model.n_head)
    assert cfg.train.learning_rate == event["learning_rate"] == chosen.train.learning_rate  # the fit's LR rule
    assert cfg.train.warmup_iters == event["warmup_iters"] <= max(1, event["steps"] // 10)  # laid over its steps
    # Candidates the search stopped at (past EXTRAPOLATION x the fit's largest run, or too long to time in the
    # budget) are not timed, and say why.
    assert all(c["note"] for c in event["candidates"] if c["tokens_per_sec"] is None)
    # the fit's N: the weights that multiply, the learned position table left out
    assert event["multiplied_params"] < event["params"]
    assert event["predicted_val"] == pytest.approx(fit.predict(event["multiplied_params"], event["tokens"]), abs=1e-4)
    assert event["extrapolated"] == (not 10_000 <= event["tokens"] <= 20_000)  # the fit's runs: 10k and 20k tokens
    assert RunDir(sized).events()[-1]["event"] == "end"
    # Its last line: the final val beside the prediction, which assumed the steps planned (a busy machine trains
    # fewer: 399 planned, 201 trained ended 0.14 above it, unsaid).
    final, steps = next(e for e in RunDir(sized).events() if e["event"] == "final"), RunDir(sized).events()[-1]["step"]
    said = " ".join((sized.parent / "said.txt").read_text().split())
    trained = "and the run trained them" if steps == event["steps"] else (
        f"the run trained {steps:,} ({steps / event['steps']:.0%} of them), and the prediction assumed the planned "
        "steps")
    assert (f"size auto predicted val {event['predicted_val']:.4f} for the {event['steps']:,} steps it planned"
            f"{', ' if steps == event['steps'] else '; '}{trained}: the final val is "
            f"{final['val_loss'] - event['predicted_val']:+.4f} from it") in said


def test_a_prediction_past_the_lengths_the_fit_trained_says_it_is_extrapolated(preset):
    fit = read_fit(preset)
    assert fit.beyond(10_000) == fit.beyond(20_000) == ""
    assert fit.beyond(4_096) == "extrapolated: 4,096 tokens, fewer than the fit's shortest run (10,000)"
    assert fit.beyond(65_536) == "extrapolated: 65,536 tokens, more than the fit's longest run (20,000)"


@pytest.mark.parametrize("fitted", sorted((ROOT / "configs").glob("*.fit.json")), ids=lambda p: p.name)
def test_each_fit_shipped_is_of_its_preset_as_it_is_now(fitted):
    """A preset edited after its fit (its comments too: the fit is of the file's bytes) gets a note at every sized
    run; the edit should come with `lmlab scaling PRESET --refit`."""
    preset = fitted.with_name(fitted.name.removesuffix(".fit.json") + ".toml")
    fit = read_fit(preset)
    assert fit is not None and fit.preset_sha256 == preset_sha256(preset), f"refit {preset}: edited since its fit"
    assert fit.dataset["path"] == load_config(preset).data.dataset


@pytest.mark.slow
def test_compare_and_report_show_the_predicted_val_beside_the_reached(sized, capsys, tmp_path):
    assert main(["compare", str(sized), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["runs"][0]
    assert row["predicted_val"] == sizing_of(sized)["predicted_val"]
    final = next(e for e in RunDir(sized).events() if e["event"] == "final")
    assert (row["final_val_loss"], row["final_stderr"]) == (final["val_loss"], final["stderr"])
    assert row["predicted_error"] == pytest.approx(row["predicted_val"] / final["val_loss"] - 1)  # what it reached
    assert main(["report", str(sized), "--out", str(tmp_path / "report")]) == 0
    assert f"| predicted by --size auto | {row['predicted_val']:.4f}" in (tmp_path / "report/report.md").read_text()


@pytest.mark.slow
def test_plan_weighs_the_sizes_train_weighs_and_chooses_alike(preset, sized, sized_cache):
    """The fit's largest predicted size is the best at any speed: plan (a process of its own, whose start-up it
    counts as train does, on the machine's cache the train kept) and train choose it alike."""
    budget = f"{sizing_of(sized)['budget']:g}s"
    planned = subprocess.run([LMLAB, "plan", preset, "--budget", budget, "--size", "auto", "--device", "cpu", "--set",
                              "train.threads=1"], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "XDG_CACHE_HOME": str(sized_cache)})
    assert planned.returncode == 0, planned.stderr
    out = " ".join(planned.stdout.split())
    event = sizing_of(sized)
    assert f"size auto: {event['shape']}" in out and "chosen" in out and "predicted val" in out
    assert f"The budget as planned: the {sizing_of(sized)['budget']:g} s:" in out


@pytest.mark.slow
def test_a_size_by_depth_takes_the_familys_shape_and_the_fits_lr(preset, tmp_path, capsys):
    run = train(preset, run=tmp_path / "run", size=3, device="cpu", max_iters=2).path
    cfg, fit = RunDir(run).config(), read_fit(preset)
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head) == (3, 48, 3)
    assert cfg.train.learning_rate == pytest.approx(3e-3 * fit.lr.factor(48, 32), rel=1e-2)
    assert "size 3: 3 layers of 48, 3 heads" in capsys.readouterr().out
    assert not [e for e in RunDir(run).events() if e["event"] == "sizing"]  # nothing was chosen


@pytest.mark.parametrize("args, message", [
    (["--budget", "0.5s", "--size", "auto"], "even the smallest size of"),
    (["--size", "auto"], "--size auto chooses the size a time budget trains best; give one with --budget"),
    (["--budget", "20s", "--size", "auto", "--init-from", "runs/x"], "pass one of them"),
    # A shape set beside a size is never overridden without a word (3 layers of 96 asked, 2 of 72 trained).
    (["--budget", "20s", "--size", "auto", "--set", "model.n_layer=3", "--set", "model.n_embd=96"],
     "--size auto sets model.n_layer, model.n_embd, model.n_head, model.n_kv_head from the preset's family, so "
     "model.n_layer would be overridden; drop it"),
    (["--size", "2", "--set", "model.n_head=4"], "--size 2 sets model.n_layer"),
])
def test_size_refusals_write_nothing(preset, tmp_path, capsys, args, message):
    run = tmp_path / "run"
    assert main(["train", str(preset), "--run", str(run), "--device", "cpu", *args]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not run.exists()


def timings_counted(monkeypatch) -> list[int]:
    """The depths --size auto times in this process, in order: its timings, each still run."""
    timed, real = [], size_search.time_config

    def counted(cfg, *args, **kwargs) -> Timing:
        timed.append(cfg.model.n_layer)
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(size_search, "time_config", counted)
    return timed


def slower_than(preset: Path, budget: float) -> int:
    """A context at which one step of the smallest size at batch 1 takes longer than `budget` seconds even at the most
    FLOP/s a step computes on this machine (lmlab.core.peak.step_ceiling)."""
    most, block = step_ceiling(torch.device("cpu"), torch.float32)[0], 32
    while True:
        cfg = with_vocab(load_config(preset, [f"model.block_size={block}"]))
        with torch.device("meta"):
            flops = build_model(Family.of(cfg, "tiny").config(1).model).flops_per_token() * block
        if flops / most > budget:
            return block
        block *= 2


@pytest.mark.parametrize("command", ["train", "plan"])
@pytest.mark.parametrize("budget, context", [("1s", False), ("0.5s", True), ("20s", True), ("1m", True)])
def test_a_budget_no_size_can_train_in_is_refused_before_any_size_is_timed(preset, tmp_path, capsys, monkeypatch,
                                                                         command, budget, context):
    """Each size's step is its FLOPs at no more than the most a step computes here, so a size whose timing and
    MIN_STEPS steps cannot fit the budget is not timed, and where the smallest cannot, the refusal comes before any
    timing and names a budget that holds them at that pace; nothing is written."""
    timed, run = timings_counted(monkeypatch), tmp_path / "run"
    block = ["--set", f"model.block_size={slower_than(preset, parse_duration(budget))}"] * context
    where = ["--run", str(run)] if command == "train" else []
    assert main([command, str(preset), *where, "--device", "cpu", "--budget", budget, "--size", "auto", *block,
                 "--set", "train.batch_size=1"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert f"even the smallest size of {preset} (1 layer of 16, 1 head): budget {parse_duration(budget):g} s:" in said
    assert "a step takes at least" in said and "that start-up and its timing take" in said
    assert int(re.search(r"give a budget of at least (\d+) s\.", said)[1]) > parse_duration(budget)
    assert timed == [] and not run.exists()


def test_a_smallest_size_whose_step_does_not_fit_memory_is_refused_untimed_saying_so(preset, tmp_path, capsys,
                                                                                     monkeypatch):
    timed, run = timings_counted(monkeypatch), tmp_path / "run"
    assert main(["train", str(preset), "--run", str(run), "--device", "cpu", "--budget", "1h", "--size", "auto",
                 "--set", "model.block_size=1000000000", "--set", "train.batch_size=1"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert f"even the smallest size of {preset} (1 layer of 16, 1 head): the model alone needs about" in said
    assert "use a smaller model or a shorter block_size." in said
    assert timed == [] and not run.exists()


@pytest.mark.slow
def test_a_size_whose_steps_could_fit_the_budget_is_timed_and_chosen(preset, monkeypatch):
    """The neighbour of the refusals above: the smallest size, a step of which at the ceiling's pace fits the
    budget many times over, is timed, and a size is chosen."""
    timed, metas, real = timings_counted(monkeypatch), [], sizing.read_meta
    cfg = with_vocab(load_config(preset, ["train.budget_seconds=20"]))
    monkeypatch.setattr(sizing, "read_meta", lambda path: metas.append(path) or real(path))
    machine = Machine.of("cpu", "float32", threads=1)
    try:
        made = choose_size(preset, cfg, time.perf_counter(), machine)
        # What it timed of the chosen size is this machine's (lmlab.core.cache): its run reads it back.
        kept = cache.recall("timing", timing_key(machine, made.config, "fused", 1), trusted)
    finally:
        machine.threads.restore()
    assert timed[0] == 1 and made.chosen.steps and made.chosen.timing
    assert timed == [c.depth for c in made.candidates if c.timing]  # each size weighed timed once, from the smallest
    assert len(metas) == 1  # the dataset's meta.json, read once for the whole sizing
    assert kept is not None and kept["step"] == made.chosen.timing.step


@pytest.mark.slow
def test_a_second_sized_train_reads_each_sizes_timing_back_and_chooses_alike(preset, tmp_path, capsys, monkeypatch):
    """Two `train --size auto` of one preset on one machine's cache: the first times the sizes the rule times and keeps
    them (lmlab.core.cache); the second reads every one back, times none, says so in its sizing and machine lines and
    its `sizing` event, keeps no new timing and chooses the same size. Its threads and attention are left to the
    rules; a size of another shape (another batch) is timed again. Each train reads its dataset's meta.json once, the
    sizing's reading passed on to the run."""
    timed, metas = timings_counted(monkeypatch), meta_reads(monkeypatch)
    monkeypatch.setattr("lmlab.core.busy.process_age", lambda: 0.0)  # each command's budget counts from its start
    settings = [a for s in ("train.threads=0", "train.attention=auto") for a in ("--set", s)]
    said, kept = [], b""
    for n in (1, 2):
        code, out, err = run_cli(capsys, "train", preset, "--run", tmp_path / f"run{n}", "--device", "cpu",
                                 "--budget", "20s", "--size", "auto", *settings)
        assert code == 0, err
        said.append(" ".join(out.split()))
        if n == 1:
            first, kept = list(timed), timings()
    assert metas == [Path(load_config(preset).data.dataset)] * 2
    assert first and timed == first  # the second timed nothing
    assert timings() == kept
    events = [sizing_of(tmp_path / f"run{n}") for n in (1, 2)]
    assert events[0]["depth"] == events[1]["depth"]
    weighed = [[(c["depth"], c["how"]) for c in event["candidates"] if c["how"]] for event in events]
    assert weighed[1] == [(d, READ_BACK if h == MEASURED else h) for d, h in weighed[0]]
    assert {h for _, h in weighed[0]} == {MEASURED}
    assert " read back" not in said[0].split("size auto:")[1].split("):")[0] and "(--size auto)" in said[0]
    assert " read back" in said[1].split("size auto:")[1].split("):")[0] and "(--size auto, read back)" in said[1]
    code, out, err = run_cli(capsys, "plan", preset, "--budget", "20s", "--size", "auto", "--device", "cpu",
                             *settings, "--set", "train.batch_size=4")
    assert code == 0, err
    assert timed[len(first):] and "read back" not in " ".join(out.split())


def timings() -> dict:
    """The step timings the machine cache keeps."""
    return {k: v for k, v in json.loads(cache_path().read_text())["entries"].items() if v["kind"] == "timing"}


def test_the_api_refuses_a_shape_beside_a_size_as_the_command_does(preset, tmp_path):
    with pytest.raises(UserError, match="so model.n_embd would be overridden"):
        train(preset, run=tmp_path / "run", size="auto", budget="20s", n_embd=96)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_sweep_sizes_each_trial_as_train_does_and_names_the_best_by_its_final_score(preset, tmp_path, capsys,
                                                                                     monkeypatch):
    """Each trial is of the size its settings train best in the budget, so a setting is judged at the size it would
    be trained at; the trials compare on their final scores, not on the least of their noisy evaluations. A trial's
    thread choice reads the load over the trial before it: a window begun as the trial starts is too short to tell a
    quiet machine (the threads were then chosen on noise: one thread and a 1-layer model in one 60 s sweep)."""
    windows, start = [], ThreadChooser.start

    def recorded(chooser: ThreadChooser, device: torch.device):
        windows.append(chooser.meter.elapsed())
        return start(chooser, device)

    monkeypatch.setattr(ThreadChooser, "start", recorded)
    assert main(["sweep", str(preset), "--size", "auto", "--budget-seconds", "15", "--set",
                 "train.learning_rate=2e-3,6e-3", "--set", "train.threads=1", "--name", "lr", "--dir", str(tmp_path),
                 "--device", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    fit, finals = read_fit(preset), {}
    for lr in ("2e-3", "6e-3"):
        run = tmp_path / "lr" / f"learning_rate={lr}"
        cfg = RunDir(run).config()
        assert sizing_of(run)["depth"] == 2 and (cfg.model.n_layer, cfg.model.n_embd) == (2, 32)
        assert cfg.train.learning_rate == pytest.approx(float(lr) * fit.lr.factor(32, 32), rel=1e-2)
        finals[lr] = next(e for e in RunDir(run).events() if e["event"] == "final")
        assert summarize(run).final_val_loss == finals[lr]["val_loss"]
    best = min(finals, key=lambda lr: finals[lr]["val_loss"])
    assert f"best setting: learning_rate={best} (final val {finals[best]['val_loss']:.4f}" in out
    assert "final val" in out.partition("best setting")[0]  # the comparison's column
    assert json.loads((tmp_path / "lr" / "sweep.json").read_text())["size"] == "auto"
    assert len(windows) == 2 and windows[1] > 5  # the first trial's 15 s


@pytest.mark.parametrize("args, message", [
    (["--size", "auto"], "--size auto sizes each trial to a time budget; give one with --budget-seconds"),
    (["--size", "2", "--budget-tokens", "4096"], "pass --budget-seconds with --size, or drop --size"),
    (["--size", "auto", "--budget-seconds", "20", "--set", "model.n_layer=1,2"],
     "--size auto sets model.n_layer, model.n_embd, model.n_head, model.n_kv_head from the preset's family"),
])
def test_sweep_size_refusals_write_nothing(preset, tmp_path, capsys, args, message):
    assert main(["sweep", str(preset), "--set", "train.learning_rate=1e-3,2e-3", "--dir", str(tmp_path / "sweeps"),
                 "--device", "cpu", *args]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_ends_the_timing_of_sizes_at_once_and_writes_nothing(preset, tmp_path, stop):
    """With a context of 100,000 the first size's step runs for minutes in one attention call (Python runs no
    signal handler meanwhile): SIGINT or SIGTERM is heard as it comes, never ignored or ending it without a word,
    and a timing that does not end within the grace is left with the process (nothing of the run is written yet);
    the signal is sent once the command has spent more CPU time than its start-up takes."""
    run = tmp_path / "run"
    child = subprocess.Popen([LMLAB, "train", str(preset), "--run", str(run), "--budget", "1h", "--size", "auto",
                              "--device", "cpu", "--set", "model.block_size=150000", "--set", "model.pos_emb=rope",
                              "--set", "train.batch_size=2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_until(lambda: cpu_ticks(child.pid) > 5 * os.sysconf("SC_CLK_TCK"), child, timeout=300)
    child.send_signal(stop)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, out + err
    assert f"stopped by {stop.name} while it " in err and ": nothing was written" in err
    assert "Traceback" not in err and not run.exists() and not (tmp_path / ".run.lock").exists()


def test_size_auto_without_a_fit_of_its_recipe_takes_the_nearest_lmlab_ships_and_says_so(tmp_path, char_dataset,
                                                                                         capsys):
    bare = write_config(tmp_path / "bare.toml", char_dataset)
    assert main(["plan", str(bare), "--budget", "20s", "--size", "auto", "--device", "cpu"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"note: {bare} has no fit of its own nor of its recipe: sized by the nearest, {ROOT / 'configs'}/" in said
    assert f"`lmlab scaling {bare} --refit --budget 10m` measures one of its own in 10 minutes" in said


@pytest.mark.slow
def test_refit_trains_a_miniseries_once_and_keeps_its_fit_beside_the_preset(tmp_path, char_dataset, capsys):
    preset = write_config(tmp_path / "mini.toml", char_dataset)
    refit = ["scaling", str(preset), "--refit", "--depths", "1,2,3", "--tokens", "2k,4k", "--lr-factors", "1,2",
             "--dir", str(tmp_path / "runs"), "--device", "cpu"]
    assert main(refit) == 0
    out = capsys.readouterr().out
    fit = read_fit(preset)
    assert len(fit.runs) == 6 and {r["depth"] for r in fit.runs} == {1, 2, 3}  # 3 depths x 2 lengths
    assert [s["depth"] for s in fit.lr_search] == [1, 2, 3] and all(len(s["vals"]) == 2 for s in fit.lr_search)
    assert out.count("miniseries ") == 9  # per depth: 2 LRs at 2k, then 4k at the rule's LR
    # The time it will take is foretold first, in one line, before "miniseries 1/30".
    foretold = " ".join(out.split("miniseries 1/")[0].split())
    assert f"miniseries: 9 of 9 runs to train under {tmp_path / 'runs' / 'mini-miniseries'}, about " in foretold
    assert " of training on cpu: " in foretold and "plus each run's set-up and evaluation" in foretold
    assert fit.measured["command"].startswith(f"lmlab scaling {preset} --refit --depths 1,2,3 --tokens 2048,4096")
    assert fit.dataset["train_tokens"] == read_meta(char_dataset)["train"]["tokens"]  # what a pass over it is
    # each depth's longer run against the surface through the other five: a figure the fit did not bend to
    assert [h["depth"] for h in fit.held_out] == [1, 2, 3]
    for h in fit.held_out:
        longest = max((r for r in fit.runs if r["depth"] == h["depth"]), key=lambda r: r["tokens"])
        assert (h["tokens"], h["val"]) == (longest["tokens"], longest["val"])
        assert h["predicted"] != fit.surface.predict(h["params"], h["tokens"])
    for r in fit.runs:  # each point is a finished run of its depth, at the rule's LR or the search's nearest
        events = RunDir(r["run"]).events()
        assert events[-1]["event"] == "end" and RunDir(r["run"]).config().model.n_layer == r["depth"]
        # its val the figure the run ended on, as a sized run ends on it: not its evaluations' estimate
        assert r["val"] == [e["val_loss"] for e in events if e["event"] == "final"][-1] != events[-1]["best_val_loss"]
    assert main(refit) == 0  # again: every run is kept, nothing trains
    again = capsys.readouterr().out
    assert "miniseries " not in again and "miniseries: its 9 runs are trained already" in " ".join(again.split())
    assert main(["scaling", str(preset)]) == 0
    shown = capsys.readouterr().out
    assert fit.surface.describe()[:20] in shown and "LR rule" in shown and "fit again with: lmlab scaling" in shown
    assert "held out: each depth's longest run against the fit through the other runs: depth 1 " in shown


# A fit file's figures out of the range a fit can make (lmlab.experiments.family.BOUNDS), and what its refusal names.
BAD_FITS = [
    (("lr", "exponent"), 1e6, "lr.exponent is 1e+06, where a fit's is a number from -4 to 4"),  # was OverflowError
    (("surface", "alpha"), -1, "surface.alpha is -1, where a fit's is a number above 0 and at most 3"),  # val 827,699
    (("surface", "beta"), 0, "surface.beta is 0, where a fit's is a number above 0 and at most 3"),
    (("surface", "E"), float("nan"), "surface.E is nan, where a fit's is a number from 0 to 100"),
    (("surface", "A"), -5, "surface.A is -5, where a fit's is a number from 0 to 1e+12"),
    (("surface", "B"), "1", "surface.B is '1', where a fit's is a number from 0 to 1e+12"),
    (("lr", "scale"), 0, "lr.scale is 0, where a fit's is a number above 0 and at most 1000"),
    (("lr", "scale"), True, "lr.scale is True, where a fit's is a number above 0 and at most 1000"),
    (("runs", 0), 5, "runs holds an entry that is not an object"),
    (("runs", 1, "val"), None, "runs[1].val is None, where a fit's is a number above 0 and at most 100"),
    (("runs", 1, "params"), -1, "runs[1].params is -1, where a fit's is a number above 0 and at most 1e+13"),
    (("dataset",), [1], "is not a fit lmlab can read (its dataset is not an object)"),
    # What `lmlab scaling PRESET` shows of where it was measured (was an AttributeError traceback).
    (("measured", "machine"), 3, "is not a fit lmlab can read (its measured.machine is not an object)"),
    (("measured", "seconds"), "x", "is not a fit lmlab can read (its measured.seconds is not a number)"),
]


@pytest.mark.parametrize("command", ["plan", "train", "scaling"])
@pytest.mark.parametrize("where, value, message", BAD_FITS, ids=lambda v: str(v)[:20])
def test_a_fit_files_figures_are_checked_when_it_is_read(preset, tmp_path, capsys, command, where, value, message):
    """A fit's figures are checked when it is read: an LR exponent of 1e6 or an alpha of -1 is one sentence in
    `plan` and `train`, never an OverflowError traceback or a predicted val of 827,699.66."""
    mine = tmp_path / preset.name
    mine.write_bytes(preset.read_bytes())
    fit = json.loads(fit_path(preset).read_text())
    *path, last = where
    holder = fit
    for key in path:
        holder = holder[key]
    holder[last] = value
    fit_path(mine).write_text(json.dumps(fit))
    args = {"plan": ["--budget", "20s", "--size", "3", "--device", "cpu"], "scaling": [],
            "train": ["--size", "3", "--run", str(tmp_path / "r"), "--device", "cpu"]}[command]
    assert main([command, str(mine), *args]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert f"{fit_path(mine)}" in said and message in said
    assert f"fit it again with `lmlab scaling {mine} --refit --budget 10m`." in said
    assert not (tmp_path / "r").exists()


def test_a_fit_is_of_what_its_preset_sets_not_of_its_comments_or_layout(tmp_path):
    shipped = ROOT / "configs" / "shakespeare-char-modern-cpu.toml"
    text = shipped.read_text(encoding="utf-8")
    for name, edited, same in (("comment", "# measured again on another host\n" + text, True),
                               ("layout", text.replace(" = ", "="), True),
                               ("setting", text.replace("optimizer = \"muon\"", "optimizer = \"adamw\""), False)):
        (tmp_path / f"{name}.toml").write_text(edited, encoding="utf-8")
        assert (preset_sha256(tmp_path / f"{name}.toml") == preset_sha256(shipped)) is same, name


@pytest.mark.slow
def test_plan_size_auto_says_what_train_says_of_a_fit_of_another_preset_or_dataset(preset, tmp_path):
    """`plan --size auto` says what `train` says when the preset changed since its fit, and measures the floor and
    scale of data the fit was not made on, as `train` does (a roomier budget where a busy machine left its share too
    few steps: the verdict is on what it said)."""
    mine = tmp_path / preset.name
    mine.write_text(preset.read_text().replace("learning_rate = 3e-3", "learning_rate = 2e-3", 1))
    fit = json.loads(fit_path(preset).read_text())
    fit["dataset"]["train_sha256"] = "0" * 64  # fitted on another text of the same tokenizer
    fit_path(mine).write_text(json.dumps(fit))
    for budget in (60, 180, 600):
        # a process of its own, as a user's: a budget counts from its process's start
        planned = subprocess.run([LMLAB, "plan", mine, "--budget", f"{budget}s", "--size", "auto", "--device", "cpu",
                                  "--set", "train.threads=1"], capture_output=True, text=True, timeout=300, check=False)
        assert planned.returncode == 0, planned.stderr
        said = " ".join(planned.stdout.split())
        if "were not measured" not in said:
            break
    assert f"note: {mine} changed since {fit_path(mine)} was fitted: its predictions may not hold" in said
    assert f"its floor and scale measured on {fit['dataset']['path']} " in said


DEMO = ROOT / "configs" / "shakespeare-char-modern-cpu.toml"


def timing_cost(step: float) -> float:
    """What `time_step` spends on a step of `step` seconds: a warm-up step, an evaluation's batch, the timed steps."""
    return timing_seconds(step, step / 3)


def demo_fitted_on(tmp_path: Path, dataset: Path) -> Path:
    """A copy of the demo's preset whose fit names `dataset` as the data it was made on: the rule sizes by the fit as
    it is, with nothing to calibrate (tests/test_calibration.py has the data a fit was not made on)."""
    preset = tmp_path / DEMO.name
    preset.write_text(DEMO.read_text(encoding="utf-8"), encoding="utf-8")
    fit = json.loads(fit_path(DEMO).read_text(encoding="utf-8"))
    fit["dataset"]["train_sha256"] = read_meta(dataset)["train"]["sha256"]
    fit_path(preset).write_text(json.dumps(fit), encoding="utf-8")
    return preset


def demo_preset(tmp_path: Path, char_dataset: Path, monkeypatch, budget: float) -> tuple[Path, object]:
    """The demo's preset and its fit, over the tests' data read as the demo's 4,281,748-token train split."""
    preset = demo_fitted_on(tmp_path, char_dataset)
    real = sizing.read_meta
    monkeypatch.setattr(sizing, "read_meta", lambda path: {**(meta := real(path)),
                                                           "train": {**meta["train"], "tokens": 4_281_748}})
    return preset, with_vocab(load_config(preset, [f"data.dataset={char_dataset}", f"train.budget_seconds={budget}"]))


@pytest.mark.parametrize("budget", [60, 300, 1800])
@pytest.mark.parametrize("overhead, rate, bend", [(0.01, 0.5e12, 0.0), (0.08, 0.1e12, 0.0), (0.01, 0.5e12, 0.3)],
                         ids=["a fast line", "a slow line", "a machine that bends"])
def test_the_climb_times_sizes_from_the_smallest_and_chooses_the_best_of_all(
        char_dataset, monkeypatch, tmp_path, budget, overhead, rate, bend):
    """The rule over budgets and machines (a step played by a clock: a fixed cost and its FLOPs at a rate, bent where
    a larger step uses the cores better, as a CPU's do): the sizes are timed from the smallest up, each once, until
    one predicts a higher val than one below it or its timing would pass TIMING_SHARE of the budget; the choice, timed
    itself, is the lowest predicted val of every size the fit and memory allow, the ones the climb did not time
    included (each timed here too, on the same clock, from the same start)."""
    preset, cfg = demo_preset(tmp_path, char_dataset, monkeypatch, budget)
    taken = []

    def step_of(cfg) -> float:
        with torch.device("meta"):
            flops = build_model(cfg.model).flops_per_token() * cfg.train.batch_size * cfg.model.block_size
        return overhead + (flops / rate) ** (1 - bend)

    def timed(cfg, machine, deadline=math.inf, before=None) -> Timing:
        taken.append(cfg.model.n_layer)
        step = step_of(cfg)
        return Timing(1, step, step / 2, 4 * 10**6, timing_cost(step), 0.05)

    monkeypatch.setattr(size_search, "time_config", timed)
    started = time.perf_counter()
    made = choose_size(preset, cfg, started, a_machine())
    weighed, chosen = [c for c in made.candidates if c.timing], made.chosen
    assert taken == [c.depth for c in weighed] == list(range(1, len(taken) + 1))
    assert chosen.timing and chosen.step_seconds == step_of(chosen.config)
    assert sum(c.timing.cost for c in weighed[1:]) <= TIMING_SHARE * budget
    last = made.candidates[-1]
    assert last.note or last.predicted is None or last.predicted > chosen.predicted  # why the climb stopped
    assert chosen.predicted == min(c.predicted for c in weighed if c.steps)
    family, found, meta = sizing.family_of(preset, cfg)
    every = size_search.search(family, found.fit, budget, started, a_machine(), meta, depths=list(range(1, 13)))
    assert chosen.depth == min((c for c in every.candidates if c.steps), key=lambda c: c.predicted).depth
    assert all(c.note for c in made.candidates if not c.timing)  # each size not weighed says why


def worth(tokens: float, unique: int) -> float:
    """What Muennighoff et al. 2023 (Scaling Data-Constrained Language Models) found `tokens` drawn again and again
    from `unique` worth in new tokens: U + U·R*·(1 - e^(-R/R*)), R the passes after the first, R* 15.4."""
    repeats = max(0.0, tokens / unique - 1)
    return min(tokens, unique * (1 + 15.4 * (1 - math.exp(-repeats / 15.4))))


@pytest.mark.parametrize("budget", [60, 300, 1800])
def test_size_auto_on_a_gpu_uses_the_presets_fit_and_weighs_each_size_at_what_its_repeats_are_worth(
        char_dataset, monkeypatch, tmp_path, fake_gpu, budget):
    """The demo's fit (measured on a CPU) on a GPU, no refit: the loss a recipe reaches by size and tokens is no
    device's, so only the speed is the GPU's (played by a clock: 4 ms of launches and the FLOPs at 1 TFLOP/s). The
    GPU repeats the tiny train split tens to thousands of times in these budgets: each size is predicted at the new
    tokens its passes are worth, so the choice is the best for the budget and the data, a larger size than
    predicting at every token new would choose; the line names the fit and the passes it plans."""
    preset = demo_fitted_on(tmp_path, char_dataset)

    def timed(cfg, machine, deadline=math.inf, before=None) -> Timing:
        assert machine.device.type == "cuda"
        with torch.device("meta"):
            flops = build_model(cfg.model).flops_per_token() * cfg.train.batch_size * cfg.model.block_size
        step = 0.004 + flops / 1e12
        return Timing(1, step, step / 2, 10**7, 0.5, 0.05)

    monkeypatch.setattr(size_search, "time_config", timed)
    cfg = with_vocab(load_config(preset, [f"data.dataset={char_dataset}", f"train.budget_seconds={budget}"]))
    made = choose_size(preset, cfg, time.perf_counter(), Machine.of("cuda", cfg.train.dtype))
    fit, unique = read_fit(preset), read_meta(char_dataset)["train"]["tokens"]
    planned = [c for c in made.candidates if c.steps]
    at_worth = {c.depth: fit.surface.predict(c.multiplied, worth(c.tokens, unique)) for c in planned}
    assert all(c.predicted == pytest.approx(at_worth[c.depth]) for c in planned)
    assert made.chosen.depth == min(at_worth, key=at_worth.__getitem__)  # no size predicted better is passed over
    as_new = {c.depth: fit.surface.predict(c.multiplied, c.tokens) for c in planned}
    assert min(as_new, key=as_new.__getitem__) < made.chosen.depth
    passes = made.chosen.tokens / unique
    line = " ".join(made.line().split())
    assert "tokens/s measured on NVIDIA A100-SXM4-80GB" in line
    assert (f"{passes:.2f} passes over the {unique:,}-token train split, worth "
            f"{worth(made.chosen.tokens, unique) / unique:.2f} of new text") in line
    assert f"(by {fit_path(preset)}, fitted on AMD EPYC (a CPU)" in line
    event = made.record()
    assert (event["fit"], event["fitted_on"], event["passes"]) == (str(fit_path(preset)), "AMD EPYC (a CPU)",
                                                                   round(passes, 2))


@pytest.mark.slow  # the step model counts each size's kernels on the meta device: about a second a size
def test_plan_previews_the_automatic_size_for_a_named_gpu_by_its_datasheet_timing_nothing(preset, capsys,
                                                                                         monkeypatch):
    """`plan --budget 5m --size auto --gpu "RTX 3090"` from a machine without that GPU: each size's step foretold by
    the datasheet step model (lmlab.experiments.gputime, eager, as the run's timing steps are), nothing timed here;
    the choice said in the line a run on that GPU starts with, and the budget planned."""
    timed = timings_counted(monkeypatch)
    monkeypatch.setattr("lmlab.core.busy.process_age", lambda: 0.0)  # a command's budget counts from its start: now
    code, out, err = run_cli(capsys, "plan", preset, "--budget", "5m", "--size", "auto", "--gpu", "RTX 3090")
    assert code == 0, err
    said = " ".join(out.split())
    assert timed == [] and "Sizes weighed for 5m of" in said and "on RTX 3090 by its datasheet (* chosen)" in said
    depth = int(re.search(r"size auto: (\d+) layers? of", said)[1])
    cfg = Family.of(with_vocab(load_config(preset)), "tiny").config(depth, read_fit(preset))
    step = gpu_step_time(cfg, "RTX 3090", "float32", compiled=False).seconds  # the preset's dtype
    tokens_per_sec = cfg.train.batch_size * cfg.model.block_size / step
    assert (f"{tokens_per_sec:,.0f} tokens/s foretold for RTX 3090 by its datasheet: an eager float32 step, nothing "
            "timed,") in said
    assert "The budget as planned: the 5.0 min:" in said


def test_plan_foretells_sizes_for_a_named_gpu_only_with_a_size(preset, capsys):
    code, _, err = run_cli(capsys, "plan", preset, "--budget", "5m", "--gpu", "RTX 3090")
    assert code == 2 and ("--budget with --gpu RTX 3090 previews the sizes of a preset's family on that GPU: give "
                          "--size auto") in " ".join(err.split())


def test_each_depth_weighed_is_made_once_however_often_it_is_planned_and_timed(char_dataset, monkeypatch, tmp_path):
    """Each depth's config is made by the family once, however often it is planned (again after each timing of the
    climb), and the chosen size trains that config."""
    preset, cfg = demo_preset(tmp_path, char_dataset, monkeypatch, 300)
    made_at, real = Counter(), Family.config
    monkeypatch.setattr(Family, "config", lambda family, depth, fit=None: made_at.update([depth]) or real(family,
                                                                                                          depth, fit))

    def timed(cfg, machine, deadline=math.inf, before=None) -> Timing:
        step = 0.01 * cfg.model.n_layer ** 2
        return Timing(1, step, step / 2, 4 * 10**6, timing_cost(step), 0.05)

    monkeypatch.setattr(size_search, "time_config", timed)
    made = choose_size(preset, cfg, time.perf_counter(), a_machine())
    assert made_at == Counter(c.depth for c in made.candidates)
    assert [c.record()["width"] for c in made.candidates] == [c.config.model.n_embd for c in made.candidates]
    assert made.config == Family.of(cfg, str(preset)).config(made.chosen.depth, read_fit(preset))
