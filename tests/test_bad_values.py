"""Every numeric option of the CLI, and every numeric setting `--set` reaches, against the values a careless user
types: negative, 0, nan, inf, huge and not a number. Each is refused in one line with status 2, naming the option,
before anything is loaded or written; or it is a value the option means to take, listed in its row as accepted.

A new numeric option needs a row here: `test_every_numeric_option_has_a_row` fails until it has one.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w
import torch

from lmlab.commands import build_parser, main
from lmlab.commands.common import samplings
from lmlab.core.config import DataConfig, FinetuneConfig, ModelConfig, TrainConfig
from lmlab.core.config_toml import load_config, load_finetune_config
from lmlab.core.errors import MOST_CHARACTERS
from lmlab.model import build_model
from tests.helpers import ALPACA_TINY, write_config

CLASSES = ("negative", "zero", "nan", "inf", "huge", "wrong type")
VALUES = {int: {"negative": "-5", "zero": "0", "nan": "nan", "inf": "inf", "huge": str(10**30), "wrong type": "abc"},
          float: {"negative": "-5", "zero": "0", "nan": "nan", "inf": "inf", "huge": "1e300", "wrong type": "abc"}}


@dataclass(frozen=True)
class Row:
    """`command` (with {run}, {corpus}, {dataset}, {config}, {plugin_config}, {out}, {alpaca} filled in) and then
    `option VALUE`, or `--set option=VALUE` for a config setting; `accepted` are the classes the option means to
    take, and `check` what else must accept them ("sampling", "train", "plugin" or "finetune" settings), beyond
    argparse; `beyond` are values just past a bound of its own, refused like the classes it does not take."""

    command: str
    option: str
    kind: type
    accepted: tuple[str, ...] = ()
    check: str = ""
    beyond: tuple[str, ...] = ()

    @property
    def setting(self) -> bool:
        return "." in self.option

    @property
    def subcommand(self) -> str:
        """`sample`, `data stats`: the words before the first argument or option."""
        words = []
        for word in self.command.split():
            if word.startswith(("{", "-")):
                break
            words.append(word)
        return " ".join(words)

    def argv(self, value: str, paths: dict[str, Path]) -> list[str]:
        tail = ["--set", f"{self.option}={value}"] if self.setting else [self.option, value]
        return [part.format(**paths) for part in self.command.split()] + tail

    def names(self) -> tuple[str, ...]:
        """What the refusal may call the option: itself, or the field it sets."""
        return (self.option,) if self.setting else (self.option, self.option.lstrip("-").replace("-", "_"))


def sampling_rows(command: str) -> list[Row]:
    return [Row(command, "--max-new-tokens", int, check="sampling"),
            Row(command, "--temperature", float, ("zero", "huge"), "sampling"),  # greedy; uniform
            Row(command, "--top-k", int, check="sampling"), Row(command, "--top-p", float, check="sampling"),
            Row(command, "--seed", int, ("zero",), "sampling")]


def setting_rows(command: str, section: str, cls: type, accepted: dict[str, tuple[str, ...]], check: str,
                 beyond: dict[str, tuple[str, ...]] | None = None) -> list[Row]:
    kinds = {"int": int, "float": float}
    return [Row(command, f"{section}.{f.name}", kinds[f.type], accepted.get(f.name, ()), check,
                (beyond or {}).get(f.name, ())) for f in dataclasses.fields(cls) if f.type in kinds]


PREPARE = "prepare {corpus} --tokenizer char --out-dir {out}"
TRAIN = "train {config} --run {out}/run"
FINETUNE = "finetune {run} --data {alpaca} --out {out}/tuned"
PLUGIN = "train {plugin_config} --run {out}/run"  # examples/context-vector's [model.options]
ROWS = [
    Row(PREPARE, "--val-fraction", float), Row(PREPARE, "--val-tokens", int), Row(PREPARE, "--max-tokens", int),
    Row(PREPARE, "--workers", int), Row(PREPARE, "--shard-tokens", int), Row(PREPARE, "--block-size", int),
    Row(PREPARE, "--normalize", int),  # none of these is a normalisation
    Row(PREPARE, "--keep-chars", int),  # characters, but a char dataset must keep its line break
    Row(PREPARE, "--drop-chars", int, CLASSES),  # characters to drop: any text names some
    Row("data stats {dataset}", "--block-size", int),
    Row("eval {run}", "--batch-size", int), Row("eval {run}", "--max-tokens", int),
    Row("eval {run} --task {out}/task.jsonl", "--limit", int),
    # a step the run does not have (0 here, as every negative, huge or non-numeric one) is refused with its steps
    *[Row(command, "--checkpoint", int) for command in (
        "eval {run}", "sample {run}", "compare {run} {run}", "answer {run} --data {alpaca} --out {out}/answers.jsonl",
        "export-hf {run} {out}/exported", "export-gguf {run} {out}/exported.gguf", "report {run} --out {out}/report",
        "serve {run}")],
    *sampling_rows("sample {run}"), *sampling_rows("compare {run} {run} --prompt ROMEO"),
    Row("compare {run} {run}", "--dataset", int),  # a dataset's folder: none of these is one
    *sampling_rows("answer {run} --data {alpaca} --out {out}/answers.jsonl"),
    Row("serve {run}", "--port", int, ("zero",), beyond=("65536",)),  # 0: a free port
    Row("serve {run}", "--max-tokens-cap", int),
    Row("serve {run}", "--max-batch", int), Row("serve {run}", "--max-queue", int, ("zero",)),
    Row("serve {run}", "--max-body-bytes", int, beyond=("1023",)),  # at least 1 KiB
    Row("serve {run}", "--max-connections", int, beyond=("1000001",)),
    Row("serve {run}", "--max-client-connections", int, beyond=("1000001",)),
    *[Row("serve {run}", option, float, beyond=("86401",))  # at most a day
      for option in ("--header-timeout", "--body-timeout", "--idle-timeout")],
    Row("serve {run}", "--threads", int, ("zero",)),
    Row("serve {run}", "--drain-seconds", float, ("zero",)),
    Row("serve {run}", "--served-model-name", int, CLASSES),  # a name: every one of these is a valid one
    Row("sample {run}", "--num-samples", int),
    # a weights' format (none or int8): no number is one
    *[Row(command, "--quantize", int) for command in ("sample {run}", "serve {run}",
                                                      "answer {run} --data {alpaca} --out {out}/answers.jsonl")],
    Row("answer {run} --data {alpaca} --out {out}/answers.jsonl", "--batch-size", int),
    Row("judge --answers {out}/a.jsonl --endpoint http://127.0.0.1:9/v1 --model m", "--max-tokens", int),
    Row("judge --answers {out}/a.jsonl --endpoint http://127.0.0.1:9/v1 --model m", "--lowest", int, ("zero",)),
    Row("bench {config}", "--steps", int), Row("bench {config}", "--batch-sizes", int),
    Row("bench {config} --find-max-batch", "--search-seconds", float, ("huge",)),
    Row("plan {config}", "--tokens", int),
    Row("plan {config}", "--tokens-per-sec", float, ("huge",), beyond=("1e-300", "0.999")),  # at least 1 token/s
    Row("plan {config}", "--mfu", float),
    # a duration (30s, 5m, 2h): typed by the command, so not found by argparse type; at most 366 days
    Row(TRAIN, "--budget", float, beyond=("99999999999h", "8785h", "31622401")),
    # auto or a depth of the preset's family, at most 48 layers: typed by the command too
    Row(TRAIN + " --budget 30s", "--size", int, beyond=("49", "1.5", "auto2")),
    Row("plan {config}", "--budget", float, beyond=("8785h", "31622401")),
    Row("plan {config} --budget 30s", "--size", int, beyond=("49",)),
    Row("scaling {config} --refit", "--depths", int, beyond=("49",)),
    Row("scaling {config} --refit", "--tokens", int, beyond=("0.1", "2000G")),
    Row("scaling {config} --refit", "--lr-factors", float, beyond=("101",)),
    Row("scaling {config} --refit", "--max-flops", float, ("huge",)),
    Row("scaling {config} --refit", "--budget", float, beyond=("8785h", "31622401")),
    # run budgets, each a duration as --budget takes it
    Row("scaling {config} --refit --budget 1m", "--for", float, beyond=("8785h", "31622401", "1m,", "1m,-5")),
    Row("import-hf {out}/missing --out {out}/imported", "--block-size", int),
    *sampling_rows("report {run} --out {out}/report"),
    Row("sweep {config} --set train.max_iters=1,2 --dir {out}", "--budget-tokens", int),
    Row("sweep {config} --set train.max_iters=1,2 --dir {out}", "--budget-seconds", float, beyond=("31622401",)),
    Row("sweep {config} --set train.max_iters=1,2 --dir {out} --budget-seconds 30", "--size", int,
        beyond=("49", "1.5", "auto2")),
    *setting_rows(TRAIN, "model", ModelConfig, {"dropout": ("zero",), "vocab_size": ("zero",),
                                                 "n_kv_head": ("zero",), "head_dim": ("zero",),
                                                 "mlp_hidden": ("zero",), "rope_theta": ("huge",),
                                                 "norm_eps": ("zero",), "bigram_buckets": ("zero",)}, "train"),
    *setting_rows(TRAIN, "train", TrainConfig, {
        "max_seconds": ("zero", "huge"), "budget_seconds": ("zero",), "min_lr": ("zero",),
        "warmup_iters": ("zero",), "warmup_epochs": ("zero",), "lr_decay_iters": ("zero",),
        "weight_decay": ("zero",), "beta1": ("zero",), "beta2": ("zero",), "grad_clip": ("zero", "huge"),
        "patience": ("zero",), "seed": ("zero",), "spike_zscore": ("huge",), "spike_patience": ("zero",),
        "threads": ("zero",)}, "train", beyond={"budget_seconds": ("31622401",)}),
    Row(TRAIN, "train.eval_interval", int, check="train"),  # steps between evaluations (or "epoch", "N epochs")
    Row(TRAIN, "train.eval_every", float, check="train"),  # eval_interval's older spelling, in passes
    Row(TRAIN, "train.max_seconds", float, ("zero",), "train"),  # budget_seconds' older name
    Row(TRAIN, "model.bias", int, check="train"),  # true, false, or the places that have biases: no number
    *setting_rows(FINETUNE, "finetune", FinetuneConfig, {"seed": ("zero",), "threads": ("zero",)}, "finetune"),
    Row(PLUGIN, "model.options.context_size", int, ("zero",), "plugin"),  # 0: the default width
    Row(PLUGIN, "model.options.mlp_ratio", int, check="plugin"),
]
CELLS = [*(pytest.param(row, cls, VALUES[row.kind][cls], id=f"{row.command.split()[0]} {row.option} {cls}")
           for row in ROWS for cls in CLASSES),
         *(pytest.param(row, "beyond", value, id=f"{row.command.split()[0]} {row.option} {value}")
           for row in ROWS for value in row.beyond)]


@pytest.fixture(scope="session")
def paths(tmp_path_factory, corpus_dir, char_dataset, tiny_run) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("numbers")
    config = write_config(root / "tiny.toml", char_dataset, max_iters=10)
    plugin_config = root / "context-vector.toml"
    plugin_config.write_text(config.read_text().replace("n_layer = 2", 'kind = "context-vector"\nn_layer = 2'))
    return {"run": tiny_run, "corpus": corpus_dir, "dataset": char_dataset, "config": config, "alpaca": ALPACA_TINY,
            "plugin_config": plugin_config, "out": root / "out"}


@pytest.mark.parametrize("row, cls, value", CELLS)
@pytest.mark.slow
def test_a_numeric_option_refuses_what_it_cannot_take(capsys, paths, row, cls, value):
    argv = row.argv(value, paths)
    if cls in row.accepted:
        args = build_parser().parse_args(argv)
        if row.check == "sampling":
            samplings(args)
        elif row.check == "train":
            load_config(paths["config"], args.set)
        elif row.check == "finetune":
            load_finetune_config(None, args.set)
        elif row.check == "plugin":  # a plugin checks its options when it builds its model
            cfg = load_config(paths["plugin_config"], args.set).model
            with torch.device("meta"):
                build_model(dataclasses.replace(cfg, vocab_size=50))
        return
    code = _run(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, out, err)
    assert any(name in lines[0] for name in row.names()), (row.names(), lines[0])
    assert not paths["out"].exists()  # nothing written


# Every thread option against counts OpenMP cannot take (20,000 aborted in libgomp, 100,000 crashed with SIGSEGV):
# refused past the cores this process may use, before anything loads.
THREAD_ROWS = [Row(TRAIN, "train.threads", int), Row("bench {config}", "train.threads", int),
               Row("plan {config} --measure", "train.threads", int), Row("serve {run}", "--threads", int),
               Row(FINETUNE, "finetune.threads", int)]


@pytest.mark.parametrize("row", THREAD_ROWS, ids=lambda row: f"{row.subcommand} {row.option}")
@pytest.mark.parametrize("value", ["20000", "100000"])
def test_a_thread_count_past_the_cores_is_refused_in_one_line(capsys, paths, row, value):
    code = _run(row.argv(value, paths))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"is {int(value):,}, more than the" in lines[0], lines
    assert any(name in lines[0] for name in row.names()) and "or 0 to let lmlab choose" in lines[0]
    assert not paths["out"].exists()


# Every path option the Python API takes as well, given as an empty string (the current folder: `--run ""` trained
# into runs/NAME, `prepare --out-dir ""` wrote its dataset into the current folder): refused by lmlab.api.checks in
# one line naming it, before anything is written.
# (`prepare --name ""` has its own sentence: tests/test_errors.py.)
EMPTY_ROWS = [Row("train {config}", "--run", str), Row("train", "--resume", str),
              Row("prepare {corpus} --tokenizer char", "--out-dir", str),
              # Where the command line alone writes (was: taken as not given, nothing written, nothing said).
              Row("log {run}", "--plot", str), Row("compare {run}", "--plot", str),
              Row("compare {run}", "--dataset", str)]


@pytest.mark.parametrize("row", EMPTY_ROWS, ids=lambda row: f"{row.subcommand} {row.option}")
def test_an_empty_path_option_is_refused_in_one_line(capsys, paths, row, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _run(row.argv("", paths))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "is ''; it must be" in lines[0], lines
    assert any(name in lines[0] for name in row.names()) and not list(tmp_path.iterdir())
    assert not paths["out"].exists()


# Every text setting of a config (a type that takes a str): what a preset may hold at any length.
TEXT_SETTINGS = [f"{section}.{f.name}" for section, cls in (("data", DataConfig), ("model", ModelConfig),
                                                            ("train", TrainConfig), ("finetune", FinetuneConfig))
                 for f in dataclasses.fields(cls) if "str" in f.type.split(" | ")]


@pytest.mark.parametrize("setting", TEXT_SETTINGS)
def test_a_text_setting_of_half_a_megabyte_is_quoted_cut_short(capsys, paths, tmp_path, monkeypatch, setting):
    """Each text setting half a megabyte long in a preset (a command line holds less), planned: refused or taken,
    every line said is at most a refusal's length (lmlab.core.errors.MOST_CHARACTERS, with what says it was cut
    short), the value never quoted whole."""
    monkeypatch.chdir(tmp_path)
    section, name = setting.split(".")
    raw = tomllib.loads(paths["config"].read_text())
    raw.setdefault(section, {})[name] = "x" * 2**19
    (tmp_path / "long.toml").write_text(tomli_w.dumps(raw))
    _run(["plan", str(tmp_path / "long.toml")])
    out, err = capsys.readouterr()
    assert max(map(len, (out + err).splitlines())) < MOST_CHARACTERS + 40, (setting, err[:300])


def _run(argv: list[str]) -> int:
    """main(), with argparse's exit (a value it cannot parse) as the status it exits with."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def _numeric_options(parser: argparse.ArgumentParser, prefix: str = "") -> set[tuple[str, str]]:
    """(command, option) of every option with a type, through the subcommands."""
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= _numeric_options(sub, f"{prefix} {name}".strip())
        elif action.type not in (None, str) and action.option_strings and not hasattr(action.type, "destination"):
            found.add((prefix, action.option_strings[0]))
    return found


def test_every_numeric_option_has_a_row():
    covered = {(row.subcommand, row.option) for row in ROWS if not row.setting}
    missing = _numeric_options(build_parser()) - covered
    assert not missing, f"give these options a row in ROWS: {sorted(missing)}"
    settings = {f"{section}.{f.name}" for section, cls in (("model", ModelConfig), ("train", TrainConfig),
                                                          ("finetune", FinetuneConfig))
                for f in dataclasses.fields(cls) if f.type in ("int", "float")}
    assert not settings - {row.option for row in ROWS if row.setting}
