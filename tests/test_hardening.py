"""Hardening, round two (issue 29), as a careless user would meet it: every size that multiplies memory refused
before it is allocated, stop signals that end a run within seconds, one integrity rule for every file a command
reads, a fine-tune that survives kill -9, destinations that cannot be written, readers that go away, names,
extremes. Real processes, files and pipes; the server's edge is tests/test_serve_edge.py.

Every refusal is one line starting with `error:`, status 2, and no traceback."""

from __future__ import annotations

import fcntl
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.memory_estimate import measured
from lmlab.commands import main
from lmlab.core.busy import cores
from lmlab.core.config import FinetuneConfig, ModelConfig
from lmlab.core.progress import clock
from lmlab.model.memory import MemoryRefused, check_fits, training_need
from lmlab.run.checkpoint import checkpoint_bytes
from lmlab.run.rundir import RunDir
from lmlab.train.finetune import finetune
from lmlab.writeup.report import build_report
from tests.helpers import (
    ALPACA_TINY,
    drop_root_bypass,
    free_port,
    refused,
    spawn,
    stable_events,
    wait_until,
    waits_for_lock,
    write_config,
)


# 1. One memory preflight for every size ------------------------------------------------------------------------

def test_every_size_that_multiplies_memory_is_refused_before_it_is_allocated(capsys, tmp_path, tiny_run, imported_gpt2):
    config = write_config(tmp_path / "tiny.toml", Path(RunDir(tiny_run).config().data.dataset))
    huge = "100000000"
    cases = [(["train", config, "--run", tmp_path / "new", "--set", f"train.batch_size={huge}"], "train.batch_size"),
             (["finetune", imported_gpt2, "--data", ALPACA_TINY, "--out", tmp_path / "tuned", "--set",
               f"finetune.batch_size={huge}"], "finetune.batch_size"),
             (["bench", config, "--batch-sizes", huge], "--batch-sizes"),
             (["sample", tiny_run, "--num-samples", huge], "--num-samples"),
             (["answer", imported_gpt2, "--data", ALPACA_TINY, "--out", tmp_path / "a.jsonl", "--batch-size", huge],
              "--batch-size"),
             (["serve", tiny_run, "--max-batch", huge, "--port", free_port(), "--no-compile"], "--max-batch")]
    for args, setting in cases:
        line = refused(capsys, *args, needles=(f"{setting} 100,000,000 needs about", "the largest that fits is"))
        largest = int(line.split("the largest that fits is ")[1].split(":")[0].replace(",", ""))
        assert 0 < largest < 10**8, line
    assert not (tmp_path / "new").exists() and not (tmp_path / "tuned").exists() and not (tmp_path / "a.jsonl").exists()
    refused(capsys, "train", config, "--run", tmp_path / "new", "--set", "model.n_embd=1000000000000", "--set",
            "model.n_head=1", needles=("more memory than can be counted",))


def test_the_largest_size_that_fits_fits_and_one_more_does_not():
    need = training_need(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=43))
    have = need.at(1000) + need.each // 2
    check_fits(need, 1000, "train.batch_size", "sequence", have=have)
    with pytest.raises(MemoryRefused) as refusal:
        check_fits(need, 1001, "train.batch_size", "sequence", have=have)
    assert refusal.value.largest == 1000


def test_the_training_estimate_is_near_the_peak_a_step_measures():
    """The estimate of a step's memory beside the peak RSS a real step reaches (weights already resident), for
    a shape whose activations dominate; benchmarks/memory_estimate.py measures more shapes."""
    shape = {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 128, "vocab_size": 65, "pos_emb": "rope",
             "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True, "bias": False}
    peak = measured(shape, 16, "float32", threads=1)
    need = training_need(ModelConfig(**shape))
    estimate = need.at(16) - need.fixed // 4  # the weights (a quarter of the fixed part) were in memory before
    assert 0.8 < estimate / peak < 1.5, (estimate, peak)


@pytest.mark.slow
def test_sigterm_during_a_long_step_ends_the_run_within_seconds(tmp_path, tiny_run):
    """A step of a million micro-batches takes far longer than the stop grace period on any machine: it is
    abandoned, nothing of it saved, the lock released, and the same command again starts over. The signal goes once
    the run's stop handler is in place (its loop has begun), whatever the speed of either process."""
    config = write_config(tmp_path / "tiny.toml", Path(RunDir(tiny_run).config().data.dataset))
    target = tmp_path / "long"
    proc = spawn("train", config, "--run", target, "--set", "train.grad_accum_steps=1000000", "--device", "cpu",
                 cwd=tmp_path)
    wait_until(lambda: RunDir(target).events() and _catches_sigterm(proc.pid), proc)  # in the first step
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)  # the step alone would take hours
    assert proc.returncode == 0, (out, err)
    said = " ".join(out.split())  # as printed, wrapped or not
    assert "stopped by SIGTERM during step 1, which was abandoned" in said and "run the same command again" in said
    assert not RunDir(target).step_folders() and not RunDir(target).running()
    assert RunDir(target).events()[-1]["stopped_by"] == "SIGTERM"


# 2 and 6. One integrity rule for every file a command reads ---------------------------------------------------

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


# 3. A fine-tune survives kill -9 and stop signals, and a partial one never looks finished ----------------------

def _records(tmp_path: Path) -> Path:
    """24 records: 22 train (6 steps an epoch at batch 4), 2 held out."""
    path = tmp_path / "records.json"
    path.write_text(json.dumps(json.loads(ALPACA_TINY.read_text())[:24]))
    return path


def _weights(tiny_run: Path) -> bytes:
    return (RunDir(tiny_run).checkpoint("latest") / "model.safetensors").read_bytes()


def _catches_sigterm(pid: int) -> bool:
    """Whether process `pid` has a SIGTERM handler installed (its SigCgt mask in /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    caught = int(next(line.split()[1] for line in status if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def stop_inside_the_loop(proc: subprocess.Popen, metrics: Path) -> None:
    """SIGTERM `proc` inside its training loop, whatever the speed of either process: holding the lock its events
    are appended under (the run's metrics.jsonl, once its start event made it), wait until `proc` waits for that lock;
    if its stop handler is in place by then, signal it and let it go (it stops after the step whose event it was
    writing); if not, it is still starting: let that event through and hold the next."""
    wait_until(metrics.exists, proc)
    while True:
        with open(metrics, "ab") as held:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            wait_until(lambda: waits_for_lock(proc.pid, metrics), proc, timeout=60)
            if _catches_sigterm(proc.pid):
                proc.send_signal(signal.SIGTERM)
                return
            size = metrics.stat().st_size
        wait_until(lambda: metrics.stat().st_size > size, proc)


@pytest.mark.slow
def test_a_fine_tune_killed_or_stopped_at_any_point_then_run_again_ends_bitwise_equal(capsys, tmp_path,
                                                                                      imported_gpt2):
    data = _records(tmp_path)
    # On every core, fixed: a step's last bits depend on the count, which a load that comes or goes would change.
    settings = ["--set", "finetune.epochs=2", "--set", "finetune.batch_size=4", "--set",
                "finetune.checkpoint_interval=2", "--set", "finetune.learning_rate=0.003", "--set",
                f"finetune.threads={len(cores())}"]

    def command(name: str) -> list[str]:
        return ["finetune", str(imported_gpt2), "--data", str(data), "--out", str(tmp_path / name), "--device", "cpu",
                *settings]

    whole = tmp_path / "whole"
    ft = FinetuneConfig(str(data), epochs=2, batch_size=4, checkpoint_interval=2, learning_rate=0.003,
                        threads=len(cores()))
    # What an earlier command in this process may have left (a sample on a small model chooses one thread): the
    # fine-tune here must still equal those of its child processes.
    torch.set_num_threads(1)
    finetune(imported_gpt2, whole, ft, "cpu")
    killed = tmp_path / "killed"
    proc = spawn(*command("killed"), cwd=tmp_path)
    wait_until(lambda: (killed / "checkpoints" / "step_000004").exists(), proc)
    proc.kill()  # mid-epoch, wherever it stands
    proc.wait()
    assert main(["sample", str(killed), "--instruction", "Say hi", "--max-new-tokens", "3"]) == 0
    note = capsys.readouterr().err
    assert "is an unfinished fine-tune" in note and f"finish it with: lmlab finetune {imported_gpt2}" in note
    refused(capsys, "train", "--resume", killed, needles=("was made by `lmlab finetune`", "--out", "--data"))
    refused(capsys, *command("killed")[:-2], "--set", "finetune.learning_rate=0.001",
            needles=("unfinished fine-tune made by another command", "finetune.learning_rate 0.003 -> 0.001"))
    assert main(command("killed")) == 0 and "Resumed" in " ".join(capsys.readouterr().out.split())
    # A stop signal during the first epoch, to a child process held where it cannot go on without the test: then the
    # same command again.
    stopped = tmp_path / "stopped"
    proc = spawn(*command("stopped"), cwd=tmp_path)
    stop_inside_the_loop(proc, stopped / "metrics.jsonl")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by SIGTERM" in " ".join(out.split()), (out, err)
    assert RunDir(stopped).unfinished()
    assert main(command("stopped")) == 0
    for other in (killed, stopped):
        assert _weights(other) == _weights(whole) and RunDir(other).unfinished() is None
    assert stable_events(killed) == stable_events(whole)
    # The stop's own checkpoint is in the record (it was written); where the stop fell between the interval's
    # checkpoints it is one more than the uninterrupted run has, and nothing else differs.
    stop_step = next(e["step"] for e in RunDir(stopped).events() if e["event"] == "resume")
    stops = {"event": "checkpoint", "step": stop_step, "best": False}
    assert [e for e in stable_events(stopped) if e != stops or stops in stable_events(whole)] == stable_events(whole)


# 7 and 13. Destinations that cannot be written, readers that go away ------------------------------------------


DRIVER = """
import json, sys
from lmlab.commands import main
results = []
for args in json.loads(sys.argv[1]):
    sys.stderr.write("<<<\\n")
    results.append(main(args))
sys.stderr.write("<<<\\n" + json.dumps(results))
"""


def _run_all(commands: list[list[str]], cwd: Path) -> list[tuple[int, str]]:
    """Each command through main() in one real process with permission bits enforced: (status, stderr)."""
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([[str(a) for a in c] for c in commands])],
                          cwd=cwd, capture_output=True, text=True, preexec_fn=drop_root_bypass, timeout=300)
    assert done.returncode == 0, done.stderr
    *said, results = done.stderr.split("<<<\n")[1:]
    return list(zip(json.loads(results), said))


@pytest.mark.slow
def test_a_destination_that_cannot_be_written_is_one_sentence(tmp_path, tiny_run, imported_gpt2, hf_gpt2, corpus_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    shared = Path(shutil.copytree(tiny_run, locked / "shared"))
    locked.chmod(0o555)
    for folder in [shared, *shared.rglob("*")]:
        folder.chmod(0o555 if folder.is_dir() else 0o444)
    probe = subprocess.run(["touch", locked / "probe"], preexec_fn=drop_root_bypass, capture_output=True)
    assert probe.returncode != 0, "the folder is writable: the test would prove nothing"
    config = write_config(tmp_path / "tiny.toml", Path(RunDir(tiny_run).config().data.dataset))
    try:
        results = _run_all([["train", config, "--run", locked / "run"],
                            ["train", "--resume", shared, "--set", "train.max_iters=20"],
                            ["finetune", imported_gpt2, "--data", ALPACA_TINY, "--out", locked / "tuned"],
                            ["prepare", corpus_dir, "--tokenizer", "char", "--out-dir", locked / "data"],
                            ["import-hf", hf_gpt2, "--out", locked / "imported"],
                            ["export-hf", tiny_run, locked / "exported"],
                            ["report", tiny_run, "--out", locked / "report"],
                            ["answer", imported_gpt2, "--data", ALPACA_TINY, "--out", locked / "a.jsonl"],
                            ["sample", shared, "--max-new-tokens", "5"],
                            ["eval", shared, "--json"]], tmp_path)
    finally:
        for folder in [locked, *locked.rglob("*")]:
            folder.chmod(0o755)
    for status, err in results[:-2]:
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
        assert "(Permission denied)" in lines[0] and "make it writable for you or choose another folder" in lines[0]
        assert "free some space" not in lines[0]
    for status, err in results[-2:]:  # the sample was printed, the evaluation too: only not kept in the run
        assert status == 0 and "not kept in the run" in err and "(Permission denied)" in err, err
    assert sorted(p.name for p in locked.iterdir()) == ["shared"]


READ_ONLY_MOUNT = """mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" && shift 2 && exec "$@" """


@pytest.mark.slow
def test_a_read_only_file_system_is_named_as_one(tmp_path, tiny_run):
    """A real read-only mount (a bind mount remounted ro, in a mount namespace of its own): writes fail with EROFS,
    which is said as such, never as a full disk."""
    if subprocess.run(["unshare", "-m", "-r", "true"], capture_output=True).returncode:
        pytest.skip("this machine allows no mount namespaces (unshare -m -r), so no read-only mount can be made")
    source, mounted = Path(shutil.copytree(tiny_run, tmp_path / "source" / "run")).parent, tmp_path / "mounted"
    mounted.mkdir()
    config = write_config(tmp_path / "tiny.toml", Path(RunDir(tiny_run).config().data.dataset))
    commands = [["train", config, "--run", mounted / "new"], ["train", "--resume", mounted / "run", "--set",
                                                              "train.max_iters=20"],
                ["sample", mounted / "run", "--max-new-tokens", "5"], ["eval", mounted / "run", "--json"]]
    done = subprocess.run(["unshare", "-m", "-r", "sh", "-c", READ_ONLY_MOUNT, "sh", source, mounted, sys.executable,
                           "-c", DRIVER, json.dumps([[str(a) for a in c] for c in commands])], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    *said, statuses = done.stderr.split("<<<\n")[1:]
    for status, err in zip(json.loads(statuses), said):
        assert "read-only file system" in err and "free some space" not in err and "Traceback" not in err, err
        assert status == (2 if "not kept in the run" not in err else 0), err
    assert json.loads(statuses) == [2, 2, 0, 0]
    assert sorted(p.name for p in source.iterdir()) == ["run"] and not list(mounted.iterdir())


def test_a_file_where_a_folder_should_be_is_named(capsys, tmp_path, tiny_run, imported_gpt2, hf_gpt2, corpus_dir):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    config = write_config(tmp_path / "tiny.toml", Path(RunDir(tiny_run).config().data.dataset))
    for args in (["export-hf", tiny_run, blocker / "sub"], ["report", tiny_run, "--out", blocker / "sub"],
                 ["import-hf", hf_gpt2, "--out", blocker / "sub"], ["train", config, "--run", blocker / "sub"],
                 ["prepare", corpus_dir, "--tokenizer", "char", "--out-dir", blocker],
                 ["answer", imported_gpt2, "--data", ALPACA_TINY, "--out", blocker / "a.jsonl"]):
        refused(capsys, *args, needles=(f"{blocker} is a file, not a folder: choose another path",))
    assert blocker.read_text() == "not a folder"


PIPED = """
import json, os, sys
from lmlab.commands import main
results = []
from lmlab.commands.common import console
for args in json.loads(sys.argv[1]):
    console.quiet = False  # one command per process in real life: the console went quiet at the last one's pipe
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte, as `| head -c 0`
    os.dup2(write, 1)
    os.close(write)
    results.append(main(args))
sys.stderr.write(json.dumps(results))
"""


@pytest.mark.slow
def test_a_reader_that_goes_away_ends_every_command_quietly(tmp_path, tiny_run):
    commands = [["sample", tiny_run, "--max-new-tokens", "200"], ["sample", tiny_run, "--num-samples", "2"],
                ["eval", tiny_run, "--json"], ["eval", tiny_run], ["runs", tiny_run.parent], ["compare", tiny_run, tiny_run, "--json"],
                ["data", "stats", RunDir(tiny_run).config().data.dataset]]
    done = subprocess.run([sys.executable, "-c", PIPED, json.dumps([[str(a) for a in c] for c in commands])],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr and "Exception" not in done.stderr, done.stderr
    assert json.loads(done.stderr.rsplit("\n", 1)[-1]) == [141] * len(commands)  # after eval's progress lines


# 5, 9, 10, 12, 14, 15, 16. One sentence for each, whatever the input -------------------------------------------

def test_text_that_is_not_unicode_is_refused_naming_the_byte(capsys, tiny_run, imported_gpt2):
    # What Python makes of the command-line bytes ff fe: surrogate escapes, which no tokenizer can encode.
    for target in (tiny_run, imported_gpt2):
        refused(capsys, "sample", target, "--prompt", "\udcff\udcfeabc",
                needles=("--prompt is not valid text", "the byte 0xff, which is not UTF-8", "character 0"))


def test_a_char_run_blames_the_prompt_format_and_leads_somewhere(capsys, tmp_path, tiny_run):
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"instruction": "say love", "output": "love"}] * 10))
    for args in (["finetune", tiny_run, "--data", records, "--out", tmp_path / "tuned"], ["sample", tiny_run, "--instruction",
                                                                                     "say love"]):
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


def test_a_prepare_cleans_up_what_a_killed_one_left(tmp_path, corpus_dir):
    data = tmp_path / "data"
    leftover = data / f".{corpus_dir.name}-char.old-99999999"
    (leftover / "train.bin").parent.mkdir(parents=True)
    (leftover / "train.bin").write_bytes(b"\0" * 1000)  # what a prepare --force killed in its clean-up leaves
    assert main(["prepare", str(corpus_dir), "--tokenizer", "char", "--out-dir", str(data)]) == 0
    assert not leftover.exists() and (data / f"{corpus_dir.name}-char" / "meta.json").exists()


def test_a_checkpoints_disk_margin_is_its_own_size_not_a_fixed_16_mib(tiny_run):
    folder = RunDir(tiny_run).checkpoint("latest")
    from safetensors.torch import load_file

    tensors = [*load_file(folder / "model.safetensors").values(), *load_file(folder / "optimizer.safetensors").values()]
    state = json.loads((folder / "state.json").read_text())
    state.pop("files")
    need = checkpoint_bytes(tensors, state)
    on_disk = sum(p.stat().st_blocks * 512 for p in folder.iterdir())
    assert on_disk <= need < on_disk + 64 * 1024
