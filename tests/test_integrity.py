"""One integrity rule for every file a command reads: data files checked against their meta.json, a resume comparing the
checksum of the bytes it reads, a run's edited tokenizer refused by every command that reads it, and what is no file
(a pipe, a device, a folder) or cannot be read in a file's place refused in a sentence naming it, never waited on."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmlab.commands import main
from lmlab.run.rundir import RunDir
from tests.helpers import digests, drop_root_bypass, in_one_process, refused, write_config


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


# What may stand in a file's place besides the file, what the refusal calls it, and how a test puts it there: a named
# pipe (whose open waits for a writer), a device whose reads never end, a folder.
NOT_FILES = [
    ("it is a named pipe, not a file", os.mkfifo),
    ("it is a link to /dev/zero, a character device, not a file", lambda path: path.symlink_to("/dev/zero")),
    ("it is a folder, not a file", Path.mkdir),
]
EVAL, SAMPLE = ["eval", "{run}"], ["sample", "{run}", "--max-new-tokens", "2"]
RESUME = ["train", "--resume", "{run}", "--set", "train.max_iters=20"]
# Every file a command reads from a run folder (`{run}`), a dataset folder (`{data}`, which `{config}` trains on) or a
# Hugging Face folder (`{hf}`), and the commands that read it; a run-folder file `lmlab runs` reads lists its run as
# unreadable (LISTED).
STEP = "checkpoints/step_000010"
READERS = {
    "{run}/config.toml": [["log", "{run}"], ["compare", "{run}"], SAMPLE, RESUME],
    "{run}/metrics.jsonl": [["log", "{run}"], ["compare", "{run}"], SAMPLE, RESUME],
    "{run}/dataset.json": [["compare", "{run}"], EVAL, SAMPLE, RESUME],
    "{run}/evaluations.json": [["compare", "{run}"]],
    "{run}/tokenizer.json": [EVAL, SAMPLE, RESUME],
    "{run}/checkpoints/best": [EVAL, SAMPLE],
    "{run}/checkpoints/latest": [[*SAMPLE, "--checkpoint", "latest"], RESUME],
    f"{{run}}/{STEP}/state.json": [EVAL, SAMPLE, RESUME],
    f"{{run}}/{STEP}/model.safetensors": [EVAL, SAMPLE, RESUME],
    f"{{run}}/{STEP}/optimizer.safetensors": [RESUME],
    "{data}/meta.json": [["train", "{config}", "--run", "{new}"], ["eval", "{scored}", "--dataset", "{data}"]],
    "{data}/tokenizer.json": [["train", "{config}", "--run", "{new}"], ["eval", "{scored}", "--dataset", "{data}"]],
    "{data}/train.bin": [["train", "{config}", "--run", "{new}"]],
    "{data}/val.bin": [["train", "{config}", "--run", "{new}"], ["eval", "{scored}", "--dataset", "{data}"]],
    **{f"{{hf}}/{name}": [["import-hf", "{hf}", "--out", "{new}"]] for name in (
        "config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json")},
}
LISTED = ("config.toml", "metrics.jsonl", "dataset.json", "evaluations.json")


@pytest.mark.slow
def test_what_stands_in_a_files_place_is_refused_by_every_command_that_reads_it(tmp_path, tiny_run, hf_gpt2):
    """A pipe, a link to /dev/zero or a folder in the place of each file a command reads from a run folder, a
    dataset folder or a Hugging Face folder: every command that reads it says so in one sentence naming the file,
    with status 2, and nothing else in the folders changes; `lmlab runs` lists that run as unreadable, with the
    sentence, beside the others (one process runs them all, bounded: a command that waited on a pipe or read a device
    without end would fail it)."""
    dataset = RunDir(tiny_run).config().data.dataset
    scored = shutil.copytree(tiny_run, tmp_path / "scored")  # what `eval --dataset` would write to, were it not refused
    commands, cases = [], []
    for n, ((path, readers), (said, make)) in enumerate(itertools.product(READERS.items(), NOT_FILES)):
        folders = {"run": tmp_path / f"{n}" / "bad", "data": tmp_path / f"{n}" / "data", "hf": tmp_path / f"{n}" / "hf"}
        for source, copy in ((tiny_run, folders["run"]), (tiny_run, tmp_path / f"{n}" / "good"),
                             (dataset, folders["data"]), (hf_gpt2, folders["hf"])):
            shutil.copytree(source, copy)
        names = {**folders, "config": write_config(tmp_path / f"{n}" / "tiny.toml", folders["data"]), "scored": scored,
                 "new": tmp_path / f"{n}" / "new"}
        damaged = Path(path.format(**names))
        if damaged.exists():
            damaged.unlink()
        make(damaged)
        before = digests(*folders.values())
        commands += [[part.format(**names) for part in command] for command in readers] + [["runs", tmp_path / f"{n}"]]
        cases.append((damaged, said, len(readers), before, folders))
    results = iter(in_one_process(commands, tmp_path, timeout=900))
    for damaged, said, count, before, folders in cases:
        for status, _, err in itertools.islice(results, count):
            lines = err.strip().splitlines()
            assert status == 2 and lines[-1] == f"error: {damaged} cannot be read ({said}); put the file that " \
                                                "belongs there in its place, then run the command again.", err
        status, listing, err = next(results)
        assert status == 0 and "good   finished" in " ".join(listing.split("│")), listing
        unreadable = f"note: bad is unreadable: {damaged} cannot be read ({said})"
        assert (unreadable in err) == (damaged.name in LISTED and damaged.parent.name == "bad"), err
        assert digests(*folders.values()) == before and not (folders["run"].parent / "new").exists()


@pytest.mark.slow
def test_a_run_file_that_cannot_be_read_is_named_never_taken_for_one_missing(tmp_path, tiny_run):
    """Checkpoints, a step folder or a run file its reader may not read (chmod 000): sampling the latest checkpoint
    and resuming name what cannot be read and say to check its permissions, never that the run has no checkpoint or
    to start it again (a resume from an older checkpoint would train over the newer one)."""
    hidden = ["checkpoints", STEP, "checkpoints/latest", f"{STEP}/state.json", f"{STEP}/model.safetensors",
              "metrics.jsonl", "config.toml"]
    runs = [Path(shutil.copytree(tiny_run, tmp_path / str(n))) for n in range(len(hidden))]
    for run, name in zip(runs, hidden):
        (run / name).chmod(0)
    try:
        results = in_one_process([[*command, run] for run in runs for command in (
            ["sample", "--max-new-tokens", "2", "--checkpoint", "latest"], ["train", "--set", "train.max_iters=20",
                                                                             "--resume"])],
                                 tmp_path, preexec_fn=drop_root_bypass)
    finally:
        for run, name in zip(runs, hidden):
            (run / name).chmod(0o755)
    for (status, _, err), name in zip(results, [name for name in hidden for _ in range(2)]):
        line = err.strip().splitlines()[-1]
        assert status == 2 and f"/{name}" in line and line.endswith(
            "cannot be read (Permission denied); check its permissions, then run the command again."), err
