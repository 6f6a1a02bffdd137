"""Model kinds from other packages (the `lmlab.models` entry point group): examples/context-vector, installed by the
test extras, trains, resumes bitwise after kill -9, guards, budgets, sweeps, evaluates, samples, compares and
reports like a built-in kind, against a GPT of its size on the WikiText-2 stand-in; plugins that are broken,
missing or not models are named with their package."""

from __future__ import annotations

import builtins
import json
import re
import sys
import time
from pathlib import Path

import lmlab_context_vector  # noqa: E402, F401  (examples/context-vector: `make .venv/.installed-test` installs it)
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from lmlab.analysis.runs import summarize
from lmlab.api.training import train
from lmlab.core.config import SamplingParams
from lmlab.core.config_toml import load_config
from lmlab.experiments.family import Family, fit_path, read_fit
from lmlab.experiments.miniseries import Series, refit
from lmlab.experiments.plan import shape_of
from lmlab.experiments.sizing import with_vocab
from lmlab.inference.generate import Asked, continue_all, stream_ids
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from tests.helpers import (
    LMLAB,
    TINY_CONFIG,
    install_plugin,
    kill_and_resume,
    run_cli,
    same_weights,
    stable_events,
    weights,
    write_fit,
)


def write(path: Path, dataset: Path, kind: str = "context-vector", options: str = "mlp_ratio = 2",
          max_iters: int = 30, dropout: float = 0.0, extra: str = "") -> Path:
    """tests/helpers.py's tiny config as a model of `kind` with [model.options] `options` (and `extra` [model] lines),
    logging every 3 steps and checkpointing every 7, so a kill lands between checkpoints."""
    text = TINY_CONFIG.format(dataset=dataset, max_iters=max_iters)
    text = text.replace("[model]\n", f'[model]\nkind = "{kind}"\ndropout = {dropout}\n{extra}\n')
    text = text.replace("log_interval = 5", "log_interval = 3").replace("checkpoint_interval = 10",
                                                                        "checkpoint_interval = 7")
    path.write_text(f"{text}\n[model.options]\n{options}\n")
    return path


@pytest.mark.slow
def test_the_context_vector_plugin_resumes_bitwise_and_compares_with_a_gpt_of_its_size(tmp_path, wikitext_dataset,
                                                                                      capsys):
    config = write(tmp_path / "cv.toml", wikitext_dataset, options="", dropout=0.1)  # its default context width
    Trainer(train_job(load_config(config), tmp_path / "straight", "cpu")).run()
    run = tmp_path / "killed"
    kill_and_resume([LMLAB, "train", config, "--run", run], run, (7, 16))  # metrics lines: between checkpoints
    same_weights(tmp_path / "straight", run)
    assert stable_events(run) == stable_events(tmp_path / "straight")
    start = RunDir(run).events()[0]
    assert start["plugin"]["package"] == "lmlab-context-vector" and start["model"].startswith("context-vector 2L/32")

    # A GPT of the same width and depth (rotary positions: no position table) has within 0.5% of its parameters.
    gpt = Trainer(train_job(load_config(write(tmp_path / "gpt.toml", wikitext_dataset, "gpt", "", dropout=0.1,
                                    extra='pos_emb = "rope"')), tmp_path / "gpt", "cpu")).run().run_dir
    ours, theirs = summarize(run).params, summarize(gpt).params
    assert abs(ours - theirs) / theirs < 0.005, (ours, theirs)
    code, out, _ = run_cli(capsys, "compare", gpt, run, "--json")
    rows = {r["run"]: r for r in json.loads(out)["runs"]}
    assert code == 0 and rows["killed"]["architecture"] == "context vector" and rows["killed"]["best_val_loss"]

    (tmp_path / "prompts.txt").write_text("The\n = = History = =\\n\n")
    code, _, err = run_cli(capsys, "report", gpt, run, "--prompts", tmp_path / "prompts.txt", "--temperature", "0,0.8",
                           "--max-new-tokens", "6", "--out", tmp_path / "report", "--device", "cpu")
    report = (tmp_path / "report" / "report.md").read_text()
    assert code == 0, err
    assert "context vector: context-vector 2L/32 context 43" in report and "Prompt grid" in report
    assert report.count("`killed`, temperature") == 4 and RunDir(run).kept("results")  # 2 prompts x 2 temperatures

    # Its weights are safetensors like every kind's; export-hf, which writes transformers, says where they are.
    code, _, err = run_cli(capsys, "export-hf", run, tmp_path / "exported")
    assert code == 2 and "model.safetensors" in err and not (tmp_path / "exported").exists()
    code, _, err = run_cli(capsys, "export-gguf", run, tmp_path / "exported.gguf")  # llama.cpp has no such kind
    assert code == 2 and "is a context-vector model" in err and not (tmp_path / "exported.gguf").exists()
    model = RunDir(run).load("latest", "cpu").model
    on_disk = load_file(str(RunDir(run).checkpoint("latest") / "model.safetensors"))
    assert set(on_disk) == set(model.state_dict()) - {"wte.weight"}  # the tied table once, as the head


@pytest.mark.slow
def test_a_plugin_run_is_guarded_budgeted_and_swept(tmp_path, wikitext_dataset, capsys):
    config = load_config(write(tmp_path / "cv.toml", wikitext_dataset, max_iters=20))
    t = Trainer(train_job(config, tmp_path / "guarded", "cpu"))
    clean_forward, poisoned = t.job.step.forward, []

    def nan_forward(x, y):  # three non-finite training steps in a row, once: skipped, then rolled back
        logits, loss = clean_forward(x, y)
        if t.job.model.training and t.progress.step >= 14 and len(poisoned) < 3:
            poisoned.append(t.progress.step)
            loss = loss * float("nan")
        return logits, loss

    t.job.step.forward = nan_forward
    events = RunDir(t.run().run_dir).events()
    assert [(e["event"], e["step"]) for e in events if e["event"] in ("skip", "rollback")] == \
        [("skip", 15), ("skip", 16), ("rollback", 17)]
    assert next(e for e in events if e["event"] == "rollback")["to_step"] == 14 and events[-1]["step"] == 20
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "guarded").values())

    config = write(tmp_path / "sweep.toml", wikitext_dataset)
    # A budget each trial's start-up and timing leave room in on a busy machine (a tighter one is refused)
    code, out, err = run_cli(capsys, "sweep", config, "--set", "model.options.mlp_ratio=1,3", "--budget-seconds", "10",
                             "--name", "ratio", "--dir", tmp_path)
    assert code == 0, err
    for trial in ("options.mlp_ratio=1", "options.mlp_ratio=3"):
        trial_run = RunDir(tmp_path / "ratio" / trial)
        assert trial_run.config().model.options == {"mlp_ratio": int(trial[-1])}
        assert [e["event"] for e in trial_run.events()].count("budget") >= 1  # planned, and its last step decided
        assert summarize(trial_run.path).status == "finished"


FAKE_MODEL = """
import torch.nn as nn
from lmlab.model import LanguageModel
from lmlab.model.loss import next_token_loss


class Tiny(LanguageModel):  # the least a plugin writes: __init__ and forward
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.mix = nn.Linear(2 * config.n_embd, config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size)

    def forward(self, idx, targets=None, cache=None):
        x = self.wte(idx)
        previous = nn.functional.pad(x, (0, 0, 1, 0))[:, :-1]  # each token sees itself and the one before
        logits = self.head(self.mix(torch.cat([x, previous], -1)).tanh())
        return logits, None if targets is None else next_token_loss(logits, targets)


import torch
"""


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    """A folder of installed packages for this test alone (the modules it imported are forgotten after it)."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(folder)):
            del sys.modules[name]


@pytest.mark.slow
def test_a_minimal_plugin_samples_by_recomputing_its_context_and_a_missing_one_names_its_package(
        tmp_path, site, char_dataset, capsys):
    info = install_plugin(site, "tiny-mix", "lmlab-tiny-mix", FAKE_MODEL)
    result = Trainer(train_job(load_config(write(tmp_path / "c.toml", char_dataset, "tiny-mix", "", max_iters=10)),
                     tmp_path / "run", "cpu")).run()
    run = RunDir(result.run_dir).load("best", "cpu")
    assert run.model.new_cache(1, torch.device("cpu"), torch.float32) is None  # no decode state of its own
    prompt = run.tokenizer.encode("ROMEO:")
    ids = list(prompt)
    with torch.no_grad():  # greedy by hand: the whole context through the model for every token
        for _ in range(15):
            ids.append(int(run.model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert list(stream_ids(run.model, prompt, SamplingParams(15, temperature=0))) == ids[len(prompt):]
    # Rows of different lengths decode together (right-padded windows) as each does alone.
    prompts = [run.tokenizer.encode(p) for p in ("ROMEO:", "JULIET: fair night,")]
    together = continue_all(run, Asked(prompts), [SamplingParams(15, temperature=0)] * 2, 2)
    assert [c.decoding.ids for c in together] == \
        [prompt + list(stream_ids(run.model, prompt, SamplingParams(15, temperature=0))) for prompt in prompts]
    assert summarize(result.run_dir).architecture == "tiny-mix"

    # Uninstalled, the run names the package that provides its kind.
    for path in sorted(info.iterdir()):
        path.unlink()
    info.rmdir()
    code, _, err = run_cli(capsys, "sample", result.run_dir, "--max-new-tokens", "5")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "is a model of kind 'tiny-mix', which the package lmlab-tiny-mix 0.1 provides, and it is not installed" \
           in err
    assert summarize(result.run_dir).status == "finished"  # `lmlab runs` still lists it


BROKEN = {
    "raises at import": ("raise RuntimeError('no GPU driver found')\n", "Tiny",
                         "the model plugin 'broken' (package lmlab-broken, lmlab_broken:Tiny) fails to import "
                         "(RuntimeError: no GPU driver found); fix or reinstall the package."),
    "returns no model": ("def Tiny(config):\n    return {'layers': config.n_layer}\n", "Tiny",
                         "the model plugin 'broken' (package lmlab-broken, lmlab_broken:Tiny) returned a dict, not a "
                         "model: its entry point must build an lmlab.model.LanguageModel from the ModelConfig."),
    "fails to build": ("def Tiny(config):\n    return config.options['width'] * 2\n", "Tiny",
                       "the model plugin 'broken' (package lmlab-broken, lmlab_broken:Tiny) cannot build a model "
                       "from [model] and [model.options] (KeyError: 'width')."),
    "names nothing": ("x = 1\n", "Missing", "the model plugin 'broken' (package lmlab-broken, lmlab_broken:Missing) "
                      "fails to import (AttributeError"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_plugin_is_named_with_its_package_and_nothing_is_written(tmp_path, site, char_dataset, capsys,
                                                                          case):
    source, target, message = BROKEN[case]
    install_plugin(site, "broken", "lmlab-broken", source, target)
    code, _, err = run_cli(capsys, "train", write(tmp_path / "c.toml", char_dataset, "broken", ""), "--run",
                           tmp_path / "run", "--device", "cpu")
    assert code == 2 and err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind, options, message", [
    ("gpt", "width = 3", r"\[model.options\] \(width\) holds a model plugin's settings, and model.kind 'gpt' is "
                         r"lmlab's own, which reads none: remove the table, or set model.kind to the plugin's name."),
    ("my_models/cv.py", "", r"model.kind is 'my_models/cv.py', which is neither one of lmlab's \(gpt, recurrent\) nor "
                            r"a model plugin installed here \(installed: context-vector\); install the package"),
    ("context-vector", "depth = 3", "model.options.depth is not a setting of the context-vector model; it takes "
                                    "context_size, mlp_ratio."),
    ("context-vector", "mlp_ratio = 0", "model.options.mlp_ratio is 0; it must be a whole number from 1 to 2\\*\\*20"),
    ("context-vector", "mlp_ratio = nan", r"model.options.mlp_ratio is nan; a plugin's setting is text, a finite "
                                          r"number, true or false"),
])
def test_model_options_and_kinds_that_cannot_be_are_refused(tmp_path, char_dataset, capsys, kind, options, message):
    code, _, err = run_cli(capsys, "train", write(tmp_path / "c.toml", char_dataset, kind, options), "--run",
                           tmp_path / "run", "--device", "cpu")
    assert code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    assert not (Path.cwd() / "my_models").exists()  # nothing imported or created from a path a config names


# A plugin whose forward gets something wrong: FAKE_MODEL with its return line replaced.
BAD_FORWARDS = {
    "raises": ("raise RuntimeError('no kernel for this shape')",
               "raised RuntimeError: no kernel for this shape in its forward of 4x3 token ids with targets on the meta "
               "device, where lmlab sizes a model before building it; fix the plugin's forward."),
    "returns logits alone": ("return logits", "returned a float32 tensor of shape (4, 3, {vocab}), not the pair "
                                              "(logits, loss)"),
    "returns (None, None)": ("return None, None", "returned None as its logits, not a tensor of floats"),
    "returns a loss per token": (
        "return logits, None if targets is None else nn.functional.cross_entropy(logits.flatten(0, 1), "
        "targets.flatten(), reduction='none')",
        "returned a float32 tensor of shape (12,) as its loss, not one number (a 0-dimensional tensor of floats)"),
    "returns time before batch": (
        "return logits.transpose(0, 1), None if targets is None else next_token_loss(logits, targets)",
        "returned logits of shape (3, 4, {vocab}) (time before batch), not (4, 3, {vocab})"),
    "returns a column too many": ("return nn.functional.pad(logits, (0, 1)), None if targets is None else "
                                  "next_token_loss(logits, targets)",
                                  "returned logits of shape (4, 3, {more}), not (4, 3, {vocab})"),
    "returns NaN logits to a sampler": (
        "return (logits * float('nan') if targets is None else logits), None if targets is None else "
        "next_token_loss(logits, targets)",
        "its forward of 4x3 token ids without targets returned logits or a loss that are not finite (NaN or "
        "infinite)"),
}
RETURN = "        return logits, None if targets is None else next_token_loss(logits, targets)\n"


@pytest.mark.parametrize("case", BAD_FORWARDS)
@pytest.mark.slow
def test_a_plugins_forward_is_checked_once_before_it_is_used(tmp_path, site, char_dataset, capsys, case):
    """A plugin's forward is checked once before it is used: a raise, wrong outputs, and transposed or NaN logits
    are each one sentence naming the plugin, never a memory estimate, a traceback, or a run trained or sampled
    silently."""
    body, message = BAD_FORWARDS[case]
    install_plugin(site, "bad", "lmlab-bad", FAKE_MODEL.replace(RETURN, f"        {body}\n"))
    vocab = json.loads((char_dataset / "meta.json").read_text())["vocab_size"]
    code, out, err = run_cli(capsys, "train", write(tmp_path / "c.toml", char_dataset, "bad", ""), "--run",
                             tmp_path / "run", "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: the model plugin 'bad' (package lmlab-bad, lmlab_bad:Tiny)"), err
    assert message.format(vocab=vocab, more=vocab + 1) in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_plugin_whose_trained_weights_give_nan_is_one_sentence_when_loaded(tmp_path, site, char_dataset, capsys,
                                                                            monkeypatch):
    """The weights a run keeps are checked when it loads, as `sample`, `eval` and `serve` load it: logits that are not
    finite were sampled as text (and a 500 with a traceback under `logprobs`)."""
    install_plugin(site, "flaky", "lmlab-flaky", FAKE_MODEL.replace(
        RETURN, "        logits = logits * float(os.environ.get('FLAKY_SCALE', '1'))\n" + RETURN) + "import os\n")
    run = Trainer(train_job(load_config(write(tmp_path / "c.toml", char_dataset, "flaky", "", max_iters=3)),
                            tmp_path / "run", "cpu")).run().run_dir
    monkeypatch.setenv("FLAKY_SCALE", "nan")  # the same module, now computing NaN
    for command in (["sample", run, "--max-new-tokens", "3"], ["eval", run]):
        code, out, err = run_cli(capsys, *command)
        assert code == 2 and len(err.strip().splitlines()) == 1 and not out, err
        assert "the model plugin 'flaky'" in err and "not finite (NaN or infinite)" in err, err
    monkeypatch.delenv("FLAKY_SCALE")
    assert run_cli(capsys, "sample", run, "--max-new-tokens", "3")[0] == 0


# A plugin right on the 4x3 probe and wrong on the batches training gives it (32 tokens): FAKE_MODEL's return line
# behind `if idx.shape[1] > 3:`.
LATE_FORWARDS = {
    "raises": ("raise RuntimeError('no kernel past 3 tokens')",
               "raised RuntimeError: no kernel past 3 tokens in its forward of "),
    "returns a tuple of 3": ("return logits, next_token_loss(logits, targets) if targets is not None else None, 0",
                             "returned a tuple of 3, not the pair (logits, loss)"),
    "returns a loss per token": (
        "return logits, None if targets is None else nn.functional.cross_entropy(logits.flatten(0, 1), "
        "targets.flatten(), reduction='none')", "as its loss, not one number"),
    "returns a column short": ("return logits[..., :-1], None if targets is None else next_token_loss(logits, "
                               "targets)", "returned logits of shape "),
    "raises its own exception": ("raise type('KernelMissing', (Exception,), {})('no kernel past 3 tokens')",
                                 "raised KernelMissing: no kernel past 3 tokens in its forward of "),
    "raises OSError": ("raise FileNotFoundError(2, 'No such file or directory', 'kernels.cache')",
                       "raised FileNotFoundError: [Errno 2] No such file or directory: 'kernels.cache' in its forward"),
    "returns a detached loss": ("return logits, None if targets is None else next_token_loss(logits, targets).detach()",
                                "returned a loss detached from its weights"),
    "raises in its backward": (
        "return logits, None if targets is None else type('Fail', (torch.autograd.Function,), {'forward': "
        "staticmethod(lambda ctx, x: x.clone()), 'backward': staticmethod(lambda ctx, g: 1 / 0)}).apply("
        "next_token_loss(logits, targets))",
        "raised ZeroDivisionError: division by zero in its backward pass; fix the plugin's backward."),
    "returns a constant loss": ("return logits, None if targets is None else torch.ones((), requires_grad=True)",
                                "returned a loss detached from its weights"),
}


@pytest.mark.parametrize("case", LATE_FORWARDS)
@pytest.mark.slow
def test_a_plugin_wrong_only_on_real_batches_is_named_wherever_its_forward_runs(tmp_path, site, char_dataset, capsys,
                                                                               case):
    """A plugin that goes wrong only on real batches is named wherever its forward runs: a raise on the meta device
    where the batch is sized, a tuple, a loss per token, a detached loss, a raise of its own class or in its
    backward, its own OSError (never said as the user's folder), a vocabulary short of a column or a constant loss
    are each one sentence naming the plugin, never a traceback or a run trained silently."""
    body, message = LATE_FORWARDS[case]
    install_plugin(site, "late", "lmlab-late",
                   FAKE_MODEL.replace(RETURN, f"        if idx.shape[1] > 3:\n            {body}\n{RETURN}"))
    code, out, err = run_cli(capsys, "train", write(tmp_path / "c.toml", char_dataset, "late", "", max_iters=3),
                             "--run", tmp_path / "run", "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: the model plugin 'late' (package lmlab-late, lmlab_late:Tiny)"), err
    assert message in err and err.strip().endswith(("fix the plugin's forward.", "fix the plugin's backward.",
                                                    "None without targets).", "with torch operations.")), err


@pytest.mark.slow
def test_a_plugin_that_goes_wrong_after_training_is_named_by_sample_and_eval(tmp_path, site, char_dataset, capsys,
                                                                            monkeypatch):
    """Loading checks a plugin's forward on a 4x3 batch; what sampling and evaluating give it afterwards is checked
    too: a plugin's sentence, never a traceback at the unpacking of its outputs."""
    install_plugin(site, "moody", "lmlab-moody", FAKE_MODEL.replace(
        RETURN, "        if os.environ.get('MOODY') and idx.shape[1] > 3:\n            return logits, None, None\n"
        + RETURN) + "import os\n")
    run = Trainer(train_job(load_config(write(tmp_path / "c.toml", char_dataset, "moody", "", max_iters=3)),
                            tmp_path / "run", "cpu")).run().run_dir
    monkeypatch.setenv("MOODY", "1")
    for command in (["sample", run, "--prompt", "ROMEO: sweet", "--max-new-tokens", "3"], ["eval", run]):
        code, out, err = run_cli(capsys, *command)
        assert code == 2 and len(err.strip().splitlines()) == 1 and not out, err
        assert "the model plugin 'moody'" in err and "returned a tuple of 3, not the pair (logits, loss)" in err, err


@pytest.mark.parametrize("raised", ["OSError(5, 'Input/output error', 'kernels.cache')",
                                    "type('KernelMissing', (Exception,), {})('no kernel for this length')"])
@pytest.mark.slow
def test_a_plugins_own_exception_after_training_is_named_by_sample_and_eval(tmp_path, site, char_dataset, capsys,
                                                                           monkeypatch, raised):
    """A plugin's own Exception subclass, or its OSError, after training is named by sample and eval as the
    plugin's: never a traceback, never blamed on the user's folder ("choose another folder")."""
    install_plugin(site, "moody", "lmlab-moody", FAKE_MODEL.replace(
        RETURN, f"        if os.environ.get('MOODY') and idx.shape[1] > 3:\n            raise {raised}\n"
        + RETURN) + "import os\n")
    run = Trainer(train_job(load_config(write(tmp_path / "c.toml", char_dataset, "moody", "", max_iters=3)),
                            tmp_path / "run", "cpu")).run().run_dir
    monkeypatch.setenv("MOODY", "1")
    for command in (["sample", run, "--prompt", "ROMEO: sweet", "--max-new-tokens", "3"], ["eval", run]):
        code, out, err = run_cli(capsys, *command)
        assert code == 2 and len(err.strip().splitlines()) == 1 and not out, err
        assert err.startswith("error: the model plugin 'moody' (package lmlab-moody, lmlab_moody:Tiny) raised "), err
        assert "in its forward of " in err and "choose another folder" not in err, err


# What a plugin may raise, and how the sentence names it: any exception class, its own BaseException and a
# MemoryError (its own allocation, which may be its bug) included.
RAISED = {
    "its own BaseException": ("type('Abandon', (BaseException,), {})('gave up on this shape')",
                              "Abandon: gave up on this shape"),
    "MemoryError": ("MemoryError('a table for 2**40 ids')", "MemoryError: a table for 2**40 ids"),
    "RuntimeError": ("RuntimeError('no kernel for this shape')", "RuntimeError: no kernel for this shape"),
}
INIT = "        self.config = config\n"
FORWARD = "    def forward(self, idx, targets=None, cache=None):\n"
# Each place lmlab calls a plugin's code while it trains: FAKE_MODEL with `raise {raised}` there, and the words
# that name it.
CALLS = {
    "import": (lambda raising: FAKE_MODEL + raising + "\n",
               "fails to import ({raised}); fix or reinstall the package."),
    "build": (lambda raising: FAKE_MODEL.replace(INIT, INIT + f"        {raising}\n"),
              "cannot build a model from [model] and [model.options] ({raised})."),
    "forward": (lambda raising: FAKE_MODEL.replace(RETURN, f"        {raising}\n"),
                "raised {raised} in its forward of 4x3 token ids with targets on the meta device, where lmlab sizes a "
                "model before building it; fix the plugin's forward"),
    "backward": (lambda raising: FAKE_MODEL.replace(RETURN, "        return logits, None if targets is None else "
                                                    "Fail.apply(next_token_loss(logits, targets))\n") +
                 f"class Fail(torch.autograd.Function):\n    forward = staticmethod(lambda ctx, x: x.clone())\n\n"
                 f"    @staticmethod\n    def backward(ctx, grad):\n        {raising}\n",
                 "raised {raised} in its backward pass; fix the plugin's backward"),
    "describe": (lambda raising: FAKE_MODEL.replace(FORWARD,
                                                    f"    def describe(self):\n        {raising}\n\n{FORWARD}"),
                 "raised {raised} in its describe(); fix the plugin's describe()"),
    "hidden_matrices": (lambda raising: FAKE_MODEL.replace(
        FORWARD, f"    def hidden_matrices(self):\n        {raising}\n\n{FORWARD}"),
        "raised {raised} in its hidden_matrices() on the meta device, where lmlab sizes a model before building it; "
        "fix the plugin's hidden_matrices()"),
}


def refused_training(tmp_path, site, char_dataset, capsys, call: str, raising: str) -> tuple[str, str]:
    """`lmlab train` of a plugin whose code at `call` runs `raise <raising>`: refused in one line naming the plugin;
    the message expected of that call, and what was said."""
    source, message = CALLS[call]
    install_plugin(site, "odd", "lmlab-odd", source(f"raise {raising}"))
    code, out, err = run_cli(capsys, "train", write(tmp_path / "c.toml", char_dataset, "odd", "", max_iters=2),
                             "--run", tmp_path / "run", "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: the model plugin 'odd' (package lmlab-odd, lmlab_odd:Tiny) "), err
    return message, err


@pytest.mark.parametrize("raised", RAISED)
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.slow
def test_whatever_a_plugin_raises_wherever_lmlab_calls_it_is_one_sentence_naming_it(tmp_path, site, char_dataset,
                                                                                   capsys, call, raised):
    raising, said = RAISED[raised]
    message, err = refused_training(tmp_path, site, char_dataset, capsys, call, raising)
    assert message.format(raised=said) in err, err
    assert "ran out of memory" not in err and ("smaller batch" in err) == (raised == "MemoryError" and call not in (
        "import", "build")), err


# Every BaseException Python has besides a stop (KeyboardInterrupt) and an exit asked for (SystemExit), as a plugin may
# raise it: its own mistake, one sentence like any other.
BUILTIN_RAISED = {cls.__name__: (f"{cls.__name__}('gave up')" if cls is not BaseExceptionGroup else
                                 "BaseExceptionGroup('gave up', [GeneratorExit()])",
                                 f"{cls.__name__}: gave up")
                  for cls in vars(builtins).values()
                  if isinstance(cls, type) and issubclass(cls, BaseException) and not issubclass(cls, Exception)
                  and cls not in (KeyboardInterrupt, SystemExit)}


@pytest.mark.parametrize("raised", BUILTIN_RAISED)
@pytest.mark.parametrize("call", ["build", "forward"])
def test_every_builtin_base_exception_a_plugin_raises_is_one_sentence_naming_it(tmp_path, site, char_dataset, capsys,
                                                                                call, raised):
    raising, said = BUILTIN_RAISED[raised]
    message, err = refused_training(tmp_path, site, char_dataset, capsys, call, raising)
    before, after = message.split("{raised}")
    assert before in err and said in err and after in err, err  # a group's line adds its count of sub-exceptions
    assert not (tmp_path / "run").exists()


# FAKE_MODEL with a decode state of its own that raises, as its new_cache does, where ODD_IN says: what ODD_RAISE says.
DECODE_STATE = "import os\nfrom lmlab.model.base import DecodeState\n" + FAKE_MODEL.replace(FORWARD, """\
    def new_cache(self, batch, device, dtype):
        odd("new_cache")
        return State()

""" + FORWARD) + """

class State(DecodeState):
    def tensors(self):
        return []

    @classmethod
    def over(cls, tensors):
        odd("over")
        return cls()

    def reset(self, row):
        odd("reset")


def odd(where):
    if os.environ.get("ODD_IN") == where:
        raise eval(os.environ["ODD_RAISE"])
"""


@pytest.mark.slow
def test_whatever_a_plugins_decode_state_raises_is_one_sentence_naming_it(tmp_path, site, char_dataset, capsys,
                                                                         monkeypatch):
    install_plugin(site, "odd", "lmlab-odd", DECODE_STATE)
    run = Trainer(train_job(load_config(write(tmp_path / "c.toml", char_dataset, "odd", "", max_iters=2)),
                            tmp_path / "run", "cpu")).run().run_dir
    for where, how in [("new_cache", "new_cache()"), ("over", "decode state's over()"),
                       ("reset", "decode state's reset()")]:
        for raised in ("its own BaseException", "MemoryError"):
            monkeypatch.setenv("ODD_IN", where)
            monkeypatch.setenv("ODD_RAISE", RAISED[raised][0])
            code, out, err = run_cli(capsys, "sample", run, "--max-new-tokens", "3")
            assert code == 2 and len(err.strip().splitlines()) == 1 and not out, err
            assert err.startswith(f"error: the model plugin 'odd' (package lmlab-odd, lmlab_odd:Tiny) raised "
                                  f"{RAISED[raised][1]} in its {how}") and f"; fix the plugin's {how}" in err, err


# A plugin whose shape is all in [model.options]: `blocks` layers, `hidden` wide, each token on its own; it declares so.
OPTIONS_MODEL = """
import torch.nn as nn
from lmlab.model import Growth, LanguageModel
from lmlab.model.loss import next_token_loss


class Stack(LanguageModel):
    growth = Growth(depth="options.blocks", width="options.hidden")

    def __init__(self, config):
        super().__init__()
        self.config = config
        hidden = config.options["hidden"]
        self.wte = nn.Embedding(config.vocab_size, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(config.options["blocks"]))
        self.head = nn.Linear(hidden, config.vocab_size)

    def forward(self, idx, targets=None, cache=None):
        x = self.wte(idx)
        for block in self.blocks:
            x = x + block(x).tanh()
        logits = self.head(x)
        return logits, None if targets is None else next_token_loss(logits, targets)
"""
# Every way a plugin declares its growth: [model] fields (the context-vector example, installed), [model.options]
# keys. Each: its kind, [model.options], and where its depth and width are read (`lmlab.core.growth.Growth`).
GROWTHS = {
    "[model] fields": ("context-vector", "mlp_ratio = 2", "n_layer", "n_embd"),
    "[model.options] keys": ("stack", "blocks = 3\nhidden = 48", "options.blocks", "options.hidden"),
}


def grown_preset(tmp_path: Path, site: Path, dataset: Path, entry: str) -> tuple[Path, str, str]:
    """The tiny preset as the plugin of GROWTHS[entry], installed (16 wide per layer: the context-vector model 2 layers
    of 32, the stack 3 of 48): its path, and the settings it declares its depth and width."""
    kind, options, depth, width = GROWTHS[entry]
    if kind == "stack":
        install_plugin(site, kind, "lmlab-stack", OPTIONS_MODEL, "Stack")
    return write(tmp_path / f"{kind}.toml", dataset, kind, options), depth, width


def setting(cfg, name: str):
    return cfg.model.options[name.removeprefix("options.")] if name.startswith("options.") else getattr(cfg.model,
                                                                                                        name)


@pytest.mark.parametrize("entry", GROWTHS)
def test_a_plugin_that_declares_its_growth_is_sized_by_depth_as_a_gpt_family(tmp_path, site, char_dataset, entry):
    """Depth d of a plugin's family sets its declared depth to d and its width to d x the preset's width per layer,
    with the LR a fit's rule gives that width: what a GPT of the preset's shape has at depth d."""
    preset, depth, width = grown_preset(tmp_path, site, char_dataset, entry)
    layers, wide = (setting(load_config(preset), name) for name in (depth, width))
    gpt = write(tmp_path / "gpt.toml", char_dataset, "gpt", "")  # a GPT of its shape, in heads of 16
    gpt.write_text(gpt.read_text().replace("n_layer = 2\nn_head = 2\nn_embd = 32",
                                           f"n_layer = {layers}\nn_head = {wide // 16}\nn_embd = {wide}"))
    write_fit(gpt, char_dataset, 100_000)
    fit = read_fit(gpt)
    ours, theirs = (Family.of(with_vocab(load_config(p)), str(p)) for p in (preset, gpt))
    assert ours.preset_width == theirs.preset_width == wide and theirs.preset.model.n_layer == layers
    params = []
    for d in range(1, 5):
        mine, gpts = ours.config(d, fit), theirs.config(d, fit)
        assert (setting(mine, depth), setting(mine, width)) == (gpts.model.n_layer, gpts.model.n_embd) == (d, 16 * d)
        assert (mine.train.learning_rate, mine.train.min_lr) == (gpts.train.learning_rate, gpts.train.min_lr)
        assert ours.describe(d) == f"{d} layer{'s' * (d > 1)} of {16 * d}"  # no heads: a plugin's are its own
        params.append(shape_of(mine).num_params())  # built by the plugin, at that depth
    assert params == sorted(set(params))


GROWTH_REFUSALS = {
    "declares nothing": ("", "", "declares no growth, so lmlab cannot size it"),
    "declares something else": ('Tiny.growth = {"depth": "n_layer", "width": "n_embd"}', "",
                                "declares no growth, so lmlab cannot size it"),
    "names no such field": ('Tiny.growth = Growth(depth="layers", width="n_embd")', "",
                            "declares its depth as 'layers', which {preset} does not set to a whole number (it sets "
                            "none)"),
    "names a fraction": ('Tiny.growth = Growth(depth="n_layer", width="dropout")', "",
                         "declares its width as 'dropout', which {preset} does not set to a whole number (it is 0.0)"),
    "names an option not set": ('Tiny.growth = Growth(depth="options.blocks", width="n_embd")', "",
                                "declares its depth as 'options.blocks', which {preset} does not set to a whole number "
                                "(it sets none)"),
    "names an option of text": ('Tiny.growth = Growth(depth="options.blocks", width="n_embd")', 'blocks = "four"',
                                "declares its depth as 'options.blocks', which {preset} does not set to a whole number "
                                "(it is 'four')"),
}
# Every command that sizes a preset by its family (`{run}`: a folder it would write).
SIZED = [["train", "--size", "2", "--run", "{run}"], ["train", "--size", "auto", "--budget", "20s", "--run", "{run}"],
         ["plan", "--budget", "20s", "--size", "2"], ["scaling", "--refit", "--dir", "{run}"]]


@pytest.mark.parametrize("case", GROWTH_REFUSALS)
def test_a_plugin_that_does_not_declare_its_growth_is_refused_every_size_saying_what_to_declare(
        tmp_path, site, char_dataset, capsys, case):
    declared, options, message = GROWTH_REFUSALS[case]
    install_plugin(site, "odd", "lmlab-odd", f"{FAKE_MODEL}\nfrom lmlab.model import Growth\n{declared}\n")
    preset = write(tmp_path / "p.toml", char_dataset, "odd", options)
    for command, *args in SIZED:
        code, out, err = run_cli(capsys, command, preset, *(a.format(run=tmp_path / "run") for a in args), "--device",
                                 "cpu")
        said = " ".join(err.split())
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert said.startswith(f"error: {preset}: the model plugin 'odd' (package lmlab-odd, lmlab_odd:Tiny) "), err
        assert message.format(preset=preset) in said and 'growth = Growth(depth="n_layer", width="n_embd")' in said
        assert '(docs/reference/models.md, "Sizes of your own model")' in said
    assert not (tmp_path / "run").exists() and not fit_path(preset).exists()


def test_a_recurrent_preset_is_refused_a_refit_and_a_size_saying_why(tmp_path, char_dataset, capsys):
    """A size is a depth of a family, its width following from it: a recurrent model's width is its own setting."""
    preset = write(tmp_path / "p.toml", char_dataset, "recurrent", "")
    for command in (["scaling", preset, "--refit", "--dir", tmp_path / "runs", "--device", "cpu"],
                    ["train", preset, "--run", tmp_path / "run", "--size", "2", "--device", "cpu"]):
        code, _, err = run_cli(capsys, *command)
        assert code == 2 and "'recurrent': a recurrent model's width is its own setting; use a gpt preset" in \
            " ".join(err.split()), err
    assert not (tmp_path / "run").exists() and not list((tmp_path / "runs").glob("*/*"))


@pytest.mark.slow
@pytest.mark.parametrize("entry", GROWTHS)
def test_a_plugin_that_declares_its_growth_trains_a_depth_a_miniseries_and_the_size_its_fit_predicts_best(
        tmp_path, site, char_dataset, capsys, entry):
    preset, depth, width = grown_preset(tmp_path, site, char_dataset, entry)
    code, out, err = run_cli(capsys, "train", preset, "--size", "3", "--run", tmp_path / "three", "--device", "cpu",
                             "--set", "train.max_iters=3")
    cfg = RunDir(tmp_path / "three").config()
    assert code == 0 and (setting(cfg, depth), setting(cfg, width)) == (3, 48), err
    assert "size 3: 3 layers of 48 (" in out and "LR 0.003 the preset's (no fit of its recipe" in " ".join(out.split())

    # A miniseries in a budget (each depth's steps timed first), its LR searched along the declared width.
    series = Series(depths=(1, 2, 3), tokens=(2048, 4096), lr_factors=(1.0,))
    fit = refit(preset, series, tmp_path / "runs", "cpu", Console(width=80), 300.0, time.perf_counter())
    assert [s["width"] for s in fit.lr_search] == [16, 32, 48] and len(fit.runs) == 6
    assert all(setting(RunDir(r["run"]).config(), depth) == r["depth"] for r in fit.runs)

    said = Console(record=True, width=80)
    run = RunDir(train(preset, run=tmp_path / "auto", budget="30s", size="auto", device="cpu", console=said).path)
    sizing = next(e for e in run.events() if e["event"] == "sizing")
    chosen = Family.of(with_vocab(load_config(preset)), str(preset)).config(sizing["depth"], fit)
    cfg = run.config()
    assert (setting(cfg, depth), setting(cfg, width)) == (sizing["depth"], sizing["width"]) == \
        (setting(chosen, depth), setting(chosen, width))
    assert cfg.train.learning_rate == chosen.train.learning_rate == sizing["learning_rate"]
    assert f"size auto: {sizing['shape']} (" in said.export_text() and summarize(run.path).status == "finished"
