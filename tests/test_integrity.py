"""One integrity rule for every file a command reads: data files checked against their meta.json, a resume comparing the
checksum of the bytes it reads, and a run's edited tokenizer refused by every command that reads it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmlab.commands import main
from lmlab.run.rundir import RunDir
from tests.helpers import refused, write_config


def test_the_same_integrity_rule_holds_for_new_runs_resumes_and_evaluations(capsys, tmp_path, tiny_run):
    dataset = Path(shutil.copytree(RunDir(tiny_run).config().data.dataset, tmp_path / "data"))
    resumable = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    (resumable / "config.toml").write_text((tiny_run / "config.toml").read_text().replace(
        RunDir(tiny_run).config().data.dataset, str(dataset)))
    config = write_config(tmp_path / "tiny.toml", dataset)
    ids = np.fromfile(dataset / "train.bin", dtype=np.uint16)
    edited = ids.copy()
    edited[100:110] = edited[200:210]  # the same size: meta.json's sizes still match
    edited.tofile(dataset / "train.bin")
    for args in (["train", config, "--run", tmp_path / "new"],
                 ["train", "--resume", resumable, "--set", "train.max_iters=20", "--force"]):
        refused(capsys, *args, needles=("the train split of", "does not match the checksum", "lmlab prepare"))
    assert not (tmp_path / "new").exists()
    val = np.fromfile(dataset / "val.bin", dtype=np.uint16)
    val[:5] = val[5:10]
    val.tofile(dataset / "val.bin")
    refused(capsys, "eval", tiny_run, "--dataset", dataset, needles=("the val split of", "does not match the checksum"))
    # Ids beyond the vocabulary with a checksum that matches them: still refused, the id named.
    ids[50] = 60_000
    ids.tofile(dataset / "train.bin")
    meta = json.loads((dataset / "meta.json").read_text())
    meta["train"]["sha256"] = __import__("hashlib").sha256(ids.tobytes()).hexdigest()
    (dataset / "meta.json").write_text(json.dumps(meta))
    refused(capsys, "train", config, "--run", tmp_path / "new", needles=("holds token id 60,000", "vocabulary of 43"))
    tokenizer = dataset / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text() + "\n")  # the same tokens, other bytes
    refused(capsys, "train", config, "--run", tmp_path / "new", needles=("tokenizer.json does not match",))
    assert not (tmp_path / "new").exists()


def test_a_runs_edited_tokenizer_is_refused_by_every_command_that_reads_it(capsys, tmp_path, tiny_run):
    copy = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    vocab = json.loads((copy / "tokenizer.json").read_text())
    table = vocab["model"]["vocab"]
    table["a"], table["e"] = table["e"], table["a"]  # one swapped pair: sampling would print other text
    (copy / "tokenizer.json").write_text(json.dumps(vocab))
    intact = Path(RunDir(tiny_run).config().data.dataset) / "tokenizer.json"
    for args in (["sample", copy, "--max-new-tokens", "5"], ["eval", copy], ["export-hf", copy, tmp_path / "out"],
                 ["train", "--resume", copy, "--set", "train.max_iters=20"]):
        refused(capsys, *args, needles=(f"{copy}/tokenizer.json does not match the checksum",
                                        f"copy it back from {intact}"))
    shutil.copy(intact, copy / "tokenizer.json")
    assert main(["sample", str(copy), "--max-new-tokens", "5"]) == 0


@pytest.mark.slow
def test_data_files_that_do_not_match_their_meta_are_refused(capsys, tmp_path, char_dataset):
    def broken(name: str, change) -> Path:
        dataset = Path(shutil.copytree(char_dataset, tmp_path / name))
        change(dataset)
        return write_config(tmp_path / f"{name}.toml", dataset)

    def edit_meta(**changes):
        def change(dataset: Path) -> None:
            meta = json.loads((dataset / "meta.json").read_text())
            (dataset / "meta.json").write_text(json.dumps({**meta, **changes}))
        return change

    def cut(fraction: float, extra: int = 0):
        def change(dataset: Path) -> None:
            data = (dataset / "train.bin").read_bytes()
            (dataset / "train.bin").write_bytes(data[:int(len(data) * fraction)] + b"\0" * extra)
        return change

    cases = {"truncated": (cut(0.12), "train.bin holds"), "odd": (cut(1.0, extra=1), "train.bin holds"),
             "dtype": (edit_meta(dtype="uint32"), "dtype 'uint32'"),
             "vocab": (edit_meta(vocab_size=20), "vocab_size 20")}
    for name, (change, needle) in cases.items():
        config = broken(name, change)
        refused(capsys, "train", config, "--run", tmp_path / f"run-{name}", needles=(needle, "--force"))
        assert not (tmp_path / f"run-{name}").exists()  # refused before the run folder is made


@pytest.mark.slow
def test_resume_compares_the_checksum_of_the_bytes_it_reads(capsys, tmp_path, char_dataset):
    """A dataset prepared again from other inputs (meta.json describes the new bytes) is another dataset: resume
    needs --force for it. Bytes edited in place (meta.json no longer describes them) are refused by every command,
    --force or not (test_the_same_integrity_rule_holds_for_new_runs_resumes_and_evaluations)."""
    dataset = Path(shutil.copytree(char_dataset, tmp_path / "data"))
    config = write_config(tmp_path / "tiny.toml", dataset, max_iters=10)
    assert main(["train", str(config), "--run", str(tmp_path / "run"), "--device", "cpu"]) == 0
    data = bytearray((dataset / "train.bin").read_bytes())
    data[100:110] = data[200:210]  # same size
    (dataset / "train.bin").write_bytes(bytes(data))
    meta = json.loads((dataset / "meta.json").read_text())
    meta["train"]["sha256"] = hashlib.sha256(data).hexdigest()  # as `prepare --force` of other inputs writes it
    (dataset / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    refused(capsys, "train", "--resume", tmp_path / "run", "--set", "train.max_iters=20",
            needles=("differs from the one", "--force"))
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "train.max_iters=20", "--force"]) == 0
