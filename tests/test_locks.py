"""One writer per run and per dataset: a second writer is refused and the first is unharmed, a killed writer leaves no
lock behind (nor does a forked child of a dead parent keep one), and a killed prepare resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from lmlab.core.locks import WriterLock
from lmlab.run.rundir import RunDir
from tests.helpers import (
    ALPACA_TINY,
    copy_run,
    lmlab,
    refused_process,
    spawn,
    wait_until,
    write_config,
    write_corpus,
    writer_pid,
)


@pytest.mark.slow
def test_a_second_writer_of_a_run_is_refused_and_the_first_is_unharmed(tmp_path, char_dataset, hf_gpt2):
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=10**9)  # still training when stopped
    run = tmp_path / "run"
    first = spawn("train", config, "--run", run, "--device", "cpu", cwd=tmp_path)
    try:
        wait_until(lambda: (run / "checkpoints" / "step_000010").exists(), first)
        first.send_signal(signal.SIGSTOP)  # still the run's writer, without training on a core the others need
        assert writer_pid(run) == first.pid and RunDir(run).running()
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
        first.send_signal(signal.SIGCONT)
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
    wait_until(lambda: writer_pid(run) == writer.pid, writer)
    writer.kill()  # SIGKILL: no handler runs, the lock file stays, the kernel drops the lock
    writer.wait()
    assert (tmp_path / ".run.lock").exists() and not RunDir(run).running()
    out = lmlab("train", "--resume", run, "--set", "train.max_iters=30", "--device", "cpu", cwd=tmp_path).stdout
    assert "Resumed" in out and RunDir(run).events()[-1]["step"] == 30


FORK_AND_DIE = """
import os, sys, time
from pathlib import Path
from lmlab.core.locks import WriterLock
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
    corpus = write_corpus(tmp_path / "corpus", n_docs=40, speeches=2000)  # ~5 MB: seconds of work
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


@pytest.mark.slow
def test_a_run_only_read_until_the_interpreter_exits_says_nothing_there(trained):
    """A script's Run, its model loaded, is collected as the interpreter tears its modules down: its lock, never
    taken, printed "Exception ignored in WriterLock.__del__" on stderr after every such script."""
    script = "import sys\nimport lmlab\nrun = lmlab.Run(sys.argv[1])\nprint(type(run.model()).__name__)\n"
    done = subprocess.run([sys.executable, "-c", script, str(trained)], capture_output=True, text=True, check=True)
    assert done.stdout == "GPT\n" and done.stderr == ""
