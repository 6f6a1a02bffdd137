import io
import json
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console

import lmlab
from lmlab.analysis.plots import plot_losses
from lmlab.commands import main
from lmlab.core.config_toml import load_config
from lmlab.core.errors import UserError
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from lmlab.train.schedule import lr_at
from tests.helpers import install_plugin, meta_reads, write_config


def train(tmp_path: Path, dataset: Path, overrides: list[str] = (), run: str = "run", **kw):
    cfg = load_config(write_config(tmp_path / "tiny.toml", dataset), list(overrides))
    return Trainer(train_job(cfg, tmp_path / run, "cpu", **kw)).run()


@pytest.mark.slow
def test_loss_falls_and_the_run_dir_is_complete(tmp_path, char_dataset):
    result = train(tmp_path, char_dataset, ["train.max_iters=60"])
    events = RunDir(result.run_dir).events()
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [10, 20, 30, 40, 50, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    assert result.best_val_loss == min(e["val_loss"] for e in evals)
    assert events[0]["event"] == "start" and events[0]["params"] > 0
    assert len([e for e in events if e["event"] == "train"]) == 12
    assert (result.run_dir / "loss.png").stat().st_size > 10_000
    # Drawn at the last eval and not again at the end, which logged nothing it draws: every event is in it.
    assert plot_losses(RunDir(result.run_dir), tmp_path / "again.png").read_bytes() == \
        (result.run_dir / "loss.png").read_bytes()
    best = RunDir(result.run_dir).checkpoint("best")
    assert best.name == f"step_{result.best_step:06d}"
    assert sorted(p.name for p in best.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    folders = [p.name for p in (result.run_dir / "checkpoints").glob("step_*")]
    assert len(folders) <= 3 + 1  # keep_checkpoints plus best


@pytest.mark.slow
def test_train_loss_is_the_mean_since_the_last_eval(tmp_path, char_dataset):
    result = train(tmp_path, char_dataset, ["train.max_iters=20", "train.log_interval=1"])
    events = RunDir(result.run_dir).events()
    steps = [e["loss"] for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    assert evals[0]["train_loss"] == pytest.approx(sum(steps[:10]) / 10, rel=1e-5)
    assert evals[1]["train_loss"] == pytest.approx(sum(steps[10:20]) / 10, rel=1e-5)


@pytest.mark.slow
def test_early_stopping_after_patience_evals_without_a_new_best(tmp_path, char_dataset):
    # A learning rate far below fp32 resolution leaves the weights, and so val, as they were at the first eval.
    result = train(tmp_path, char_dataset, ["train.max_iters=200", "train.warmup_iters=0", "train.patience=2",
                                            "train.learning_rate=1e-30", "train.min_lr=0", "model.bias=false"])
    assert result.stopped_early and result.steps == 30 and result.best_step == 10
    assert result.final["step"] == 30  # an early stop is an end: the checkpoint it ended on is scored


@pytest.mark.slow
def test_resume_continues_from_the_latest_checkpoint(tmp_path, char_dataset):
    train(tmp_path, char_dataset, ["train.max_iters=20"])
    cfg = load_config(tmp_path / "run" / "config.toml", ["train.max_iters=40"])
    result = Trainer(train_job(cfg, tmp_path / "run", "cpu", resume=True)).run()
    steps = [e["step"] for e in RunDir(result.run_dir).events() if e["event"] == "eval"]
    assert steps == [10, 20, 30, 40]
    with pytest.raises(UserError, match="--resume"):
        train(tmp_path, char_dataset, ["train.max_iters=20"])


@pytest.mark.slow
def test_a_run_loads_back_for_inference(tmp_path, char_dataset):
    result = train(tmp_path, char_dataset, ["train.max_iters=10"])
    run = RunDir(result.run_dir).load("latest", "cpu")
    assert run.step == 10 and not run.model.training and run.kind == "trained" and run.dtype == torch.float32
    assert run.config.model.vocab_size == json.loads((char_dataset / "meta.json").read_text())["vocab_size"]
    assert run.tokenizer.decode(run.tokenizer.encode("ROMEO:")) == "ROMEO:" and run.prompt_format is None


def test_vocab_mismatch_with_the_dataset_is_refused(tmp_path, char_dataset):
    with pytest.raises(UserError, match="vocab_size"):
        train(tmp_path, char_dataset, ["model.vocab_size=7"])


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = load_config(Path("configs/shakespeare-char-cpu.toml")).train
    assert lr_at(0, cfg) < lr_at(cfg.warmup_iters - 1, cfg) <= cfg.learning_rate
    assert lr_at(cfg.warmup_iters, cfg) == pytest.approx(cfg.learning_rate)
    assert lr_at(cfg.max_iters, cfg) == pytest.approx(cfg.min_lr)
    values = [lr_at(s, cfg) for s in range(cfg.warmup_iters, cfg.max_iters)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_pickle_anywhere_in_the_package():
    for path in Path(lmlab.__file__).parent.rglob("*.py"):
        source = path.read_text()
        assert "pickle" not in source, path
        for call in re.findall(r"torch\.load\([^)]*\)", source):
            assert "weights_only=True" in call, path


@pytest.mark.slow
def test_a_warmup_in_passes_is_the_steps_of_that_share_of_the_train_split(tmp_path, char_dataset, capsys):
    """The write-ups warm up by epochs (`warmup_epochs` in the WikiText-2 notes): made steps as an eval_interval in
    epochs is, which the schedule, a resume and config.toml then hold."""
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    tokens = json.loads((char_dataset / "meta.json").read_text())["train"]["tokens"]
    steps = round(0.1 * tokens / (8 * 32))  # tiny.toml's batch of 8 rows of 32 tokens
    settings = [arg for s in ("train.warmup_iters=0", "train.warmup_epochs=0.1", "train.max_iters=12",
                              "train.log_interval=1") for arg in ("--set", s)]
    assert main(["train", str(config), "--run", str(tmp_path / "run"), "--device", "cpu", *settings]) == 0
    assert f"warmup: 0.1 passes over the train split, {steps} steps" in capsys.readouterr().out
    lrs = {e["step"]: e["lr"] for e in RunDir(tmp_path / "run").events() if e["event"] == "train"}
    assert [lrs[k] for k in range(1, steps + 2)] == pytest.approx([3e-3 * k / (steps + 1) for k in range(1, steps + 1)]
                                                                  + [3e-3])
    kept = RunDir(tmp_path / "run").config().train
    assert (kept.warmup_iters, kept.warmup_epochs) == (steps, 0.0)
    # tiny.toml's warmup_iters = 5 and a warmup in passes are two lengths for one warmup
    assert main(["train", str(config), "--run", str(tmp_path / "both"), "--set", "train.warmup_epochs=0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: train.warmup_epochs (0.1) and train.warmup_iters (5) both set the warmup's length; keep "
                   "one: warmup_iters = 0 (or left out) to warm up by passes, or warmup_epochs = 0."]
    assert not (tmp_path / "both").exists()


# A model plugin whose third training step fails just after a stop was asked for: as torch.compile's C++ compiler,
# killed by the terminal's Ctrl-C that stopped the run, fails the step it was compiling.
FAILING_ON_STOP = """
import torch.nn as nn
from lmlab.model import LanguageModel
from lmlab.model.loss import next_token_loss
from lmlab.train.stop import stop_for_closed_output


class Tiny(LanguageModel):
    def __init__(self, config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size)
        self.steps = 0

    def forward(self, idx, targets=None, cache=None):
        if self.training and targets is not None and idx.shape[0] == 8:  # a training step's batch
            self.steps += 1
            if self.steps == 3 and stop_for_closed_output():
                raise RuntimeError("the C++ compiler died of the signal")
        logits = self.head(self.wte(idx))
        return logits, None if targets is None else next_token_loss(logits, targets)
"""


def test_a_step_that_fails_once_a_stop_was_asked_for_ends_the_run_as_that_stop(tmp_path, char_dataset, monkeypatch):
    """A Ctrl-C while train.compile compiles killed the C++ compiler too, and the step failed with its error: the run
    ended in a traceback (or main's one-line fallback) instead of the stop it was, with its end event, the lock
    released and the run resumable."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    install_plugin(site, "failing-on-stop", "lmlab-failing-on-stop", FAILING_ON_STOP)
    result = train(tmp_path, char_dataset, ['model.kind="failing-on-stop"', "train.max_iters=20",
                                            "train.checkpoint_interval=2"])
    assert result.abandoned and result.stopped_by == "SIGPIPE" and result.steps == 2
    end = RunDir(result.run_dir).events()[-1]
    assert (end["event"], end["stopped_by"], end["step"]) == ("end", "SIGPIPE", 2)
    assert result.saved.name == "step_000002" and not RunDir(result.run_dir).running()  # resumable, the lock let go


def test_a_train_reads_its_datasets_meta_once(tmp_path, char_dataset, monkeypatch):
    """The dataset's meta.json is read once, where the config is resolved, and passed on to the data's checks, the
    plan and the run folder (read_meta counted wherever lmlab imported it)."""
    calls = meta_reads(monkeypatch)
    lmlab.train(write_config(tmp_path / "tiny.toml", char_dataset), run=tmp_path / "run", device="cpu", max_iters=1,
                console=Console(file=io.StringIO()))
    assert calls == [char_dataset]
