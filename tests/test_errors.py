"""Bad input as a careless user types it: each refusal is one line starting with `error:`, status 2, no traceback and
nothing written, and it names the file or option and the way out (bad corpora and settings, text that is not Unicode,
names and extremes, prompts longer than the context, pointers that would leave their folder, a refusal under torchrun
said once). The numeric options' table of bad values is tests/test_bad_values.py."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmlab.commands import main
from lmlab.core.progress import clock
from lmlab.run.rundir import RunDir
from lmlab.writeup.report import build_report
from tests.helpers import besides_load_notes, copy_run, refused, write_config


def test_text_that_is_not_unicode_is_refused_naming_the_byte(capsys, tiny_run, imported_gpt2):
    # What Python makes of the command-line bytes ff fe: surrogate escapes, which no tokenizer can encode.
    for target in (tiny_run, imported_gpt2):
        refused(capsys, "sample", target, "--prompt", "\udcff\udcfeabc",
                needles=("--prompt is not valid text", "the byte 0xff, which is not UTF-8", "character 0"))


def test_a_char_run_blames_the_prompt_format_and_leads_somewhere(capsys, tmp_path, tiny_run):
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"instruction": "say love", "output": "love"}] * 10))
    for args in (["finetune", tiny_run, "--data", records, "--out", tmp_path / "tuned"],
                 ["sample", tiny_run, "--instruction", "say love"]):
        line = refused(capsys, *args, needles=("the alpaca prompt format uses characters", "never saw",
                                               "a run whose tokenizer has them"))
        assert "the text" not in line and "fine-tune it with" not in line
    assert not (tmp_path / "tuned").exists()


def test_names_and_extremes_are_one_sentence(capsys, tmp_path, tiny_run, corpus_dir):
    config = write_config(tmp_path / "tiny.toml", Path(RunDir(tiny_run).config().data.dataset))
    for name, needle in (("a" * 300, "is 300 bytes long"), ("new\nline", "control character"), ("", "is empty")):
        refused(capsys, "prepare", corpus_dir, "--tokenizer", "char", "--out-dir", tmp_path / "data", "--name", name,
                needles=(needle,))
    refused(capsys, "sweep", config, "--set", "train.max_iters=1,2", "--name", "", "--dir", tmp_path / "sweeps",
            needles=("--name '' is empty",))
    refused(capsys, "train", config, "--run", tmp_path / ("b" * 300), needles=("is 300 bytes long",))
    refused(capsys, "train", config, "--run", tmp_path / "x", "--set", "model.n_layer=" + "9" * 5000,
            needles=("--set model.n_layer", "too large a number"))
    refused(capsys, "train", config, "--run", tmp_path / "x", "--init-from", f"{tiny_run}:nonsense",
            needles=("'nonsense' is not a checkpoint", f"{tiny_run}:latest"))
    assert not any(p.name != "tiny.toml" for p in tmp_path.iterdir())
    assert clock(99999999999 * 3600) == "4,166,666,667 days"  # an ETA of any length
    with pytest.raises(SystemExit) as exit:
        main(["sample", str(tiny_run), "--seed", "9" * 5000])
    assert exit.value.code == 2 and len(capsys.readouterr().err) < 200


@pytest.mark.slow
def test_wording_names_the_way_out(capsys, tmp_path, tiny_run):
    moved = Path(shutil.copytree(tiny_run, tmp_path / "moved"))
    (moved / "config.toml").write_text((tiny_run / "config.toml").read_text().replace(
        RunDir(tiny_run).config().data.dataset, str(tmp_path / "gone")))
    refused(capsys, "eval", moved, needles=("which is not here", "pass --dataset DIR"))
    assert main(["eval", str(moved), "--dataset", RunDir(tiny_run).config().data.dataset]) == 0
    never = Path(shutil.copytree(tiny_run, tmp_path / "never"))
    (never / "checkpoints" / "best").unlink()  # as a run never evaluated during training has it
    (never / "evaluations.json").unlink(missing_ok=True)
    summary = build_report([never], tmp_path / "report", device="cpu").markdown.read_text()
    assert "its latest checkpoint (never evaluated, so no best)" in summary and "its best checkpoint" not in summary


def test_a_prompt_longer_than_the_context_can_hold_is_refused_before_it_is_tokenized(capsys, tmp_path, tiny_run):
    """The run's context is 32 tokens of one character each; a longer prompt was tokenized whole (a 21 MB line took
    3.6 GB): refused at once, and a grid's cell says why."""
    huge = "ROMEO: " * 20_000
    refused(capsys, "sample", tiny_run, "--prompt", huge, needles=("--prompt is 140,000 characters", "32 tokens",
                                                              "at most 32", "shorten it"))
    refused(capsys, "sample", tiny_run, "--chat", huge, needles=("the chat's rendered prompt is",))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{huge}\nROMEO:\n")
    assert main(["sample", str(tiny_run), "--prompts", str(prompts), "--max-new-tokens", "3", "--json", "--out",
                 str(tmp_path / "grid.json")]) == 0
    cells = json.loads((tmp_path / "grid.json").read_text())["cells"]
    assert cells[0]["why_not"].startswith("the prompt is 140,000 characters") and cells[1]["text"] is not None
    assert main(["sample", str(tiny_run), "--prompt", huge[:32], "--max-new-tokens", "2"]) == 0  # as long as fits


def test_an_instruction_longer_than_the_context_is_cut_before_it_is_tokenized(capsys, imported_gpt2):
    """Put in a prompt format, the end is what the model answers from: the left of it goes, unread."""
    assert main(["sample", str(imported_gpt2), "--instruction", "Say hi. " * 300_000, "--max-new-tokens", "2"]) == 0
    assert besides_load_notes(capsys.readouterr().err).startswith("generated ")  # its speed line alone


def test_names_with_a_space_are_refused_and_a_corpus_name_with_one_is_dashed(capsys, tmp_path, tiny_run, corpus_dir):
    config = write_config(tmp_path / "tiny.toml", Path(RunDir(tiny_run).config().data.dataset), max_iters=2)
    refused(capsys, "train", config, "--run", tmp_path / "with space", needles=("'with space'", "holds a space"))
    refused(capsys, "prepare", corpus_dir, "--tokenizer", "char", "--out-dir", tmp_path / "data", "--name", "my data",
            needles=("--name 'my data' holds a space",))
    spaced = Path(shutil.copytree(corpus_dir, tmp_path / "my corpus"))
    assert main(["prepare", str(spaced), "--tokenizer", "char", "--out-dir", str(tmp_path / "data")]) == 0
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["my-corpus-char"]
    assert not (tmp_path / "with space").exists()


def test_bad_corpora_are_one_sentence(capsys, tmp_path):
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    (tmp_path / "fake.jsonl.gz").write_bytes(os.urandom(500))
    whole = gzip.compress(b"".join(json.dumps({"text": f"document {i} " * 50}).encode() + b"\n" for i in range(200)))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    cases = [("ints.parquet", "holds int64, not text"), ("fake.jsonl.gz", "not a whole gzip file"),
             ("cut.jsonl.gz", "not a whole gzip file")]
    for name, needle in cases:
        refused(capsys, "prepare", tmp_path / name, "--tokenizer", "char", "--out-dir", tmp_path / "data",
                needles=(name, needle))
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("fraction", ["nan", "0", "1", "-0.1", "inf"])
def test_val_fraction_out_of_range_names_the_range(capsys, tmp_path, corpus_dir, fraction):
    refused(capsys, "prepare", corpus_dir, "--tokenizer", "char", "--out-dir", tmp_path, "--val-fraction", fraction,
            needles=("--val-fraction", "between 0 and 1"))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("setting, needle", [
    ("train.beta1=2.0", "train.beta1"), ("train.threads=-1", "train.threads"),
    ("train.warmup_iters=-5", "train.warmup_iters"), ("train.learning_rate=3e4", "train.learning_rate"),
    ("model.n_layer=99999999999999999999", "model.n_layer"), ("model.block_size=1000000000000", "needs"),
])
def test_settings_that_cannot_train_are_one_sentence(capsys, tmp_path, char_dataset, setting, needle):
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    refused(capsys, "train", config, "--run", tmp_path / "run", "--set", setting, needles=(needle,))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sampling_mistakes_append_nothing(capsys, tmp_path, trained):
    run = copy_run(trained, tmp_path)
    for option, value in (("--max-new-tokens", "-5"), ("--temperature", "-1"), ("--temperature", "nan"),
                          ("--top-k", "-3")):
        refused(capsys, "sample", run, option, value, needles=(option.removeprefix("--").replace("-", "_"),))
    assert not (run / "samples.txt").exists()


def test_unreadable_or_oversized_hugging_face_checkpoints_are_one_sentence(capsys, tmp_path, hf_gpt2):
    def variant(name: str, weights: bytes | None = None, **config) -> Path:
        folder = Path(shutil.copytree(hf_gpt2, tmp_path / name))
        if weights is not None:
            (folder / "model.safetensors").write_bytes(weights)
        raw = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**raw, **config}))
        return folder

    real = (hf_gpt2 / "model.safetensors").read_bytes()
    cases = [(variant("random", os.urandom(4096)), ("not a readable safetensors file",)),
             (variant("truncated", real[:len(real) // 3]), ("not a readable safetensors file",)),
             (variant("huge", n_positions=10**12), ("needs", "TiB", "make it smaller")),
             (variant("strings", n_layer="2"), ("n_layer is '2'",))]
    for folder, needles in cases:
        refused(capsys, "import-hf", folder, "--out", tmp_path / f"out-{folder.name}", needles=needles)
        assert not (tmp_path / f"out-{folder.name}").exists()


def test_names_and_pointers_cannot_leave_their_folder(capsys, tmp_path, corpus_dir, trained):
    out = tmp_path / "deep" / "data"
    for name in ("../../escape", str(tmp_path / "absolute"), ".hidden", ".."):
        refused(capsys, "prepare", corpus_dir, "--tokenizer", "char", "--name", name, "--out-dir", out,
                needles=("is not a plain name",))
    assert not (tmp_path / "escape-char").exists() and not (tmp_path / "absolute-char").exists()
    refused(capsys, "sweep", write_config(tmp_path / "c.toml", tmp_path), "--set", "train.learning_rate=1e-3,2e-3",
            "--name", "../outside", "--dir", tmp_path / "runs", needles=("is not a plain name",))
    other, run = copy_run(trained, tmp_path, "other"), copy_run(trained, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_000010")
    (run / "checkpoints" / "latest").write_text("../../other/checkpoints/step_000010")
    assert RunDir(run).checkpoint("latest") == run / "checkpoints" / "step_000020"  # its own newest, not other's
    assert RunDir(other).checkpoint("latest") == other / "checkpoints" / "step_000020"


@pytest.mark.slow
def test_a_refusal_under_torchrun_is_said_once_by_rank_0(tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    done = subprocess.run([torchrun, "--nproc_per_node=2", "-m", "--", "lmlab", "train", str(config), "--run",
                           str(tmp_path / "run"), "--device", "cpu", "--set", "train.grad_accum_steps=3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    said = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode != 0 and len(said) == 1, done.stderr
    assert said[0].startswith("error: train.grad_accum_steps (3) must be a multiple of the number of processes (2)")
    assert f"traceback : {said[0]}" in done.stderr  # torchrun's summary names it, not a link
    assert not (tmp_path / "run").exists()


def test_an_instruction_to_a_char_run_blames_the_prompt_format(capsys, trained):
    refused(capsys, "sample", trained, "--instruction", "Say love", needles=("alpaca prompt format", "--prompt"))
    refused(capsys, "sample", trained, "--instruction", "Zzz", needles=("the instruction contains", "'Zz'"))


DEEP = "[" * 100_000 + "]" * 100_000  # JSON that Python's parser, recursing once a level, cannot read
HUGE = "[" + "9" * 5_000 + "]"  # an integer of more digits than Python reads
NOT_UTF8 = "\udcff[]"  # written with surrogateescape: the byte 0xff


@pytest.mark.parametrize("bad", [DEEP, HUGE, NOT_UTF8])
@pytest.mark.parametrize("reader", ["finetune --data", "answer --data", "eval --task", "sample --prompts",
                                    "judge --answers", "prepare (a JSON-lines corpus)", "import-hf (config.json)"])
def test_a_users_json_file_nested_too_deep_or_with_a_huge_number_is_one_sentence_naming_it(capsys, tmp_path,
                                                                                            tiny_run, imported_gpt2,
                                                                                            reader, bad):
    """Every reader of a JSON or JSON-lines file a user gives parses it through one function (core/jsontext.py), so
    what Python's parser cannot read is the reader's own sentence naming the file, never a RecursionError; and so is
    a file that is not UTF-8."""
    name = {"eval --task": "task.jsonl", "sample --prompts": "prompts.json", "judge --answers": "answers.jsonl",
            "prepare (a JSON-lines corpus)": "corpus.jsonl", "import-hf (config.json)": "model/config.json"}
    path = tmp_path / name.get(reader, "records.json")
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(bad.encode("utf-8", "surrogateescape"))
    args = {"finetune --data": ["finetune", imported_gpt2, "--data", path, "--out", tmp_path / "tuned"],
            "answer --data": ["answer", imported_gpt2, "--data", path, "--out", tmp_path / "answers.out"],
            "eval --task": ["eval", tiny_run, "--task", path],
            "sample --prompts": ["sample", tiny_run, "--prompts", path, "--out", tmp_path / "grid.md"],
            "judge --answers": ["judge", "--answers", path, "--endpoint", "http://127.0.0.1:9/v1", "--model", "m",
                                "--out", tmp_path / "judged.jsonl"],
            "prepare (a JSON-lines corpus)": ["prepare", path, "--tokenizer", "char", "--out-dir", tmp_path / "data"],
            "import-hf (config.json)": ["import-hf", path.parent, "--out", tmp_path / "imported"]}[reader]
    refused(capsys, *args, needles=(str(path),))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.relative_to(tmp_path).parts[0]]  # nothing written
