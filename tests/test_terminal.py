"""What a person sees in a terminal or a log file: plain progress lines when output is not a terminal, the
version, help with defaults and an example for every subcommand, bench's dtype, the architecture column."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
from importlib.metadata import version

import pytest
import torch

from lmlab.commands import EXAMPLES, build_parser, main
from lmlab.core.config import ModelConfig
from lmlab.core.peak import autocast_dtype
from lmlab.model import build_model
from lmlab.run.rundir import RunDir
from tests.helpers import LMLAB, copy_run, lmlab, write_config


@pytest.mark.slow
def test_a_piped_train_logs_a_plain_line_every_log_interval(tmp_path, char_dataset):
    """As under nohup, Slurm or `| tee`: each line arrives while the run trains (this one until it is stopped)."""
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=100_000)
    proc = subprocess.Popen([LMLAB, "train", config, "--run", tmp_path / "run", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    while "step 40/" not in seen:
        seen += proc.stdout.readline()
        assert proc.poll() is None, seen
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    lines = re.findall(r"^step (\d+)/100,000 \| loss ([\d.]+) \| lr ([\d.e+-]+) \| ([\d,]+) tok/s \| ([\d,.]+) ms/step"
                       r"(?: \| MFU ([\d.]+)%)? \| "
                       r"epoch ([\d.]+), ([\d.]+) (s|min|h|days)/epoch \| elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$",
                       seen + rest, re.MULTILINE)
    trains = [e for e in RunDir(tmp_path / "run").events() if e["event"] == "train"]
    assert [int(step) for step, *_ in lines] == [e["step"] for e in trains]
    assert [int(step) for step, *_ in lines][:8] == [5, 10, 15, 20, 25, 30, 35, 40]
    for (_, loss, lr, rate, ms, mfu, epoch, per_epoch, unit), event in zip(lines, trains):
        assert (loss, float(lr)) == (f"{event['loss']:.4f}", pytest.approx(event["lr"], rel=0.051))  # 2 digits
        # metrics.jsonl rounds tokens/s to 0.1 and MFU to 4 places; the line rounds the exact figures
        assert float(rate.replace(",", "")) == pytest.approx(event["tokens_per_sec"], abs=1)
        # a step's milliseconds (to 0.1 below 10 ms, else whole), of the same steps: tokens per step over tokens/s
        assert float(ms.replace(",", "")) == pytest.approx(event["ms_per_step"], abs=0.51)
        assert event["ms_per_step"] == pytest.approx(1000 * 8 * 32 / event["tokens_per_sec"], rel=1e-3)
        assert (float(mfu) == pytest.approx(100 * event["mfu"], abs=0.06)) if mfu else event["mfu"] is None
        assert float(epoch) == pytest.approx(event["epoch"], abs=0.006)
        # the wall time per pass so far: elapsed / epoch (as the event rounds them, and the line its unit)
        seconds = float(per_epoch) * {"s": 1, "min": 60, "h": 3600, "days": 86400}[unit]
        assert seconds == pytest.approx(event["elapsed"] / event["epoch"], rel=0.05, abs=0.5)
    # the eval lines too, each train loss by its name, and no terminal codes
    assert re.search(r"step 10 \| train \(steps\) [\d.]+ \| train \(eval\) [\d.]+ \| val", seen)
    assert "\x1b[" not in seen + rest


def test_version_names_lmlab_torch_and_python(tmp_path):
    out = lmlab("--version", cwd=tmp_path).stdout
    assert re.fullmatch(rf"lmlab \S+ \(torch {re.escape(version('torch'))}, Python 3\.\d+\.\d+\)\n", out)


def walk(parser: argparse.ArgumentParser, name: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield f"{name} {sub_name}".strip(), sub
                yield from walk(sub, f"{name} {sub_name}".strip())


def test_every_subcommand_has_an_example_and_help_on_every_argument():
    commands = dict(walk(build_parser()))
    assert set(commands) == set(EXAMPLES)
    for name, parser in commands.items():
        undocumented = [a.dest for a in parser._actions if not a.help and not isinstance(a, argparse._HelpAction)]
        assert undocumented == [], f"lmlab {name}: no help for {undocumented}"
        assert EXAMPLES[name].startswith(f"lmlab {name.split()[0]}")
        assert parser.format_help().rstrip().endswith(f"example:\n  {EXAMPLES[name]}")


@pytest.mark.parametrize("command, shown", [
    ("serve", ["--port PORT", "(default: 8000)", "(default: 512)",
               "best (lowest val loss), latest, or a step: step_N or N (e.g. 500) (default: best)"]),
    ("sample", ["(default: 0.8)", "tokens to generate at most (default: 500)", "RUN "]),
    ("report", ["(default: 300)", "(default: auto)", "RUN [RUN ...]"]),
])
def test_help_shows_the_defaults(command, shown, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(" ".join(s.split()) in out for s in shown)


@pytest.mark.slow
def test_bench_names_the_dtype_it_trained_in(capsys, tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    assert main(["bench", str(config), "--steps", "1", "--device", "cpu", "--set", "train.dtype=auto"]) == 0
    out = capsys.readouterr().out.split("┏")[0]
    title = " ".join(out.split()).split("training steps per batch size")[1]
    used = str(autocast_dtype(torch.device("cpu"), "auto")).removeprefix("torch.")
    assert title.startswith(f" (cpu, {used}, ") and "auto" not in title  # then the threads it timed on
    assert out.startswith(f"dtype {used} (auto: ")  # and why, first


@pytest.mark.parametrize("settings, label", [
    ({}, "GPT-2"), ({"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True}, "modern"),
    ({"pos_emb": "rope"}, "mixed"), ({"kind": "recurrent"}, "GRU"), ({"kind": "recurrent", "rnn_cell": "lstm"}, "LSTM"),
])
def test_the_architecture_column_tells_the_families_apart(settings, label):
    with torch.device("meta"):
        model = build_model(ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=65, **settings))
    assert model.architecture() == label


@pytest.mark.slow
def test_tables_fit_the_columns_they_are_given(tmp_path, tiny_run):
    """COLUMNS narrows piped output too, as a terminal of that width would."""
    copy_run(tiny_run, tmp_path / "runs", "a-long-run-name-from-a-sweep")  # a run the table lists, trained once
    for columns in (60, 80, 120):
        out = subprocess.run([LMLAB, "runs"], cwd=tmp_path, capture_output=True, text=True, check=True,
                             env={**os.environ, "COLUMNS": str(columns)}).stdout
        assert max(map(len, out.splitlines())) <= columns and "…" not in out
        assert "a-long-run-name-from-a-sweep" in out.replace("\n", "")
