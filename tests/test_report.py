"""`lmlab report`: every section's figures against the run folders they come from, the HTML page self-contained,
the evaluation kept in the run, and an old folder reported with what it lacks said so."""

from __future__ import annotations

import base64
import json
import re
import shutil
import statistics
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
from lmlab.writeup.findings import RunFacts, eval_noise, reading
from lmlab.writeup.report import build_report
from tests.helpers import write_config

LEGACY = Path(__file__).parent / "data" / "legacy"
MODERN = ["model.pos_emb=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, char_dataset) -> tuple[Path, Path]:
    """A GPT-2-style run of 40 steps and a modern one trained to 20 steps, then resumed to 40."""
    root = tmp_path_factory.mktemp("report")
    config = write_config(root / "tiny.toml", char_dataset, max_iters=40)
    gpt2 = Trainer(load_config(config), root / "runs" / "gpt2", "cpu").run().run_dir
    modern = root / "runs" / "modern"
    Trainer(load_config(config, [*MODERN, "train.max_iters=20"]), modern, "cpu").run()
    Trainer(load_config(modern / "config.toml", ["train.max_iters=40"]), modern, "cpu", resume=True).run()
    return gpt2, modern


@pytest.fixture(scope="module")
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
    assert table["modern"][1].startswith(f"{starts[1]['params'] / 1000:.3g}k {ratio:.2f}×")
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


@pytest.mark.slow
def test_a_second_report_reuses_the_kept_evaluation(two_runs, tmp_path, report, capsys):
    assert main(["report", str(two_runs[0]), "--out", str(tmp_path / "again"), "--device", "cpu"]) == 0
    md = (tmp_path / "again" / "report.md").read_text()
    assert rows(md, "Evaluation")[""] == ["kept from an earlier evaluation"]
    assert f"`{two_runs[0].name}` is a GPT-2 model" in section(md, "Summary")


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
    Trainer(load_config(config), run.path, "cpu")  # set up, never trained
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
    run = Trainer(config, tmp_path / "runs" / "words", "cpu").run().run_dir
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
    assert main(["report", str(imported_gpt2), "--out", str(out / "imported"), "--no-eval"]) == 0
    said = section((out / "imported" / "report.md").read_text(), "Summary")
    assert f"imported from {RunDir(imported_gpt2).events()[0]['origin']['source']}" in said
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
    run = Trainer(load_config(config, ["model.block_size=8"]), tmp_path / "short", "cpu").run().run_dir
    windows = (json.loads((char_dataset / "meta.json").read_text())["val"]["tokens"] - 1) // 8
    assert windows > 2 * 32  # three batches at least: the pace of the second says how long the rest takes
    capsys.readouterr()
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    said = next(i for i, line in enumerate(lines) if line.startswith(f"Evaluating {run} (best, step 10) on its full "
                                                                       f"val split ("))
    assert re.fullmatch(rf"{re.escape(str(run))} \(best, step 10\): about [\d.]+ (s|min) more, at the pace of its "
                        r"second batch of windows", lines[said + 1]), lines[said:said + 3]
