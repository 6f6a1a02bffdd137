"""Listing, comparing and fitting runs from their directories; streaming metrics to TensorBoard."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from lmlab.analysis.runs import summarize
from lmlab.analysis.scaling import LossSurface, fit_caveats, fit_loss_surface, fit_power_law
from lmlab.commands import main
from lmlab.core.config_toml import load_config
from lmlab.core.errors import UserError
from lmlab.data.prepare import prepare
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from tests.helpers import ALPACA_TINY, LMLAB, write_config, write_corpus


@pytest.fixture(scope="session")
def three_runs(tmp_path_factory, char_dataset) -> list[Path]:
    """Three real trainings of different widths on the tests' play-like corpus."""
    root = tmp_path_factory.mktemp("compare")
    runs = []
    for name, width, steps in (("small", 16, 20), ("medium", 32, 30), ("large", 48, 40)):
        config = load_config(write_config(root / "tiny.toml", char_dataset, max_iters=steps),
                             [f"model.n_embd={width}"])
        runs.append(Trainer(train_job(config, root / "runs" / name, "cpu")).run().run_dir)
    return runs


def as_json(capsys, *args) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_compare_figures_match_the_metrics_files(three_runs, capsys, tmp_path):
    plot = tmp_path / "compare.png"
    out = as_json(capsys, "compare", *map(str, three_runs), "--plot", str(plot), "--x", "tokens", "--log")
    starts = [RunDir(r).events()[0] for r in three_runs]
    ends = [RunDir(r).events()[-1] for r in three_runs]
    best = [min(e["val_loss"] for e in RunDir(r).events() if e["event"] == "eval") for r in three_runs]
    assert out["base"] == "small" and out["plot"] == str(plot) and plot.stat().st_size > 20_000
    for i, row in enumerate(out["runs"]):
        assert row["params"] == starts[i]["params"] and row["tokens"] == ends[i]["tokens"]
        assert row["params_ratio"] == pytest.approx(starts[i]["params"] / starts[0]["params"])
        assert row["tokens_ratio"] == pytest.approx(ends[i]["tokens"] / ends[0]["tokens"])
        assert row["flops"] == pytest.approx(starts[i]["flops_per_token"] * ends[i]["tokens"])
        assert row["best_val_loss"] == best[i]
        assert row["best_val_loss_change"] == pytest.approx(best[i] / best[0] - 1)
        assert row["tokens_per_param"] == pytest.approx(ends[i]["tokens"] / starts[i]["params"])
        assert row["chinchilla_percent"] == pytest.approx(100 * ends[i]["tokens"] / (20 * starts[i]["params"]))
        assert row["bits_per_byte"] > 0 and row["architecture"] == "GPT-2"


@pytest.mark.slow
def test_compare_fits_80_columns_and_shows_every_column_when_wide(three_runs):
    table = subprocess.run([LMLAB, "compare", *map(str, three_runs)], capture_output=True, text=True,
                           env={**os.environ, "COLUMNS": "80"}, check=True).stdout
    assert max(map(len, table.splitlines())) <= 80 and "…" not in table
    header = next(line for line in table.splitlines() if line.lstrip().startswith("run"))
    assert header.split()[0] == "run" and "best val" in header and "final val" in header
    row = next(line for line in table.splitlines() if line.lstrip().startswith("medium"))
    medium = summarize(three_runs[1])
    assert f"{medium.best_val_loss:.4f}" in row and f"{medium.final_val_loss:.4f}" in row
    assert "not shown, to fit 80 columns:" in table
    wide = subprocess.run([LMLAB, "compare", *map(str, three_runs), "--wide"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "80"}, check=True).stdout
    assert "not shown" not in wide and all(h in wide for h in ("Chinchilla", "val-train", "falling", "status"))


@pytest.mark.slow
def test_compare_samples_every_run_side_by_side(three_runs, capsys):
    assert main(["compare", *map(str, three_runs), "--prompt", "ROMEO:", "--max-new-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert "Samples, prompt 'ROMEO:'" in out
    assert len(re.findall(r"ROMEO:", out)) >= 3
    for run in three_runs:
        assert run.name in out


@pytest.mark.slow
def test_scaling_fits_compute_and_parameters(three_runs, capsys, tmp_path):
    plot = tmp_path / "scaling.png"
    assert main(["scaling", *map(str, three_runs), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "compute (FLOPs)" in out and "parameters" in out and "at 10× (rough)" in out
    # 20 to 40 steps of a few thousand parameters: nowhere near converged, and the fit must say so
    assert "Read the figure at 10× as a rough guess" in out
    assert "runs saw under half their Chinchilla-optimal tokens (small, medium, large)" in out
    assert plot.stat().st_size > 20_000


def test_scaling_names_what_its_runs_cannot_show():
    names, tokens, params = ["a", "b", "c"], [10**6] * 3, [1000, 2000, 4000]
    caveats = fit_caveats(names, tokens, params, [True, False, None])
    assert caveats[0].startswith("1 of 3 runs were still improving at their last evaluation (a)")
    assert any(c.startswith("every run saw the same tokens, so compute is proportional to parameters") for c in caveats)
    assert not any("Chinchilla" in c for c in caveats)  # 250 to 1000 tokens per parameter
    converged = fit_caveats(names, [20_000, 60_000, 200_000], params, [False] * 3)
    assert converged == []
    same_size = fit_caveats(["a", "b"], [40_000, 80_000], [1000, 1000], [False, False])
    assert any(c.startswith("every run has the same size") for c in same_size)
    assert any(c.startswith("a line through two runs") for c in same_size)


def test_a_loss_surface_is_recovered_from_a_grid_of_sizes_and_lengths():
    """L(N, D) = E + A / N^alpha + B / D^beta through 12 runs: the fit recovers the surface it was drawn from, and
    refuses a grid too small to say anything."""
    truth = LossSurface(1.2, 30.0, 0.3, 40.0, 0.35, 0.0)
    grid = [(n, d) for n in (5e4, 4e5, 1.3e6, 3e6) for d in (6e4, 2.6e5, 1e6)]
    fitted = fit_loss_surface([n for n, _ in grid], [d for _, d in grid], [truth.predict(n, d) for n, d in grid])
    assert fitted.rmse < 1e-3 and (fitted.alpha, fitted.beta) == pytest.approx((0.3, 0.35), abs=0.02)
    assert fitted.predict(2e6, 5e5) == pytest.approx(truth.predict(2e6, 5e5), abs=2e-3)
    with pytest.raises(UserError, match="at least 5 runs of at least 2 sizes and 2 lengths"):
        fit_loss_surface([1e5] * 6, [1e4 * i for i in range(1, 7)], [2.0] * 6)


def test_a_power_law_is_recovered_exactly():
    x = [1e12, 1e13, 1e14, 1e15]
    fit = fit_power_law(x, [5.0 * v ** -0.1 for v in x], list("abcd"), "compute")
    assert fit.a == pytest.approx(5.0) and fit.b == pytest.approx(-0.1)
    assert fit.rmse == pytest.approx(0.0, abs=1e-9) and fit.r2 == pytest.approx(1.0)
    assert fit.predict(1e16) == pytest.approx(5.0 * 1e16 ** -0.1)


@pytest.mark.slow
def test_runs_lists_finished_half_written_and_foreign_dirs(three_runs, capsys, tmp_path):
    root = three_runs[0].parent
    (root / "notes").mkdir(exist_ok=True)
    (root / "notes" / "todo.txt").write_text("not a run")
    (root / "broken").mkdir(exist_ok=True)
    (root / "broken" / "config.toml").write_text("[model]\n")
    (root / "old").mkdir(exist_ok=True)
    (root / "old" / "metrics.jsonl").write_text(
        '{"event": "start", "step": 0}\n{"event": "eval", "step": 5, "val_loss": 2.5}\n{"trunc')
    # A run from before the start event said its architecture: its model, built, says it.
    older = shutil.copytree(three_runs[0], root / "older", dirs_exist_ok=True)
    start, *rest = (older / "metrics.jsonl").read_text().splitlines(keepends=True)
    start = json.dumps({k: v for k, v in json.loads(start).items() if k != "architecture"}) + "\n"
    (older / "metrics.jsonl").write_text("".join([start, *rest]))
    listed = {r["run"]: r for r in as_json(capsys, "runs", str(root))["runs"]}
    assert listed["small"]["status"] == "finished"
    assert listed["notes"]["status"] == "not a run"
    assert listed["broken"]["status"] == "half-written"
    assert listed["old"]["status"] == "crashed" and listed["old"]["best_val_loss"] == 2.5
    assert (listed["small"]["model"], listed["small"]["params"]) == ("gpt 2L/16", summarize(three_runs[0]).params)
    assert (listed["small"]["architecture"], listed["small"]["shape"], listed["small"]["tokenizer"]) == \
        ("GPT-2", "2L/16", "char")
    described = ("architecture", "shape", "model", "params", "flops")
    assert [listed["older"][k] for k in described] == [listed["small"][k] for k in described]
    table = subprocess.run([LMLAB, "runs", str(root)], capture_output=True, text=True, check=True,
                           env={**os.environ, "COLUMNS": "80"}).stdout
    assert max(map(len, table.splitlines())) <= 80 and "…" not in table
    small = next(line.split() for line in table.splitlines() if line.lstrip().startswith("small"))
    assert small[:3] == ["small", "finished", "GPT-2"] and f"{listed['small']['best_val_loss']:.4f}" in small


def test_runs_where_there_are_none_says_so_in_a_line_and_how_to_train_one(tmp_path, monkeypatch, capsys):
    """A new folder: no `runs/` yet, or an empty one, is a line saying where runs were looked for and how one is
    trained, not an error or a table of headers; a folder named that is not there is still refused."""
    monkeypatch.chdir(tmp_path)
    said = "No runs under runs: train one with `lmlab train CONFIG --run runs/NAME`.\n"
    assert (main(["runs"]), capsys.readouterr().out) == (0, said)
    (tmp_path / "runs").mkdir()
    assert (main(["runs", "--wide"]), capsys.readouterr().out) == (0, said)
    assert as_json(capsys, "runs")["runs"] == []
    assert main(["runs", "elsewhere"]) == 2 and "elsewhere is not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_tensorboard_receives_the_same_metrics(tmp_path, char_dataset):
    config = load_config(write_config(tmp_path / "tiny.toml", char_dataset, max_iters=20),
                         ["train.tracker=tensorboard"])
    run = Trainer(train_job(config, tmp_path / "tb", "cpu")).run().run_dir
    events = EventAccumulator(str(run))
    events.Reload()
    logged = RunDir(run).events()
    train = [(e["step"], e["loss"]) for e in logged if e["event"] == "train"]
    val = [(e["step"], e["val_loss"]) for e in logged if e["event"] == "eval"]
    assert [(s.step, pytest.approx(s.value)) for s in events.Scalars("train/loss")] == train
    assert [(s.step, pytest.approx(s.value)) for s in events.Scalars("val/loss")] == val
    assert {"train/lr", "train/grad_norm", "perf/tokens_per_sec", "perf/ms_per_step"} <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_tensorboard_gets_the_hyperparameters_config_and_samples_without_changing_training(tmp_path, char_dataset):
    def train(tracker: str) -> Path:
        config = load_config(write_config(tmp_path / "tiny.toml", char_dataset, max_iters=20),
                             [f"train.tracker={tracker}", "model.dropout=0.1"])
        return Trainer(train_job(config, tmp_path / tracker, "cpu")).run().run_dir

    run, plain = train("tensorboard"), train("none")
    losses = [[e["loss"] for e in RunDir(r).events() if e["event"] == "train"] for r in (run, plain)]
    assert losses[0] == losses[1]  # sampling at each eval leaves training's random state alone
    events = EventAccumulator(str(run))
    events.Reload()
    plugin = {tag: HParamsPluginData.FromString(content)
              for tag, content in events.PluginTagToContent("hparams").items()}
    assert [m.name.tag for m in plugin["_hparams_/experiment"].experiment.metric_infos] == ["val/best_loss"]
    session = plugin["_hparams_/session_start_info"].session_start_info.hparams
    assert session["model.n_embd"].number_value == 32 and session["train.tracker"].string_value == "tensorboard"
    text = {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tag)]
            for tag in ("config/text_summary", "samples/text_summary")}
    assert text["config/text_summary"] == [(0, "\n".join("    " + line for line in
                                                          (run / "config.toml").read_text().splitlines()))]
    assert [step for step, _ in text["samples/text_summary"]] == [10, 20]
    assert all(len(sample.strip()) > 100 for _, sample in text["samples/text_summary"])


@pytest.mark.slow
def test_wandb_logs_under_the_configured_project_and_run_name(tmp_path, char_dataset, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # the real client, writing its run file instead of uploading it
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = load_config(write_config(tmp_path / "tiny.toml", char_dataset, max_iters=10),
                         ["train.tracker=wandb", 'train.tracker_project="lmlab-test-project"',
                          'train.tracker_run="first-try-of-the-day"'])
    run = Trainer(train_job(config, tmp_path / "wb", "cpu")).run().run_dir
    record = next((run / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"lmlab-test-project" in record and b"first-try-of-the-day" in record
    assert b"train/loss" in record and b"val/loss" in record


@pytest.mark.parametrize("name", ["", "team/project", "what?", "x" * 129])
def test_a_tracker_project_name_wandb_would_refuse_is_refused_first(tmp_path, char_dataset, name):
    with pytest.raises(UserError, match=r"train.tracker_project .* must be 1-128 characters without any of"):
        load_config(write_config(tmp_path / "tiny.toml", char_dataset), [f'train.tracker_project="{name}"'])


@pytest.mark.slow
def test_a_live_run_is_listed_as_running_with_a_current_plot(tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=100_000)
    run = tmp_path / "runs" / "live"
    proc = subprocess.Popen([LMLAB, "train", config, "--run", run], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run / "loss.png").exists():  # drawn at the first eval, not only at the end
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert summarize(run).status == "running"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    stopped = summarize(run)
    assert stopped.status == "stopped (SIGTERM)"
    proc = subprocess.Popen([LMLAB, "train", "--resume", run], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while summarize(run).steps <= stopped.steps:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert summarize(run).status == "crashed"


@pytest.fixture(scope="session")
def two_tokenizers(tmp_path_factory, corpus_dir, char_dataset) -> list[Path]:
    """The same text as characters and as bpe:300 tokens; the bpe run passes over its split 4.3 times."""
    root = tmp_path_factory.mktemp("tokenizers")
    bpe, _, _ = prepare([str(corpus_dir)], "bpe:300", name="tiny", out_dir=root / "data")
    runs = []
    for name, dataset, steps in (("char", char_dataset, 20), ("bpe", bpe, 200)):
        config = load_config(write_config(root / f"{name}.toml", dataset, max_iters=steps), ["train.eval_interval=20"])
        runs.append(Trainer(train_job(config, root / "runs" / name, "cpu")).run().run_dir)
    return runs


@pytest.mark.slow
def test_every_run_knows_its_passes_over_the_data_and_its_unique_tokens(two_tokenizers, capsys):
    listed = {r["run"]: r for r in as_json(capsys, "runs", str(two_tokenizers[0].parent))["runs"]}
    for run in two_tokenizers:
        split = json.loads((run / "dataset.json").read_text())["train"]["tokens"]
        start, *events = RunDir(run).events()
        row = listed[run.name]
        assert start["train_tokens"] == row["split_tokens"] == split
        assert row["epochs"] == pytest.approx(row["tokens"] / split)
        assert row["unique_tokens"] == min(row["tokens"], split)
        assert all(e["epoch"] == pytest.approx(e["tokens"] / split, abs=1e-4) for e in events if "epoch" in e)
    assert listed["bpe"]["epochs"] > 4 > listed["char"]["epochs"]
    rows = {r["run"]: r for r in as_json(capsys, "compare", *map(str, two_tokenizers))["runs"]}
    bpe = rows["bpe"]  # Chinchilla in unique tokens, the tokens seen beside it
    assert bpe["chinchilla_percent"] == pytest.approx(100 * listed["bpe"]["split_tokens"] / (20 * bpe["params"]))
    assert bpe["chinchilla_seen_percent"] == pytest.approx(100 * bpe["tokens"] / (20 * bpe["params"]))


@pytest.mark.slow
def test_runs_of_different_tokenizers_are_compared_in_bits_per_byte(two_tokenizers, capsys, tmp_path):
    rows = as_json(capsys, "compare", *map(str, two_tokenizers), "--plot", str(tmp_path / "compare.png"))["runs"]
    char, bpe = (summarize(r) for r in two_tokenizers)
    assert all(r["by_bytes"] for r in rows) and (tmp_path / "compare.png").stat().st_size > 20_000
    assert rows[1]["bits_per_byte_change"] == pytest.approx(bpe.best_bpb / char.best_bpb - 1)
    table = subprocess.run([LMLAB, "compare", *map(str, two_tokenizers)], capture_output=True, text=True, check=True,
                           env={**os.environ, "COLUMNS": "80"}).stdout
    assert max(map(len, table.splitlines())) <= 80 and "bits/byte: % change, as their tokenizers differ (char: " \
                                                        "char; bpe: bpe:300)" in " ".join(table.split())
    header = next(line for line in table.splitlines() if line.lstrip().startswith("run"))
    assert "bits/byte" in header and "best val" not in header  # the figure that compares them is kept longest
    assert f"{bpe.best_bpb:.3f} ({100 * (bpe.best_bpb / char.best_bpb - 1):+.1f}%)" in table
    listing = subprocess.run([LMLAB, "runs", str(two_tokenizers[0].parent)], capture_output=True, text=True,
                             check=True, env={**os.environ, "COLUMNS": "80"}).stdout
    assert "bits/byte" in next(line for line in listing.splitlines() if line.lstrip().startswith("run"))


@pytest.mark.slow
def test_compare_dataset_scores_every_run_of_its_tokenizer_on_one_text(two_tokenizers, tmp_path, capsys):
    """`compare --dataset DIR` scores each run on DIR's val split first, as `lmlab eval --dataset` does and kept in
    the run (not again once kept), its perplexity the column kept longest at 80 columns; a run of another tokenizer
    is said in one line and not scored."""
    import lmlab

    char, bpe = (Path(shutil.copytree(run, tmp_path / "runs" / run.name)) for run in two_tokenizers)
    other, _, _ = prepare([str(write_corpus(tmp_path / "novels", seed=1))], str(char), name="novels",
                          out_dir=tmp_path / "data")
    argv = [LMLAB, "compare", str(char), str(bpe), "--dataset", str(other)]
    job = subprocess.run(argv, capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "80"})
    said = [line for line in job.stderr.splitlines() if "not scored" in line]
    assert said == [f"bpe (bpe:300): not scored on {other}, whose tokenizer (char) is not theirs."], job.stderr
    kept = [r for r in RunDir(char).kept("results") if r["dataset"] == str(other)]
    assert len(kept) == 1 and not any(r["dataset"] == str(other) for r in RunDir(bpe).kept("results"))
    assert kept[0]["loss"] == as_json(capsys, "eval", str(char), "--dataset", str(other))["loss"]  # the same scorer
    table = job.stdout.splitlines()
    assert max(map(len, table)) <= 80 and "perplexity on" in next(line for line in table if "run" in line.split())
    assert f"{kept[0]['perplexity']:.2f}" in next(line for line in table if line.split()[:1] == ["char"])
    again = subprocess.run([*argv, "--json"], capture_output=True, text=True, check=True)
    assert "Evaluating" not in again.stderr and json.loads(again.stdout)["not_scored"] == ["bpe"]
    compared = lmlab.compare([char, bpe], dataset=other)
    assert compared.shared == kept[0]["val_sha256"] and compared.not_scored == ["bpe"]
    assert [c.header for c in compared.columns if c.header.startswith("perplexity")][0] == "perplexity on novels-char"


@pytest.mark.slow
def test_runs_of_different_tokenizers_get_no_shared_loss_axis_or_power_law(two_tokenizers, capsys, tmp_path):
    assert main(["scaling", *map(str, two_tokenizers), "--plot", str(tmp_path / "s.png")]) == 2
    assert ("scaling fits one power law through runs of one tokenizer on one text, and their tokenizers differ "
            "(char: char; bpe: bpe:300)") in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "s.png").exists()
    stripped = tmp_path / "stripped"  # a run whose dataset facts hold no byte counts: no bits per byte to draw
    shutil.copytree(two_tokenizers[1], stripped)
    facts = json.loads((stripped / "dataset.json").read_text())
    (stripped / "dataset.json").write_text(json.dumps({k: v for k, v in facts.items() if k not in ("train", "val")}))
    assert main(["compare", str(two_tokenizers[0]), str(stripped), "--plot", str(tmp_path / "c.png")]) == 2
    assert ("these runs cannot share a loss axis: their tokenizers differ (char: char; stripped: bpe:300): a loss "
            "per token is per a "
            "different unit, and stripped keeps no byte counts of its data (dataset.json) to draw it in bits per byte; "
            "plot them apart.") in \
        " ".join(capsys.readouterr().err.split())


@pytest.mark.slow
def test_kept_evaluations_give_perplexity_and_accuracy_columns(three_runs, capsys):
    small, medium = map(str, three_runs[:2])
    columns = " ".join(capsys.readouterr().out.split()) if main(["compare", small, medium, "--wide"]) == 0 else ""
    assert "perplexity" not in columns  # nothing kept yet: no empty columns
    assert main(["eval", small, "--json"]) == 0
    kept = json.loads(capsys.readouterr().out)
    rows = {r["run"]: r for r in as_json(capsys, "compare", small, medium)["runs"]}
    assert rows["small"]["evaluation"]["perplexity"] == kept["perplexity"] and rows["medium"]["evaluation"] is None
    assert main(["compare", small, medium, "--wide"]) == 0
    table = capsys.readouterr().out
    cells = [line for line in table.splitlines() if line.split()[:1] == ["small"]][0]
    assert "perplexity" in table and "accuracy" in table
    assert f"{kept['perplexity']:.2f}" in cells and f"{kept['accuracy']:.3f}" in cells
    assert main(["runs", str(Path(small).parent), "--wide"]) == 0
    assert f"{kept['perplexity']:.2f}" in capsys.readouterr().out


@pytest.mark.slow
def test_every_figure_is_shown_under_the_name_of_the_text_it_was_scored_on(trained, tmp_path, capsys):
    """`lmlab eval RUN` then `lmlab eval RUN --dataset OTHER`: the run's own figures (compare's and the API's
    `evaluation`, the title's text) stay its own split's, whatever was scored last; `compare` and `runs` hold a column
    per text, each headed by its dataset and holding that text's figures; `log` fills an evaluation's missing
    accuracy from its own split only."""
    import lmlab

    run = Path(shutil.copytree(trained, tmp_path / "runs" / "base"))
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in e.items() if k != "val_accuracy"}) + "\n"
                                               for e in events))  # as an older lmlab logged them: no accuracy
    other, _, _ = prepare([str(write_corpus(tmp_path / "novels", seed=1))], str(run), name="novels",
                          out_dir=tmp_path / "data")
    own = Path(RunDir(run).config().data.dataset).name
    mine = as_json(capsys, "eval", str(run), "--checkpoint", "20")
    theirs = as_json(capsys, "eval", str(run), "--checkpoint", "20", "--dataset", str(other))
    assert as_json(capsys, "eval", str(run), "--checkpoint", "10", "--dataset", str(other))["step"] == 10
    assert mine["perplexity"] != theirs["perplexity"]
    for rows in (as_json(capsys, "compare", str(run), "--checkpoint", "20")["runs"],
                 lmlab.compare([run], checkpoint="20").rows):
        assert rows[0]["evaluation"]["perplexity"] == mine["perplexity"]
        assert [(e["dataset"], e["perplexity"]) for e in rows[0]["evaluations"]] == [
            (mine["dataset"], mine["perplexity"]), (theirs["dataset"], theirs["perplexity"])]
    assert summarize(run, "20").evaluation["val_sha256"] == mine["val_sha256"]
    for argv in (["compare", str(run), "--checkpoint", "20", "--wide"], ["runs", str(run.parent), "--wide"]):
        assert main(argv) == 0
        lines = capsys.readouterr().out.splitlines()
        header, row = (next(line for line in lines if line.split()[:1] == [word]) for word in ("run", "base"))
        assert header.index(f"perplexity on {own}") < header.index("perplexity on novels-char")
        assert row.index(f"{mine['perplexity']:.2f}") < row.index(f"{theirs['perplexity']:.2f}"), argv
    # `log`: step 10 was scored whole only on other text, whose accuracy is no figure of its val batches
    assert [r["accuracy"] for r in as_json(capsys, "log", str(run))["evaluations"]] == [None, mine["accuracy"]]


@pytest.mark.slow
def test_a_fine_tune_against_its_base_is_said_to_be_scored_on_other_text(two_tokenizers, tmp_path, capsys):
    # bpe:300 reads the Alpaca records; a context of 512 holds them with their prompt
    config = load_config(two_tokenizers[1] / "config.toml", ["model.block_size=512", "train.max_iters=10"])
    base, tuned = Trainer(train_job(config, tmp_path / "base", "cpu")).run().run_dir, tmp_path / "tuned"
    assert main(["finetune", str(base), "--data", str(ALPACA_TINY), "--out", str(tuned), "--set",
                 "finetune.epochs=1", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["compare", str(base), str(tuned), "--wide"]) == 0
    said = " ".join(re.sub("[│┃]", " ", capsys.readouterr().out).split())
    assert (f"bits/byte: % change, as they were scored on different text (base: the val split of "
            f"{Path(config.data.dataset).name}; tuned: held-out instruction records, not a val split): a loss per "
            "token of one is not the other's") in said
    assert said.count("different text") == 1, said  # the reason is said once, not repeated in the verdict


@pytest.mark.slow
def test_an_imported_model_compares_on_its_evaluation_of_a_val_split(imported_gpt2, corpus_dir, tiny_run, capsys,
                                                                      tmp_path):
    """`lmlab compare runs/sft runs/gpt2` after import-hf and a whole-split `lmlab eval` compares the import, never
    asking to "train it past one eval_interval": an import (or a run stopped before its first evaluation) compares
    on its checkpoint's kept `lmlab eval`; what it trained elsewhere is no figure of it here ("-", null)."""
    run = Path(shutil.copytree(imported_gpt2, tmp_path / "gpt2"))
    (run / "evaluations.json").unlink(missing_ok=True)  # the session's import, as another test may have evaluated it
    assert main(["compare", str(tiny_run), str(run)]) == 2
    assert f"evaluate it on a val split of its tokenizer with `lmlab eval {run} --dataset DIR`" in \
        capsys.readouterr().err
    dataset, _, _ = prepare([str(corpus_dir)], str(run), name="own", out_dir=tmp_path / "data")
    assert main(["eval", str(run), "--dataset", str(dataset)]) == 0
    evaluation = RunDir(run).kept("results")[-1]
    capsys.readouterr()
    assert main(["compare", str(run), str(tiny_run), "--json"]) == 0
    rows = {row["run"]: row for row in json.loads(capsys.readouterr().out)["runs"]}
    imported = rows["gpt2"]
    assert (imported["best_val_loss"], imported["val_from"]) == (evaluation["loss"], "lmlab eval")
    assert imported["bits_per_byte"] == evaluation["bits_per_byte"]
    assert imported["tokens"] is imported["flops"] is imported["chinchilla_percent"] is None
    assert rows[tiny_run.name]["tokens_ratio"] is None and rows[tiny_run.name]["tokens"] > 0
    assert main(["compare", str(tiny_run), str(run), "--wide"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("gpt2"))
    assert f"{evaluation['loss']:.4f} (eval)" in line


def test_log_gives_each_evaluations_perplexity_accuracy_and_gradient_norm_and_plots_the_norm(trained, capsys,
                                                                                              tmp_path):
    """Every evaluation's val perplexity and next-token accuracy, both of the batches its val loss is of, and the
    gradient norm of the steps since the one before (a WikiText-2 study's table of perplexity and accuracy by
    evaluation, and the LR hypothesis it tests on the gradient norm)."""
    import math

    import torch

    from lmlab.api.run import Run
    from lmlab.data.loader import open_tokens
    from lmlab.data.shards import read_meta
    from lmlab.train.estimate import estimate_loss

    run = Path(shutil.copytree(trained, tmp_path / "run"))
    assert main(["log", str(run), "--json", "--plot", str(tmp_path / "norm.png")]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)["evaluations"]
    events = RunDir(run).events()
    evals = [e for e in events if e["event"] == "eval"]
    assert [row["step"] for row in rows] == [e["step"] for e in evals] == [10, 20]
    for row, event in zip(rows, evals):
        assert row["perplexity"] == pytest.approx(math.exp(row["val_loss"]))
        assert row["accuracy"] == event["val_accuracy"] and 0 < row["accuracy"] < 1
        before = max(e["step"] for e in evals if e["step"] < row["step"]) if row["step"] > 10 else 0
        norms = [e["grad_norm"] for e in events if e["event"] == "train" and before < e["step"] <= row["step"]]
        assert (row["grad_norm"], row["grad_norm_max"]) == (pytest.approx(sum(norms) / len(norms)), max(norms))
    # Scored again on the batches of its evaluation, the last checkpoint gives its logged loss and accuracy.
    cfg, model = Run(run).config, Run(run).model("20", device="cpu")
    dataset = Path(cfg.data.dataset)
    again = estimate_loss(model, open_tokens(dataset, "val", read_meta(dataset)["dtype"]), cfg.model.block_size,
                          cfg.train.batch_size, cfg.train.eval_iters, cfg.train.seed + 2, torch.device("cpu"),
                          torch.float32)
    assert again.loss == pytest.approx(rows[-1]["val_loss"], rel=1e-5)
    assert again.accuracy == pytest.approx(rows[-1]["accuracy"], abs=1e-3)
    assert f"{tmp_path / 'norm.png'}" in err and (tmp_path / "norm.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["log", str(run), "--wide"]) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and "accuracy" in table and "grad norm (mean / max)" in table
    assert f"{rows[0]['accuracy']:.3f}" in table and f"{rows[0]['perplexity']:.2f}" in table


def test_log_of_a_run_that_logged_no_accuracy_shows_a_whole_split_eval_of_the_step(trained, capsys, tmp_path):
    """An eval event without val_accuracy (an older lmlab's) takes the accuracy of a whole-split `lmlab eval` kept for
    the checkpoint of its step, and none where no such evaluation is kept."""
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in e.items() if k != "val_accuracy"}) + "\n"
                                               for e in events))
    assert main(["eval", str(run), "--checkpoint", "20"]) == 0
    measured = RunDir(run).kept("results")[-1]
    capsys.readouterr()
    rows = as_json(capsys, "log", str(run))["evaluations"]
    assert [row["accuracy"] for row in rows] == [None, measured["accuracy"]]


def _variant(trained: Path, to: Path, tokenizer: str | None = None, corpus: str | None = None) -> Path:
    """A copy of a trained run as if its dataset had been prepared with another tokenizer (the same text, other
    tokens) or from another corpus (other text, its dataset named `corpus`)."""
    run = Path(shutil.copytree(trained, to))
    facts = json.loads((run / "dataset.json").read_text())
    facts["val"]["sha256"] = "0" * 64  # other tokens either way
    facts["tokenizer"] = tokenizer or facts["tokenizer"]
    facts["input_sha256"] = "1" * 64 if corpus else facts["input_sha256"]
    (run / "dataset.json").write_text(json.dumps(facts))
    start, *rest = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    event = json.loads(start)
    event["tokenizer"] = facts["tokenizer"]
    event["dataset"] = str(Path(event["dataset"]).parent / corpus) if corpus else event["dataset"]
    (run / "metrics.jsonl").write_text(json.dumps(event) + "\n" + "".join(rest))
    return run


def test_compare_says_every_reason_runs_do_not_compare_with_the_runs_on_each_side(trained, tmp_path):
    """Tokenizers and text are two reasons, each said with the runs of each side; runs of one text under two
    tokenizers (their val splits' tokens differ) are of the same text."""
    import lmlab

    same = _variant(trained, tmp_path / "same", "bpe:300")
    other = _variant(trained, tmp_path / "other", corpus="novels-char")
    other_bpe = _variant(trained, tmp_path / "other-bpe", "bpe:300", corpus="novels-bpe300")
    char, ours = RunDir(trained).dataset()["tokenizer"], Path(RunDir(trained).events()[0]["dataset"]).name
    run = trained.name

    def reason(*runs: Path) -> str | None:
        return lmlab.compare(runs).reason

    assert reason(trained, same) == f"their tokenizers differ ({run}: {char}; same: bpe:300): a loss per token is " \
                                    "per a different unit"
    assert reason(trained, other) == (f"they were scored on different text ({run}: the val split of {ours}; other: "
                                      "the val split of novels-char): a loss per token of one is not the other's")
    assert reason(trained, same, other, other_bpe) == (
        f"their tokenizers differ ({run}, other: {char}; same, other-bpe: bpe:300) and they were scored on different "
        f"text ({run}, same: the val split of {ours}; other, other-bpe: the val split of novels-char): a loss per "
        "token of one is not the other's")
    assert reason(trained, trained) is None
    title = lmlab.compare([trained, same, other]).title
    assert "their tokenizers differ" in title and "scored on different text" in title
