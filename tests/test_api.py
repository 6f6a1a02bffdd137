"""The Python API (`import lmlab`) through its public face, on real files and real runs: what it prepares, trains,
reads back, samples, evaluates and compares, that the commands give the same results through it, and that every
bad argument is one sentence (lmlab.UserError)."""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

import lmlab
from lmlab.commands import main
from tests.helpers import stable_events, write_config


def quiet() -> Console:
    return Console(quiet=True)


@pytest.fixture(scope="session")
def runs(tmp_path_factory, char_dataset) -> tuple[lmlab.Run, lmlab.Run]:
    """Two tiny runs of the same data: a 2-layer and a 1-layer model, 20 steps each."""
    root = tmp_path_factory.mktemp("api")
    config = write_config(root / "tiny.toml", char_dataset, max_iters=20)
    first = lmlab.train(config, run=root / "two", device="cpu", threads=1, console=quiet())
    return first, lmlab.train(first.config, run=root / "one", device="cpu", n_layer=1, console=quiet())


@pytest.mark.slow
def test_a_corpus_prepared_and_trained_in_python_reads_back(tmp_path, corpus_dir):
    data = lmlab.prepare(corpus_dir, tokenizer="char", name="plays", out_dir=tmp_path / "data", console=quiet())
    assert data.path == tmp_path / "data" / "plays-char" and data.built and data.tokens > 10_000
    assert data.stats()["documents"] == data.meta["train"]["documents"] + data.meta["val"]["documents"]
    assert not lmlab.prepare(corpus_dir, tokenizer="char", name="plays", out_dir=tmp_path / "data").built
    log = io.StringIO()  # not a terminal: plain periodic lines, as a log or a pipe keeps them
    run = lmlab.train(write_config(tmp_path / "tiny.toml", "unused"), run=tmp_path / "run", device="cpu",
                      dataset=data, max_iters=20, threads=1, console=Console(file=log, width=100))
    assert "step 10/20 | loss" in log.getvalue() and "best val loss" in log.getvalue()
    assert run.result.steps == 20 and run.result.stopped_by is None and run.config.data.dataset == str(data.path)
    assert [row["step"] for row in run.history] == [10, 20] and run.kind == "trained"
    assert list(run.history_frame().index) == [10, 20]
    assert [(c.name, c.step, c.best, c.latest) for c in run.checkpoints] == [
        ("step_000010", 10, run.history[0]["is_best"] and not run.history[1]["is_best"], False),
        ("step_000020", 20, run.history[1]["is_best"], True)]
    assert run.plot().axes[0].get_title() == "run: loss"
    model = run.model(device="cpu")
    assert isinstance(model, torch.nn.Module) and not model.training and next(model.parameters()).device.type == "cpu"
    assert run.model(device="cpu") is model  # kept while the checkpoint's weights are unchanged
    assert run.tokenizer.decode(run.tokenizer.encode("ROMEO:")) == "ROMEO:"


@pytest.mark.slow
def test_the_commands_give_what_the_api_gives(tmp_path, runs, capsys):
    """`lmlab train`, `sample` and `eval` are the API's train, Run.sample and Run.eval: the same runs, texts and
    figures."""
    config = write_config(tmp_path / "tiny.toml", runs[0].config.data.dataset, max_iters=20)
    assert main(["train", str(config), "--run", str(tmp_path / "cli"), "--device", "cpu",
                 "--set", "train.threads=1"]) == 0
    assert stable_events(tmp_path / "cli") == stable_events(runs[0].path)
    capsys.readouterr()
    assert main(["sample", str(runs[0].path), "--prompt", "ROMEO:", "--max-new-tokens", "30", "--seed", "7"]) == 0
    printed = capsys.readouterr().out
    text = runs[0].sample("ROMEO:", max_new_tokens=30, seed=7, device="cpu")
    assert printed == text + "\n" and text.startswith("ROMEO:")
    assert "".join(runs[0].sample("ROMEO:", max_new_tokens=30, seed=7, stream=True)) == text
    assert (runs[0].path / "samples.txt").read_text().count("--- checkpoint best") == 3
    three = runs[0].samples("", 3, max_new_tokens=12, seed=7, keep=False)
    assert len(three) == 3 and three[0] == runs[0].sample(max_new_tokens=12, seed=7, keep=False)
    assert main(["eval", str(runs[0].path), "--json", "--max-tokens", "300"]) == 0
    kept = json.loads(capsys.readouterr().out)
    result = runs[0].eval(max_tokens=300, device="cpu")
    assert result["loss"] == kept["loss"] and math.isclose(result["perplexity"], math.exp(result["loss"]))


@pytest.mark.slow
def test_a_run_continues_and_starts_from_another_in_python(tmp_path, runs):
    copy = lmlab.train(runs[0].config, run=tmp_path / "copy", device="cpu", console=quiet())
    more = lmlab.train(resume=copy, max_iters=30, console=quiet())
    assert more.path == copy.path and more.result.steps == 30 and [r["step"] for r in more.history] == [10, 20, 30]
    started = lmlab.train(runs[0].config, run=tmp_path / "tuned", init_from=str(runs[0].path), max_iters=10,
                          console=quiet())
    assert started.events[0]["init_from"] and started.result.steps == 10


@pytest.mark.slow
def test_runs_compare_as_a_table_for_a_terminal_and_a_notebook(runs):
    compared = lmlab.compare(runs)
    assert [row["run"] for row in compared.rows] == ["two", "one"] and compared.rows[1]["params_ratio"] < 1
    assert compared.reason is None and compared.title.startswith("Compared with two")
    html = compared._repr_html_()
    assert "<table>" in html and ">two<" in html and ">one<" in html and "best val" in html
    text = str(compared)
    assert "Compared with two" in text and " one " in text and "<" not in text
    narrow = Console(file=io.StringIO(), width=60)
    narrow.print(compared)
    assert "not shown, to fit 60 columns" in narrow.file.getvalue()
    assert list(compared.to_pandas().index) == ["two", "one"]
    assert compared.plot(x="tokens").axes[0].get_xlabel() == "tokens seen"


@pytest.mark.slow
def test_without_pandas_the_frames_are_refused_in_a_sentence(runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # as where pandas is not installed
    with pytest.raises(lmlab.UserError, match="needs pandas, which is not installed"):
        runs[0].history_frame()
    with pytest.raises(lmlab.UserError, match="needs pandas, which is not installed"):
        lmlab.compare(runs).to_pandas()


BAD = [  # (what is called, what the sentence says)
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", budget="-1m"), "is not a duration above 0"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", budget=0), "is not a duration above 0"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", budget=math.nan), "is not a duration above 0"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", budget=10**12), "up to 366 days"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", budget="forever"), "is not a duration"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", max_iters=-1), "train.max_iters"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", max_iters=0), "train.max_iters"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", max_iters=10**20), "train.max_iters"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", max_iters="3"), "must be int, got '3' (str)"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", learning_rate=math.nan),
     "train.learning_rate is nan; it must be a finite number"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", layers=2), "layers is no config key"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", n_layer=[2]), "n_layer=[2]: a config key takes"),
    (lambda r, d: lmlab.train(d / "missing.toml", run=d / "x"), "does not exist"),
    (lambda r, d: lmlab.train(r.config), "a RunConfig has no file name"),
    (lambda r, d: lmlab.train(), "needs a CONFIG.toml"),
    (lambda r, d: lmlab.train(d / "tiny.toml", resume=r), "--resume RUN continues a run"),
    (lambda r, d: lmlab.train(resume=r, budget="1m"), "--budget plans a new run"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=r.config.data.dataset), "is the dataset dir"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=r.path), "already has checkpoints"),
    (lambda r, d: lmlab.Run(d / "nowhere"), "is not an lmlab run"),
    (lambda r, d: r.sample(temperature=-1), "temperature is -1"),
    (lambda r, d: r.sample(temperature=math.nan), "temperature is nan"),
    (lambda r, d: r.sample(temperature="hot"), "temperature is 'hot'; it must be a number"),
    (lambda r, d: r.sample(max_new_tokens=0), "max_new_tokens is 0"),
    (lambda r, d: r.sample(max_new_tokens=2**60), "max_new_tokens is"),
    (lambda r, d: r.sample(max_new_tokens=2.5), "max_new_tokens is 2.5; it must be a whole number"),
    (lambda r, d: r.sample(top_k=0), "top_k is 0"),
    (lambda r, d: r.sample(top_p=0), "top_p is 0"),
    (lambda r, d: r.sample(seed=-1), "seed is -1"),
    (lambda r, d: r.sample(stop="END"), "stop is 'END'; it must be a list of strings"),
    (lambda r, d: r.sample(temprature=0.5), "temprature is no sampling setting"),
    (lambda r, d: r.sample(checkpoint="step_7"), "has no checkpoint at step 7"),
    (lambda r, d: r.sample(checkpoint="soon"), "soon"),
    (lambda r, d: r.samples("", 0), "num_samples is 0"),
    (lambda r, d: r.samples("", -2), "num_samples is -2"),
    (lambda r, d: r.samples("", 2.5), "num_samples is 2.5"),
    (lambda r, d: r.samples("", 2**60), "num_samples is"),
    (lambda r, d: r.eval(batch_size=0), "batch_size is 0"),
    (lambda r, d: r.eval(batch_size=math.nan), "batch_size is nan"),
    (lambda r, d: r.eval(batch_size="32"), "batch_size is '32'"),
    (lambda r, d: r.eval(max_tokens=-1), "max_tokens is -1"),
    (lambda r, d: r.eval(max_tokens=10**20), "max_tokens is"),
    (lambda r, d: lmlab.compare([]), "compare needs at least one run"),
    (lambda r, d: lmlab.compare([r, d / "nowhere"]), "has no evaluation to compare (not a run)"),
    (lambda r, d: lmlab.compare([r]).plot(x="epochs"), "x is 'epochs'"),
    (lambda r, d: lmlab.prepare(d / "corpus", tokenizer="char", out_dir=d, val_fraction=math.nan), "--val-fraction"),
    (lambda r, d: lmlab.prepare(d / "corpus", tokenizer="char", out_dir=d, val_fraction=0), "--val-fraction"),
    (lambda r, d: lmlab.prepare(d / "corpus", tokenizer="char", out_dir=d, val_fraction="0.1"), "val_fraction is"),
    (lambda r, d: lmlab.prepare(d / "corpus", tokenizer="char", out_dir=d, val_tokens=-1), "--val-tokens is -1"),
    (lambda r, d: lmlab.prepare(d / "corpus", tokenizer="char", out_dir=d, val_tokens=2.5), "val_tokens is 2.5"),
    (lambda r, d: lmlab.prepare(d / "corpus", tokenizer="char", out_dir=d, shard_tokens=0), "--shard-tokens is 0"),
    (lambda r, d: lmlab.prepare(d / "corpus", tokenizer="char", out_dir=d, normalize="upper"), "--normalize"),
    (lambda r, d: lmlab.prepare(d / "corpus", tokenizer="char", out_dir=r.path), "--out-dir"),
    (lambda r, d: lmlab.prepare(d / "nothing.txt", tokenizer="char", out_dir=d), "does not exist"),
]


@pytest.mark.parametrize("call, words", BAD, ids=[words for _, words in BAD])
@pytest.mark.slow
def test_a_bad_argument_is_one_sentence(call, words, runs, tmp_path, corpus_dir):
    write_config(tmp_path / "tiny.toml", runs[0].config.data.dataset)
    (tmp_path / "corpus").symlink_to(corpus_dir)
    with pytest.raises(lmlab.UserError) as raised:
        call(runs[0], tmp_path)
    assert words in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "x").exists()


LEGACY = Path(__file__).parent / "data" / "legacy" / "trained"


def _dataset(d: Path) -> lmlab.Dataset:
    from lmlab.api.data import Dataset

    return Dataset(d, {"tokenizer": "char"}, False)


# A value of the wrong kind for every argument kind of every public function and method, refused in the sentence
# lmlab.api.checks gives it before anything loads: never a raw TypeError or AttributeError (`train(resume=5)`), and
# never a run trained somewhere else than asked (`train(run="")` trains into no runs/NAME).
WRONG_TYPES = [
    (lambda r, d: lmlab.train(resume=5), "resume is 5; it must be a run folder's path or an lmlab.Run or None."),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=""), "run is ''; it must be a path that is not empty"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", set="train.max_iters=3"), "set is 'train.max_iters=3'"),
    (lambda r, d: lmlab.train(5), "config is 5; it must be a TOML config's path or a RunConfig"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", budget=[1]), "budget is [1]; it must be seconds"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", device=None), "device is None"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", init_from=3), "init_from is 3"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", force="yes"), "force is 'yes'; it must be True or False"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", keep_optimizer=1), "keep_optimizer is 1"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", started="now"), "started is 'now'; it must be a number"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", size=2.5), "size is 2.5"),
    (lambda r, d: lmlab.train(d / "tiny.toml", run=d / "x", console=5), "console is 5"),
    (lambda r, d: lmlab.train(d / "tiny.toml", d / "x"), "train(): too many positional arguments"),
    (lambda r, d: lmlab.Run(5), "path is 5; it must be a path that is not empty"),
    (lambda r, d: lmlab.Run(None), "path is None"),
    (lambda r, d: lmlab.Run(""), "path is ''"),
    (lambda r, d: r.sample(5), "prompt is 5; it must be a string."),
    (lambda r, d: r.sample(checkpoint=5), "checkpoint is 5; it must be a checkpoint"),
    (lambda r, d: r.sample(stream="no"), "stream is 'no'; it must be True or False"),
    (lambda r, d: r.samples(None), "prompt is None"),
    (lambda r, d: r.samples("", None), "num_samples is None; it must be a whole number"),
    (lambda r, d: r.chat(None), "message is None; it must be a string"),
    (lambda r, d: r.chat("hi", system=5), "system is 5; it must be a string or None"),
    (lambda r, d: r.instruct("do", input=None), "input is None; it must be a string"),
    (lambda r, d: r.eval(dataset=5), "dataset is 5"),
    (lambda r, d: r.eval(batch_size=None), "batch_size is None"),
    (lambda r, d: r.model(checkpoint=None), "checkpoint is None"),
    (lambda r, d: r.load(device=0), "device is 0"),
    (lambda r, d: r.history_frame(5), "history_frame(): too many positional arguments"),
    (lambda r, d: r.plot(5), "what is 5; it must be a string"),
    (lambda r, d: r.plot("gradients"), "what is 'gradients'; use one of loss, grad_norm"),
    (lambda r, d: lmlab.Run.newest(5), "folders is 5; it must be a path, or a list of paths"),
    (lambda r, d: lmlab.Run.newest(d / "empty"), "empty; train one (`make demo`, `lmlab train CONFIG`)"),
    (lambda r, d: lmlab.compare(None), "runs is None; it must be a run folder's path or an lmlab.Run, or a list"),
    (lambda r, d: lmlab.compare([r, 5]), "runs is [Run("),
    (lambda r, d: lmlab.compare(r for r in (r, 5)), "runs is [Run("),  # a generator, read once
    (lambda r, d: lmlab.compare([r], checkpoint=None), "checkpoint is None"),
    (lambda r, d: lmlab.compare([r]).plot(x=5), "x is 5; it must be a string"),
    (lambda r, d: lmlab.compare([r]).plot(log="yes"), "log is 'yes'"),
    (lambda r, d: lmlab.compare([r]).to_pandas(5), "to_pandas(): too many positional arguments"),
    (lambda r, d: lmlab.prepare(d / "corpus", tokenizer=5, out_dir=d), "tokenizer is 5; it must be a name or a path"),
    (lambda r, d: lmlab.prepare(None, tokenizer="char", out_dir=d), "source is None; it must be a path"),
    (lambda r, d: lmlab.prepare(d / "corpus", tokenizer="char", out_dir=""), "out_dir is ''"),
    (lambda r, d: lmlab.prepare(d / "corpus", tokenizer="char", out_dir=d, name=""), "--name '' is empty"),
    (lambda r, d: lmlab.prepare(d / "corpus", tokenizer="char", out_dir=d, normalize=5), "normalize is 5"),
    (lambda r, d: lmlab.prepare(d / "corpus", tokenizer="char", out_dir=d, force=None), "force is None"),
    (lambda r, d: lmlab.prepare(d / "corpus", tokenizer="char", out_dir=d, keep_chars=5), "keep_chars is 5"),
    (lambda r, d: lmlab.prepare(d / "corpus", tokenizer="char", out_dir=d, text_field=None), "text_field is None"),
    (lambda r, d: lmlab.prepare(d / "corpus", tokenizer="char", out_dir=d, gpt2_dir=5), "gpt2_dir is 5"),
    (lambda r, d: _dataset(d).stats(block_size="1024"), "block_size is '1024'; it must be a whole number"),
]


@pytest.mark.parametrize("call, words", WRONG_TYPES, ids=[words[:40] for _, words in WRONG_TYPES])
def test_an_argument_of_the_wrong_kind_is_one_sentence(call, words, tmp_path, char_dataset, corpus_dir, monkeypatch):
    write_config(tmp_path / "tiny.toml", char_dataset)
    (tmp_path / "corpus").symlink_to(corpus_dir)
    shutil.copytree(LEGACY, tmp_path / "run")
    monkeypatch.chdir(tmp_path)  # where run="" trained: runs/tiny
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(lmlab.UserError) as raised:
        call(lmlab.Run(tmp_path / "run", quiet()), tmp_path)
    assert words in str(raised.value) and "\n" not in str(raised.value)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_every_public_function_and_method_checks_its_arguments():
    """A new public entry without `lmlab.api.checks.checked` fails here until it checks what it is given."""
    import inspect

    entries = []
    for name in lmlab.API:
        value = getattr(lmlab, name)
        if inspect.isfunction(value):
            entries.append((name, value))
        elif inspect.isclass(value):
            constructed = {"__init__"} if name == "Run" else set()  # the class a user makes; the rest lmlab makes
            entries += [(f"{name}.{attr}", member) for attr, member in vars(value).items()
                        if inspect.isfunction(member) and (not attr.startswith("_") or attr in constructed)]
    unchecked = [name for name, entry in entries if not hasattr(entry, "__checked__")]
    assert len(entries) > 15 and not unchecked
