"""`lmlab report`: every section's figures against the run folders they come from, the HTML page self-contained,
the evaluation kept in the run, and an old folder reported with what it lacks said so."""

from __future__ import annotations

import base64
import html
import json
import random
import re
import shutil
import statistics
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lmlab.analysis.runs import summarize
from lmlab.commands import main
from lmlab.core.config import SamplingParams
from lmlab.core.config_toml import load_config
from lmlab.core.humanize import format_duration
from lmlab.evals.evaluate import evaluate_run
from lmlab.inference.generate import sample
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from lmlab.writeup.findings import RunFacts, eval_noise, reading
from lmlab.writeup.report import build_report
from tests.helpers import SPEAKERS, as_budgeted, phrase, write_config, write_corpus

LEGACY = Path(__file__).parent / "data" / "legacy"
MODERN = ["model.pos_emb=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false"]


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory, char_dataset) -> tuple[Path, Path]:
    """A GPT-2-style run of 40 steps and a modern one trained to 20 steps, then resumed to 40."""
    root = tmp_path_factory.mktemp("report")
    config = write_config(root / "tiny.toml", char_dataset, max_iters=40)
    gpt2 = Trainer(train_job(load_config(config), root / "runs" / "gpt2", "cpu")).run().run_dir
    modern = root / "runs" / "modern"
    Trainer(train_job(load_config(config, [*MODERN, "train.max_iters=20"]), modern, "cpu")).run()
    Trainer(train_job(load_config(modern / "config.toml", ["train.max_iters=40"]), modern, "cpu", resume=True)).run()
    return gpt2, modern


@pytest.fixture(scope="session")
def report(two_runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "report"
    assert main(["report", *map(str, two_runs), "--out", str(out), "--device", "cpu"]) == 0
    return out


def section(markdown: str, heading: str) -> str:
    return markdown.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """The rows of the tables under a heading, by their first cell."""
    found = {}
    for line in section(markdown, heading).splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            found[cells[0]] = cells[1:]
    return found


@pytest.mark.slow
def test_every_section_matches_the_run_folders(two_runs, report):
    md = (report / "report.md").read_text()
    runs = [RunDir(p) for p in two_runs]
    starts = [r.events()[0] for r in runs]
    ends = [r.events()[-1] for r in runs]
    machine = rows(md, "Machine and software")
    assert machine["CPU"] == [s["machine"]["cpu"] for s in starts]
    assert machine["memory"] == [f"{s['machine']['memory_bytes'] / 2**30:.1f} GiB" for s in starts]
    assert machine["device, dtype"] == [f"{s['device']}, {s['dtype']}" for s in starts]
    assert machine["torch (CUDA)"][0] == f"{starts[0]['machine']['torch']} (none)"
    assert machine["resumed"] == ["never", "at step 20 on cpu (float32)"]

    data = rows(md, "Data")
    meta = runs[0].dataset()
    assert data["documents"] == [f"{meta['train']['documents']:,} train, {meta['val']['documents']:,} val"] * 2
    assert data["tokens"] == [f"{meta['train']['tokens']:,} train, {meta['val']['tokens']:,} val"] * 2
    assert data["tokens per document"][0].startswith("not recorded: a char dataset")

    model = rows(md, "Model and config")
    assert model["parameters"] == [f"{s['params']:,}" for s in starts]
    assert model["without embeddings"] == [f"{s['params_non_embedding']:,}" for s in starts]
    assert model["FLOPs per token"] == [f"{s['flops_per_token']:.3g}" for s in starts]
    assert model["architecture"] == [f"GPT-2: {starts[0]['model']}", f"modern: {starts[1]['model']}"]
    assert (runs[1].path / "config.toml").read_text().strip() in md

    training = rows(md, "Training")
    assert training["tokens"] == [f"{e['tokens']:,}" for e in ends]
    assert training["wall time"] == [format_duration(e["elapsed"]) for e in ends]
    for i, run in enumerate(runs):
        trains = [e for e in run.events() if e["event"] == "train"]
        evals = [e for e in run.events() if e["event"] == "eval"]
        assert training["tokens/s (median)"][i] == f"{statistics.median(e['tokens_per_sec'] for e in trains):,.0f}"
        mfu = [e["mfu"] for e in trains if e["mfu"] is not None]  # none against a peak measured busy
        assert training["MFU (median)"][i] == (f"{100 * statistics.median(mfu):.1f}%" if mfu else "-")
        split = meta["train"]["tokens"]
        assert training["passes over the data"][i] == f"{ends[i]['tokens'] / split:.2f} over the {split:,}-token " \
                                                      "train split"
        six_nd = 6 * starts[i]["params"] * ends[i]["tokens"]
        assert training["6·N·D"][i].startswith(f"{six_nd:.3g} FLOPs: 6·N·D counts all {starts[i]['params']:,} "
                                               "parameters")
        best = min(evals, key=lambda e: e["val_loss"])
        assert training["best val loss (estimate)"][i] == f"{best['val_loss']:.4f} at step {best['step']}"
    assert training["resumes"] == ["none", "1 (at step 20)"]
    assert training["steps"] == ["40 of 40", "40 of 40"]  # of their max_iters, the modern one's as its resume set it
    assert training["ended"] == ["finished", "finished"]


@pytest.mark.slow
def test_the_evaluation_is_the_full_split_one_and_is_kept_in_the_run(two_runs, report):
    md = (report / "report.md").read_text()
    evaluation = rows(md, "Evaluation")
    for i, path in enumerate(two_runs):
        kept = RunDir(path).kept("results")
        assert len(kept) == 1
        fresh = evaluate_run(RunDir(path).load("best", "cpu"), fresh=True)
        assert fresh["loss"] == kept[0]["loss"] and fresh["weights_sha256"] == kept[0]["weights_sha256"]
        assert evaluation["loss"][i] == f"{fresh['loss']:.4f}"
        assert evaluation["perplexity"][i] == f"{fresh['perplexity']:.3f}"
        assert evaluation["next-token accuracy"][i] == f"{100 * fresh['accuracy']:.1f}%"
        assert evaluation["bits per byte"][i] == f"{fresh['bits_per_byte']:.4f}"
        assert len(RunDir(path).kept("results")) == 1  # the fresh one replaced the same key
    assert evaluation[""] == ["evaluated now", "evaluated now"]


@pytest.mark.slow
def test_summary_chinchilla_and_samples(two_runs, report):
    md = (report / "report.md").read_text()
    runs = [RunDir(p) for p in two_runs]
    starts, ends = [r.events()[0] for r in runs], [r.events()[-1] for r in runs]
    losses = [r.kept("results")[0]["loss"] for r in runs]
    summary = section(md, "Summary")
    assert "`model.pos_emb` learned / rope" in summary and "`model.mlp` gelu / swiglu" in summary
    best, other = (0, 1) if losses[0] < losses[1] else (1, 0)
    assert (f"`{runs[best].name}` has the lowest val loss on the full val split: {losses[best]:.4f}, "
            f"{losses[other] - losses[best]:.4f}") in summary
    table = rows(md, "Summary")
    ratio = starts[1]["params"] / starts[0]["params"]
    assert table["params"][1].startswith(f"{starts[1]['params'] / 1000:.3g}k {ratio:.2f}×")  # a run a column
    final = [e for e in runs[1].events() if e["event"] == "final"][-1]
    assert table["modern"][0].startswith("`model.bias=false`, `model.mlp=swiglu`, `model.norm=rmsnorm`, ")
    assert table["modern"][-1].startswith(f"{final['val_loss']:.4f}")  # a run a row: what differs, its final val
    chinchilla = rows(md, "Chinchilla")
    split = runs[0].dataset()["train"]["tokens"]  # 40 steps of 256 tokens: under one pass, so every token is new
    assert all(e["tokens"] < split for e in ends)
    assert chinchilla["tokens per parameter"] == [f"{e['tokens'] / s['params']:.2f} unique, "
                                                  f"{e['tokens'] / s['params']:.2f} seen" for e, s in zip(ends, starts)]
    share = [100 * e["tokens"] / (20 * s["params"]) for e, s in zip(ends, starts)]
    assert chinchilla["data"] == [f"{e['tokens'] / split:.2f} passes over the {split:,}-token train split; "
                                  f"{c:.1f}% of Chinchilla-optimal in unique tokens, {c:.1f}% in tokens seen"
                                  for e, c in zip(ends, share)]
    assert chinchilla["to the compute-optimal point"][0].startswith(f"{20 * starts[0]['params']:,} tokens")
    samples = section(md, "Samples")
    for run in runs:
        text = sample(run.load("best", "cpu"), "", SamplingParams(300))
        assert f"### `{run.name}`\n\n```text\n{text.rstrip()}\n```" in samples


@pytest.mark.slow
def test_images_are_linked_relatively_and_inlined_in_the_html(report):
    md = (report / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(["compare.png", "gpt2-loss.png", "modern-loss.png"])
    page = (report / "report.html").read_text()
    inlined = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)">', page)
    assert [base64.b64decode(d) for d in inlined] == [(report / link).read_bytes() for link in links]
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing outside the page
    assert "<details><summary>config.toml of modern</summary>" in page


# Each table shown on the page: its right edge, how far its content reaches past its box, and its headers.
TABLES = """() => [...document.querySelectorAll('table')].filter(t => t.offsetParent !== null).map(t => ({
    right: t.getBoundingClientRect().right, beyond: t.scrollWidth - t.clientWidth,
    headers: [...t.querySelectorAll('th')].map(th => th.textContent)}))"""


@pytest.mark.slow
def test_the_comparison_is_seen_whole_at_1280_px_and_on_paper(report, browser):
    """Measured in Chromium as a reader opens report.html and prints it (A4, as wide as its printable area): the
    comparison's first table (the run, what differs, best and final val) and every other table fit the window, and
    the page, nothing cut or scrolled out of sight."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto((report / "report.html").as_uri())
    for width, media in ((1280, "screen"), (718, "print")):
        page.set_viewport_size({"width": width, "height": 900})
        page.emulate_media(media=media)
        tables = page.evaluate(TABLES)
        assert tables[0]["headers"] == ["run", "settings that differ", "best val", "final val"], tables[0]
        assert all(t["right"] <= width and t["beyond"] <= 0 for t in tables), (media, tables)
    page.close()


@pytest.mark.slow
def test_a_second_report_reuses_the_kept_evaluation(two_runs, tmp_path, report, capsys):
    assert main(["report", str(two_runs[0]), "--out", str(tmp_path / "again"), "--device", "cpu"]) == 0
    md = (tmp_path / "again" / "report.md").read_text()
    assert rows(md, "Evaluation")[""] == ["kept from an earlier evaluation"]
    assert f"`{two_runs[0].name}` is a GPT-2 model" in section(md, "Summary")


@pytest.mark.slow
def test_a_budgeted_run_is_reported_against_its_budget_s_plan_not_the_max_iters_it_ignored(two_runs, tmp_path):
    """`lmlab report` of a run a 70 s budget trained: its steps of its budget's plan, the budget named, and what it
    planned before its first step (was: "steps 40 of 5,000", the budget nowhere)."""
    run = as_budgeted(two_runs[0], tmp_path / "s004", 70.0, 36)
    assert main(["report", str(run), "--out", str(tmp_path / "report"), "--no-eval", "--device", "cpu"]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert rows(md, "Training")["steps"] == ["40 of 40 in a 70 s budget (36 planned before its first step)"]
    assert f" in {format_duration(summarize(run).elapsed)} of a 70 s budget on " in section(md, "Summary")


def test_a_run_from_before_the_machine_was_recorded_says_so(tmp_path, stable_root, monkeypatch):
    monkeypatch.chdir(stable_root)
    run = tmp_path / "trained"
    shutil.copytree(LEGACY / "trained", run)
    result = build_report([run], tmp_path / "out", device="cpu")
    md = result.markdown.read_text()
    machine = rows(md, "Machine and software")
    assert machine["CPU"] == ["not recorded"] and machine["GPU"] == ["not recorded"]
    assert machine["device, dtype"] == ["cpu, float32"]
    assert rows(md, "Evaluation")["loss"][0] == f"{RunDir(run).kept('results')[0]['loss']:.4f}"
    assert json.loads((run / "evaluations.json").read_text())["results"][0]["step"] == 10


def test_a_run_without_a_checkpoint_is_reported_with_the_reason(tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    run = RunDir(tmp_path / "runs" / "empty")
    Trainer(train_job(load_config(config), run.path, "cpu"))  # set up, never trained
    result = build_report([run.path], tmp_path / "out", device="cpu")
    evaluation = rows(result.markdown.read_text(), "Evaluation")
    assert evaluation["checkpoint"][0].startswith(f"{run.path} has no latest checkpoint")  # best falls back to it


@pytest.mark.slow
def test_imported_and_fine_tuned_runs_are_reported_with_what_they_have(tmp_path, imported_gpt2):
    from lmlab.core.config import FinetuneConfig
    from lmlab.train.finetune import finetune
    from tests.helpers import ALPACA_TINY

    imported = tmp_path / "imported"
    shutil.copytree(imported_gpt2, imported)
    (imported / "evaluations.json").unlink(missing_ok=True)  # another test may have evaluated it on its own data
    tuned = finetune(imported, tmp_path / "tuned", FinetuneConfig(str(ALPACA_TINY), epochs=1), device="cpu").run_dir
    md = build_report([imported, tuned], tmp_path / "out", device="cpu").markdown.read_text()
    origin = RunDir(tuned).events()[0]["origin"]
    data = rows(md, "Data")
    assert data["fine-tuning records"] == ["-", f"`{origin['data']}`: {origin['train_records']:,} train, "
                                           f"{origin['val_records']:,} held out, {origin['dropped_records']:,} too "
                                           f"long; 1 epochs, alpaca format"]
    assert data["documents"][0] == "none (an imported run has no training data)"
    evaluation = rows(md, "Evaluation")
    assert evaluation["checkpoint"][0].startswith(f"{imported} has no dataset of its own")
    assert rows(md, "Model and config")["kind"] == ["imported", f"fine-tuned from `{imported}`"]
    assert "### `tuned`" in section(md, "Samples")


@pytest.mark.slow
def test_a_dataset_with_documents_gets_its_length_histogram(tmp_path, corpus_dir):
    from lmlab.data.prepare import prepare
    from lmlab.data.stats import dataset_stats

    dataset, _, _ = prepare([str(corpus_dir)], "word:100", name="plays", out_dir=tmp_path / "data")
    config = load_config(write_config(tmp_path / "tiny.toml", dataset, max_iters=10))
    run = Trainer(train_job(config, tmp_path / "runs" / "words", "cpu")).run().run_dir
    md = build_report([run], tmp_path / "out", device="cpu").markdown.read_text()
    s = dataset_stats(dataset, 32)
    assert rows(md, "Data")["tokens per document"] == [
        f"mean {s['mean']:,.0f}, median {s['median']:,.0f}, p90 {s['p90']:,.0f}, max {s['max']:,}; "
        f"{100 * s['share_documents_beyond']:.1f}% of documents longer than the context (32)"]
    assert f"![document lengths of {dataset}](plays-word100-doc-lengths.png)" in md
    assert (tmp_path / "out" / "plays-word100-doc-lengths.png").stat().st_size > 10_000


def with_vals(run: Path, copy: Path, rise: float, gap: float | None = None) -> RunFacts:
    """A copy of `run` whose evaluations after the first read `rise` above it (its metrics.jsonl edited), and with
    `gap`, every evaluation's train loss that far below its val loss."""
    shutil.copytree(run, copy)
    events = RunDir(copy).events()
    first = next(e["val_loss"] for e in events if e["event"] == "eval")
    lines = [{**e, "val_loss": first + rise} if e["event"] == "eval" and e["step"] > 10 else e for e in events]
    if gap is not None:
        lines = [{**e, "train_eval_loss": e["val_loss"] - gap} if e["event"] == "eval" else e for e in lines]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    return RunFacts(RunDir(copy), summarize(copy), RunDir(copy).events(), RunDir(copy).config())


@pytest.mark.slow
def test_a_flat_val_is_called_settled_only_past_the_noise_of_its_eval_batches(two_runs, tmp_path):
    """A val that stays within the noise of its 4 eval batches is not a run that stopped improving."""
    gpt2 = two_runs[0]
    flat, risen = with_vals(gpt2, tmp_path / "flat", 0.0005), with_vals(gpt2, tmp_path / "risen", 1.0)
    noise = eval_noise(flat.summary.trains, 5, 4)
    assert noise is not None and 0.0005 < 2 * noise < 1.0  # the tiny run's batches differ by far more than 0.0005
    said = " ".join(reading([flat, risen]))
    assert (f"`flat`'s val loss has been flat since its best evaluation (best at step 10 of 40; the later ones are "
            f"within the ±{noise:.3f} noise of its 4 eval batches): whether more training lowers it is not told"
            ) in said
    assert re.search(r"`risen` stopped improving before its end \(best at step 10 of 40; its last evaluation is 1\.000 "
                     r"higher, over twice the ±[\d.]+ noise of its 4 eval batches\): more of the same training will "
                     r"not lower its loss\.", said)

    # One verdict with a gap between the splits, never "flat ... not told" and "`flat` overfits" in one report.
    flat, risen = with_vals(gpt2, tmp_path / "flat-gap", 0.0005, 0.5), with_vals(gpt2, tmp_path / "risen-gap", 1.0, 0.5)
    said = " ".join(reading([flat, risen]))
    assert "`flat-gap` overfits" not in said, said
    assert ("is not told; its val loss is 0.500 above its train loss at its best, a gap between the splits that is not "
            "told to be overfitting either; more eval batches") in said, said
    assert ("noise of its 4 eval batches); its val loss was 0.500 above its train loss at its best: it overfits: more "
            "of the same training will not lower its loss.") in said, said
    assert said.count("overfits") == 1, said


@pytest.mark.slow
def test_the_lowest_estimate_is_said_to_be_within_the_noise_of_the_next_where_it_is(two_runs, tmp_path):
    """Ranked by fixed-batch estimates, a lowest val loss within the noise of the next one's eval batches is said not
    to be told apart (as `sweep`'s best setting is); one well below it is not."""
    def shifted(name: str, delta: float) -> RunFacts:  # a copy of the GPT-2 run, every evaluation `delta` higher
        copy = Path(shutil.copytree(two_runs[0], tmp_path / name))
        events = [{**e, "val_loss": e["val_loss"] + delta} if e["event"] == "eval" else e
                  for e in RunDir(copy).events()]
        (copy / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        return RunFacts(RunDir(copy), summarize(copy), RunDir(copy).events(), RunDir(copy).config())

    base, near, far = shifted("base", 0.0), shifted("near", 0.0005), shifted("far", 1.0)
    noise = eval_noise(base.summary.trains, 5, 4)
    assert noise is not None and 0.0005 < 2 * noise < 1.0
    said = " ".join(reading([near, base]))
    assert "`base` has the lowest val loss (fixed-batch estimate at the evals)" in said
    assert f"That is within the noise of their eval batches (±{noise:.4f} and ±{noise:.4f}): the two are not told" \
           " apart" in said
    assert "within the noise of their eval batches" not in " ".join(reading([far, base]))


@pytest.mark.slow
def test_summaries_judge_a_fine_tune_an_import_and_one_run_by_what_they_are(tmp_path, imported_gpt2, corpus_dir):
    """A fine-tune's val loss is of its held-out records, its base's of a val split: without an evaluation of both on
    one split they are not ranked. An import was never trained here: it is no 'short training'. A report of one
    run says what the report of several says of it: repeated data, a gap to its train loss."""
    from tests.helpers import ALPACA_TINY

    # A base that can read instructions: the imported model's byte-level BPE, a model trained from scratch on it.
    assert main(["prepare", str(corpus_dir), "--tokenizer", str(imported_gpt2), "--name", "plays", "--out-dir",
                 str(tmp_path / "data")]) == 0
    config = write_config(tmp_path / "tiny.toml", next((tmp_path / "data").glob("plays-*")), max_iters=60)
    base, tuned, out = tmp_path / "base", tmp_path / "tuned", tmp_path / "reports"
    assert main(["train", str(config), "--run", str(base), "--set", "model.block_size=256", "--set",
                 "train.eval_interval=20", "--set", "train.threads=1"]) == 0
    assert main(["finetune", str(base), "--data", str(ALPACA_TINY), "--out", str(tuned), "--set",
                 "finetune.epochs=1", "--set", "finetune.threads=1"]) == 0
    assert main(["report", str(base), str(tuned), str(imported_gpt2), "--out", str(out / "three"),
                 "--no-eval"]) == 0
    summary = section((out / "three" / "report.md").read_text(), "Summary")
    plays = next((tmp_path / "data").glob("plays-*")).name
    assert (f"The runs are not ranked: their val losses are of different text (`base`: the val split of {plays}; "
            "`tuned`: held-out instruction records, not a val split), and they have no evaluation on one val split "
            "in common.") in summary
    assert "has the lowest" not in summary
    assert "Every run trained here saw under half its Chinchilla-optimal tokens" in summary  # `base` alone
    # What a kind of run has not, or never chose, is no difference: a fine-tune's [finetune] (the others have none),
    # its [train] (which follows from its [finetune]) and [data]; an import's [data] and [train].
    differing = next(line for line in summary.splitlines() if "setting" in line)
    assert differing.startswith("- `tuned` is a fine-tune of `base`: its [train] follows from its [finetune] and it "
                                "trained on records, not [data], so neither is compared. `tiny-gpt2` is imported: its "
                                "[data] and [train] are left out, never used. "), differing
    assert not re.search(r"`(finetune|train|data)\.", differing), differing
    # A Chinchilla plan is for a model trained from scratch.
    chinchilla = rows((out / "three" / "report.md").read_text(), "Chinchilla")
    assert chinchilla["to the compute-optimal point"][1:] == [
        "- (a fine-tune: the compute-optimal point is its base's, trained from scratch)",
        "- (imported: its training is not recorded here)"]
    assert chinchilla["to the compute-optimal point"][0].startswith(f"{20 * summarize(base).params:,} tokens")
    assert main(["report", str(imported_gpt2), "--out", str(out / "imported"), "--no-eval"]) == 0
    said = section((out / "imported" / "report.md").read_text(), "Summary")
    assert f"imported from `{RunDir(imported_gpt2).events()[0]['origin']['source']}`" in said
    assert "lmlab did not train it" in said and "trained 0 steps" not in said
    assert main(["report", str(base), "--out", str(out / "base"), "--no-eval"]) == 0
    said = " ".join(section((out / "base" / "report.md").read_text(), "Summary").split())
    s = summarize(base)
    assert f"`base` passes over its {s.split_tokens:,}-token train split {s.epochs:.1f} times" in said and s.epochs > 4
    gap = f"{s.gap:.3f} above its train loss"
    assert (gap in said) == (s.gap > 0.05), (s.gap, said)


@pytest.mark.slow
def test_the_evaluation_says_how_long_it_will_take_once_it_has_timed_its_second_batch(tmp_path, char_dataset,
                                                                                       capsys):
    """The estimate from the run's training speed was off by twice; this one is the evaluation's own pace."""
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=10)
    run = Trainer(train_job(load_config(config, ["model.block_size=8"]), tmp_path / "short", "cpu")).run().run_dir
    windows = (json.loads((char_dataset / "meta.json").read_text())["val"]["tokens"] - 1) // 8
    assert windows > 2 * 32  # three batches at least: the pace of the second says how long the rest takes
    capsys.readouterr()
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    said = next(i for i, line in enumerate(lines) if line.startswith(f"Evaluating {run} (best, step 10) on its full "
                                                                       f"val split ("))
    assert re.fullmatch(rf"{re.escape(str(run))} \(best, step 10\): about [\d.]+ (s|min) more, at the pace of its "
                        r"second batch of windows", lines[said + 1]), lines[said:said + 3]


# A user's text that would load from a host, run a link or break a table if it were read as Markdown or HTML.
HOSTILE = "x`![a](http:\\\\203.0.113.9\\a.png)`<img src=http:\\\\203.0.113.9\\b.png>[l](javascript:alert(1))|y"


class Page(HTMLParser):
    """A page's elements (tag, attributes) and the cells of each row of each of its tables."""

    def __init__(self, page: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.tables: list[list[int]] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs) -> None:
        self.elements.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append(0)
        elif tag in ("td", "th"):
            self.tables[-1][-1] += 1


def loads_nothing_and_keeps_its_tables(page: str, images: set[str]) -> None:
    """No element of `page` loads or links anything but `images`; every row of each table has its header's cells."""
    found = Page(page)
    assert {(tag, src) for tag, attrs in found.elements for src in [attrs.get("src")] if src} <= \
        {("img", src) for src in images}, found.elements
    assert not [e for e in found.elements if {"href", "srcset", "action", "data"} & e[1].keys()], found.elements
    assert found.tables and all(len(set(rows)) == 1 for rows in found.tables), found.tables


@pytest.mark.slow
def test_text_from_outside_is_shown_as_written_and_the_page_loads_nothing(two_runs, char_dataset, tmp_path):
    """Every field of a report a user's text reaches, with Markdown and HTML in it: the runs' folders (one with a line
    break), the dataset's folder and a setting (each in the settings that differ), the prompt (and the error that
    quotes it: the char runs never saw its characters), a task's name, the path in a never-trained run's error. The
    Markdown and the page show the text as written, load nothing and keep their tables."""
    dataset = shutil.copytree(char_dataset, tmp_path / f"{HOSTILE}-char")
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=10)
    settings = [f"data.dataset={dataset}", f"train.tracker_run={HOSTILE}"]
    Trainer(train_job(load_config(config, settings), tmp_path / "trained", "cpu")).run()
    Trainer(train_job(load_config(config, settings), tmp_path / "empty", "cpu"))  # set up, never trained
    # lmlab names a new run's folder plainly: these names are a user's renaming.
    runs = [tmp_path / f"1{HOSTILE}", tmp_path / f"2{HOSTILE}\n- z", tmp_path / f"3{HOSTILE}"]
    (tmp_path / "trained").rename(runs[0])
    shutil.copytree(two_runs[0], runs[1])
    (tmp_path / "empty").rename(runs[2])
    rng = random.Random(0)
    task = tmp_path / f"{HOSTILE}.jsonl"
    task.write_text("".join(json.dumps({"context": f"{rng.choice(SPEAKERS)}:\n", "answer": 0, "choices": [
        phrase(rng, 1, 2), phrase(rng, 1, 2)]}) + "\n" for _ in range(3)))
    assert main(["eval", str(runs[0]), "--task", str(task), "--device", "cpu"]) == 0
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out), "--device", "cpu", "--prompt", HOSTILE]) == 0
    from markdown_it import MarkdownIt

    as_markdown = MarkdownIt("commonmark", {"html": False}).enable("table").render((out / "report.md").read_text())
    links = {attrs["src"] for tag, attrs in Page(as_markdown).elements if tag == "img"}
    assert {urllib.parse.unquote(link) for link in links} == {p.name for p in out.glob("*.png")}  # each PNG, by name
    page = (out / "report.html").read_text()
    inlined = {f"data:image/png;base64,{d}" for d in re.findall(r'src="data:image/png;base64,([^"]+)"', page)}
    for rendered, images in ((as_markdown, links), (page, inlined)):
        loads_nothing_and_keeps_its_tables(rendered, images)
        text = html.unescape(re.sub(r"<[^>]*>", "", rendered))
        for shown in (HOSTILE, f"2{HOSTILE}\\n- z", f"{dataset}", f"train.tracker_run={HOSTILE}", f"{HOSTILE} acc"):
            assert shown in text, shown


@pytest.mark.slow
def test_plot_titles_and_legends_fit_their_figure_whatever_the_names(two_runs, tmp_path):
    """Runs scored on different text (a dataset of other plays, under a long name) with names short and long: the
    overlay's title, which names each run and its text, its legend, and each run's loss plot's title stay inside their
    figure, as drawn."""
    import lmlab
    from lmlab.data.prepare import prepare

    other, _, _ = prepare([str(write_corpus(tmp_path / "corpus", seed=1))], "char", name="other-plays-" * 10,
                          out_dir=tmp_path / "data")
    trained = Trainer(train_job(load_config(write_config(tmp_path / "tiny.toml", other, max_iters=10)),
                                tmp_path / "other", "cpu")).run().run_dir
    for names in (["a", "b"], ["W" * 200, "a long run name " * 12]):
        runs = [shutil.copytree(run, tmp_path / name) for run, name in zip((two_runs[0], trained), names)]
        figures = [lmlab.compare(runs).plot(x="tokens"), *(lmlab.Run(run).plot() for run in runs)]
        assert "scored on different text" in " ".join(figures[0].axes[0].get_title().split())
        for figure in figures:
            figure.canvas.draw()
            for drawn in (figure.axes[0].title, figure.axes[0].get_legend()):
                box = drawn.get_window_extent()
                assert figure.bbox.x0 <= box.x0 and box.x1 <= figure.bbox.x1 and box.y1 <= figure.bbox.y1, names
