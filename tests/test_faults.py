"""Fault injection, as a careless user and a hostile client would (issue 18): real processes, real files, real
limits. One test (or a few) per item of the issue but the server's (1, 2 and 9), which are issue 15's.

Every refusal is one line starting with `error:`, status 2, and no traceback."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
from tokenizers import Regex, pre_tokenizers

from lmlab.commands import main
from lmlab.core.config import load_config
from lmlab.core.fileio import WriterLock
from lmlab.data.prepare import prepare
from lmlab.data.tokenizers import GPT2_PATTERN, chunk_spans
from lmlab.run.checkpoint import load_state
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from tests.helpers import (
    ALPACA_TINY,
    LMLAB,
    lmlab,
    refused,
    refused_process,
    spawn,
    stable_events,
    wait_until,
    write_config,
    write_corpus,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, char_dataset) -> Path:
    """A tiny char run trained 20 steps (checkpoints at 10 and 20); tests that change it work on a copy."""
    root = tmp_path_factory.mktemp("trained")
    cfg = load_config(write_config(root / "tiny.toml", char_dataset, max_iters=20))
    return Trainer(cfg, root / "run", "cpu").run().run_dir


def copy_run(run: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(run, tmp_path / name))


# 3. Memory: a document of any length reaches the tokenizer in chunks -------------------------------------------

CL100K = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|"""
          r"""\s+(?!\S)|\s+""")
O200K = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+""",
])


def messy_text(n_pieces: int, seed: int = 0) -> str:
    """Words, numbers, punctuation, contractions, runs of spaces, tabs and line breaks, accents, CJK, emoji."""
    rng = random.Random(seed)
    words = ["the", "Thou", "it's", "WE'LL", "café", "naïve", "12", "3.14", "1999,", "(see", "this)", "—", "...",
             "中文", "句子。", "🙂", "a/b", "x_y", "HTTPServer", "don't"]
    gaps = [" ", " ", " ", "  ", "\t", "\n", "\n\n", " \n", ".\n", "!\n\n", "\r\n", "   \n "]
    return "".join(rng.choice(words) + rng.choice(gaps) for _ in range(n_pieces))


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, CL100K, O200K], ids=["gpt2", "cl100k", "o200k"])
def test_chunks_are_cut_where_every_pre_tokenizer_cuts_anyway(pattern):
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    text = messy_text(20_000)
    whole = [piece for piece, _ in split.pre_tokenize_str(text)]
    spans = list(chunk_spans(text, 0, len(text), "bpe", size=500))
    assert len(spans) > 100 and all(b - a <= 500 for a, b in spans)
    assert [piece for a, b in spans for piece, _ in split.pre_tokenize_str(text[a:b])] == whole


@pytest.mark.parametrize("spec", ["char", "word:300", "bpe:400"])
def test_a_long_document_gets_the_ids_it_would_get_whole(tmp_path, spec):
    source = tmp_path / "one.txt"
    source.write_text(messy_text(60_000, seed=1), encoding="utf-8")  # ~350k characters: chunks of 65,536
    text = source.read_text(encoding="utf-8")  # as prepare reads it (\r\n as \n)
    target, meta, _ = prepare([str(source)], spec, out_dir=tmp_path / "data")
    tok = tokenizers.Tokenizer.from_file(str(target / "tokenizer.json"))
    ids = np.concatenate([np.fromfile(target / f"{split}.bin", dtype=meta["dtype"]) for split in ("train", "val")])
    cut = meta["split"]["cut_at_char"]
    parts = [text[:cut], text[cut:]]
    if spec == "char":
        expected = [i for part in parts for i in tok.encode(part.rstrip("\n") + "\n\n").ids]
    else:
        expected = [i for part in parts for i in [*tok.encode(part).ids, meta["eot_id"]]]
    assert ids.tolist() == expected


def _peak_rss_mib(*args: str) -> float:
    """The high-water RSS of the largest process of `lmlab ARGS` (the command or one of its workers)."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", probe, LMLAB, *args], capture_output=True, text=True, check=True)
    return int(done.stdout) / 1024


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["char", "bpe:300"])
def test_prepare_holds_a_50_mb_one_line_document_in_bounded_memory(tmp_path, spec):
    """The bound: 512 MiB for a 50 MB document, about 10× its text, shards of 100M tokens included (measured on 2
    cores: ~250 MiB char, ~180 MiB bpe). Before chunking, char took 350× the document: 17.1 GB here."""
    words = "love night day sweet death fair heaven soul heart light dark moon sun star".split()
    rng = random.Random(0)
    line = " ".join(rng.choice(words) for _ in range(10_000_000))[:50_000_000]
    source = tmp_path / "one-line.txt"
    source.write_text(line, encoding="utf-8")  # no line break at all (item 6 too)
    peak = _peak_rss_mib("prepare", str(source), "--tokenizer", spec, "--out-dir", str(tmp_path / "data"))
    assert peak < 512, f"peak RSS {peak:.0f} MiB"
    meta = json.loads((tmp_path / "data" / f"one-line-{spec.replace(':', '')}" / "meta.json").read_text())
    assert meta["train"]["characters"] + meta["val"]["characters"] >= 50_000_000


# 4. One writer per run and per dataset --------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_writer_of_a_run_is_refused_and_the_first_is_unharmed(tmp_path, char_dataset, hf_gpt2):
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=10**9)  # still training when stopped
    run = tmp_path / "run"
    first = spawn("train", config, "--run", run, "--device", "cpu", cwd=tmp_path)
    try:
        wait_until(lambda: (run / "checkpoints" / "step_000010").exists(), first)
        assert RunDir(run).writer_pid() == first.pid and RunDir(run).running()
        for args in (["train", config, "--run", run, "--set", "train.learning_rate=2e-3"],
                     ["train", "--resume", run],
                     ["finetune", run, "--data", ALPACA_TINY, "--out", run],
                     ["import-hf", hf_gpt2, "--out", run]):
            refused_process(lmlab(*args, cwd=tmp_path, ok=False), f"{run} is being written by another process",
                            f"pid {first.pid}")
        sampled = lmlab("sample", run, "--checkpoint", "latest", "--max-new-tokens", "20", cwd=tmp_path)
        assert sampled.stdout.strip() and "--- checkpoint latest" in (run / "samples.txt").read_text()
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    logged = RunDir(run).events()
    assert [e["event"] for e in logged].count("start") == 1 and logged[-1]["stopped_by"] == "SIGTERM"
    assert RunDir(run).config().train.learning_rate == 3e-3  # the first writer's config, untouched
    assert not RunDir(run).running() and not (tmp_path / ".run.lock").exists()


@pytest.mark.slow
def test_a_killed_writer_leaves_no_lock_behind(tmp_path, trained):
    run = copy_run(trained, tmp_path)
    writer = spawn("train", "--resume", run, "--set", "train.max_iters=100000", "--device", "cpu", cwd=tmp_path)
    wait_until(lambda: RunDir(run).writer_pid() == writer.pid, writer)
    writer.kill()  # SIGKILL: no handler runs, the lock file stays, the kernel drops the lock
    writer.wait()
    assert (tmp_path / ".run.lock").exists() and not RunDir(run).running()
    out = lmlab("train", "--resume", run, "--set", "train.max_iters=30", "--device", "cpu", cwd=tmp_path).stdout
    assert "Resumed" in out and RunDir(run).events()[-1]["step"] == 30


FORK_AND_DIE = """
import os, sys, time
from pathlib import Path
from lmlab.core.fileio import WriterLock
lock = WriterLock(Path(sys.argv[1]))
lock.acquire("held")
child = os.fork()
if child == 0:
    for fd in (1, 2):  # lets the caller's pipe close
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
os._exit(0)  # as after SIGKILL: no release, the child lives on
"""


def test_a_forked_child_does_not_keep_its_dead_parents_lock(tmp_path):
    """prepare's tokenizer workers are forked: a prepare killed with SIGKILL must not leave them holding its lock."""
    done = subprocess.run([sys.executable, "-c", FORK_AND_DIE, str(tmp_path / "data")], capture_output=True,
                          text=True, check=True)
    child = int(done.stdout)
    try:
        os.kill(child, 0)  # still alive
        assert not WriterLock(tmp_path / "data").held()
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.slow
def test_a_second_prepare_of_a_dataset_is_refused_and_a_killed_one_resumes(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=40, speeches=4000)  # ~10 MB: seconds of work
    data = tmp_path / "data"

    def command(name: str) -> tuple[str, ...]:
        return ("prepare", corpus, "--tokenizer", "char", "--name", name, "--workers", "1", "--shard-tokens", "100000")

    first = spawn(*command("plays"), cwd=tmp_path)
    wait_until(lambda: WriterLock(data / "plays-char").held(), first)
    refused_process(lmlab(*command("plays"), cwd=tmp_path, ok=False), "plays-char is being prepared by another "
                    f"process (pid {first.pid}")
    assert first.wait(timeout=300) == 0 and not (data / ".plays-char.lock").exists()
    killed = spawn(*command("again"), cwd=tmp_path)
    wait_until(lambda: (data / ".again-char.partial" / "progress.json").exists(), killed)
    killed.kill()  # its lock goes with it
    killed.wait()
    assert "written" in lmlab(*command("again"), cwd=tmp_path).stdout
    metas = [json.loads((data / name / "meta.json").read_text()) for name in ("plays-char", "again-char")]
    assert [(m["train"]["sha256"], m["val"]["sha256"]) for m in metas][0] == \
        [(m["train"]["sha256"], m["val"]["sha256"]) for m in metas][1]


# 5. Data files are checked against meta.json ------------------------------------------------------------------

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
             "dtype": (edit_meta(dtype="uint32"), "dtype 'uint32'"), "vocab": (edit_meta(vocab_size=20), "vocab_size 20")}
    for name, (change, needle) in cases.items():
        config = broken(name, change)
        refused(capsys, "train", config, "--run", tmp_path / f"run-{name}", needles=(needle, "--force"))
        assert not (tmp_path / f"run-{name}").exists()  # refused before the run folder is made


def test_resume_compares_the_checksum_of_the_bytes_it_reads(capsys, tmp_path, char_dataset):
    """A dataset prepared again from other inputs (meta.json describes the new bytes) is another dataset: resume
    needs --force for it. Bytes edited in place (meta.json no longer describes them) are refused by every command,
    --force or not (tests/test_hardening.py)."""
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


# 6. The char tokenizer's separator is lmlab's own -------------------------------------------------------------

def test_a_char_corpus_without_a_line_break_prepares(tmp_path):
    (tmp_path / "one.txt").write_text("to be or not to be, that is the question " * 200)
    target, meta, _ = prepare([str(tmp_path / "one.txt")], "char", out_dir=tmp_path / "data")
    assert "\n" in json.loads((target / "tokenizer.json").read_text())["model"]["vocab"]
    assert meta["train"]["tokens"] + meta["val"]["tokens"] == 200 * 41 + 4  # and a "\n\n" after each part


# 7. A write that fails ends the run like a stop signal --------------------------------------------------------

def test_a_failed_write_keeps_the_newest_checkpoint_and_says_how_to_resume(tmp_path, trained):
    """A file size limit (RLIMIT_FSIZE) fails writes the way a full disk does: loss.png (~50 kB) cannot be written
    at step 30, while metrics.jsonl and the run's small files can."""
    run = copy_run(trained, tmp_path)
    whole = copy_run(trained, tmp_path, "whole")
    more = ["--set", "train.max_iters=40", "--set", "train.threads=1"]  # bitwise: the same threads in each process
    assert main(["train", "--resume", str(whole), *more]) == 0

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    done = subprocess.run([LMLAB, "train", "--resume", str(run), *more], capture_output=True, text=True,
                          preexec_fn=small_files)
    # Agreed like a stop signal caught during step 30's eval: the run ends after the next step, writing nothing more.
    refused_process(done, "stopped at step 31", "loss.png could not be written", "File too large",
                    "newest checkpoint (step_000020) is kept", f"lmlab train --resume {run}")
    leftovers = [p.name for p in [*run.iterdir(), *(run / "checkpoints").iterdir()] if p.name.startswith(".")]
    assert not leftovers and load_state(RunDir(run).checkpoint("latest"))["step"] == 20
    assert main(["train", "--resume", str(run), *more]) == 0
    assert stable_events(run) == stable_events(whole)  # resumed exactly, as after a stop signal


def test_after_a_failed_checkpoint_log_and_runs_hold_the_best_the_run_kept(tmp_path, trained, capsys):
    """Before: `log` marked step 30 a new best, and `runs` gave its val loss, though its checkpoint was never written
    (the file size limit fails it): the best the run holds, and resumes from, is step 20's."""
    run = copy_run(trained, tmp_path)

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))  # loss.png fits, a checkpoint does not

    done = subprocess.run([LMLAB, "train", "--resume", str(run), "--set", "train.max_iters=40"], capture_output=True,
                          text=True, preexec_fn=small_files)
    refused_process(done, "step_000030 could not be written", "newest checkpoint (step_000020) is kept")
    capsys.readouterr()
    assert main(["log", str(run), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["evaluations"]
    assert [r["step"] for r in rows] == [10, 20, 30] and rows[2]["val_loss"] < rows[1]["best_val_loss"]
    assert not rows[2]["is_best"] and rows[2]["best_val_loss"] == rows[1]["best_val_loss"]
    assert main(["runs", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"][0]["best_val_loss"] == rows[1]["best_val_loss"]
    assert RunDir(run).checkpoint("best").name == "step_000020"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full: a file every write to fails")
def test_a_lock_file_that_cannot_be_written_is_named(tmp_path, trained, capsys):
    """Before: `error: a file: ...`: the lock's holder line, the first write of every writer, was the one write
    outside the reporting of failed writes. /dev/full fails every write, as a full disk does."""
    run = copy_run(trained, tmp_path)
    (tmp_path / ".run.lock").symlink_to("/dev/full")
    refused(capsys, "train", "--resume", run, needles=(f"could not write {tmp_path / '.run.lock'} (",))
    assert load_state(RunDir(run).checkpoint("latest"))["step"] == 20  # nothing was trained, nothing lost


def test_a_prepare_or_an_export_that_cannot_write_names_the_file(tmp_path, imported_gpt2):
    """The same file size limit: prepare's shards (~150 kB) and export's model.safetensors are refused by it."""
    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    corpus = write_corpus(tmp_path / "corpus", n_docs=4, speeches=300)
    commands = {tmp_path / "data": ["prepare", corpus, "--tokenizer", "char", "--out-dir", tmp_path / "data"],
                tmp_path / "out": ["export-hf", imported_gpt2, tmp_path / "out"]}
    for folder, args in commands.items():
        done = subprocess.run([LMLAB, *map(str, args)], capture_output=True, text=True, preexec_fn=small_files)
        refused_process(done, f"could not write {folder}", "File too large", "free on its disk")
    assert not (tmp_path / "out").exists() and not (tmp_path / "data" / "corpus-char").exists()

    def no_files() -> None:  # nothing of 10 bytes or more: the first file prepare writes, its tokenizer.json, fails
        resource.setrlimit(resource.RLIMIT_FSIZE, (10, 10))

    done = subprocess.run([LMLAB, "prepare", str(corpus), "--tokenizer", "char", "--out-dir", str(tmp_path / "data")],
                          capture_output=True, text=True, preexec_fn=no_files)  # before: Exception, a traceback
    refused_process(done, "tokenizer.json (File too large", "free on its disk")


# 8 and 10. Plain mistakes: one sentence, status 2, nothing written --------------------------------------------

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


# 11. Dead ends lead somewhere ---------------------------------------------------------------------------------

def test_a_run_without_pointers_resumes_and_samples_from_its_step_folders(capsys, tmp_path, trained):
    run = copy_run(trained, tmp_path)
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "best").write_bytes(b"\xff\xfe\x00 not utf-8")  # damaged: as good as missing
    assert main(["sample", str(run), "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert "no best checkpoint" in err and "using latest (step 20)" in err
    assert "--- checkpoint latest (step 20)" in (run / "samples.txt").read_text()
    refused(capsys, "train", write_config(tmp_path / "c.toml", Path(RunDir(run).config().data.dataset)), "--run",
            run, needles=("already has checkpoints", "--resume"))
    assert main(["train", "--resume", str(run), "--set", "train.max_iters=30"]) == 0
    assert "Resumed" in capsys.readouterr().out and RunDir(run).checkpoint("latest").name == "step_000030"


# 12. Names are names; pointers stay inside their run -----------------------------------------------------------

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


# 13. Under torchrun a refusal is said once --------------------------------------------------------------------

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


# 14. sample streams; an instruction is not blamed for the template ---------------------------------------------

def test_sample_prints_tokens_as_they_are_generated(tmp_path, trained):
    run = copy_run(trained, tmp_path)
    proc = spawn("sample", run, "--max-new-tokens", "1000000", "--prompt", "ROMEO:", cwd=tmp_path)
    try:
        seen, deadline = "", time.monotonic() + 120
        while len(seen) < len("ROMEO:") + 20:  # a million tokens take far longer than this loop may wait
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"nothing printed yet: {seen!r}"
            seen += os.read(proc.stdout.fileno(), 100).decode()
        assert seen.startswith("ROMEO:") and proc.poll() is None
    finally:
        proc.kill()
        proc.communicate()
    assert not (run / "samples.txt").exists()  # interrupted: no half sample recorded


def test_an_instruction_to_a_char_run_blames_the_prompt_format(capsys, trained):
    refused(capsys, "sample", trained, "--instruction", "Say love", needles=("alpaca prompt format", "--prompt"))
    refused(capsys, "sample", trained, "--instruction", "Zzz", needles=("the instruction contains", "'Zz'"))
