"""Stop and resume: a stop signal ends a run within seconds and a kill -9 at any point resumes bitwise (fine-tunes too);
a resume never swaps a run's tokenizer and says how to find a moved dataset; a run without pointers resumes from its
step folders. A run resumed with another length says what happens to its schedule and goes on from the LR it had,
decaying to min_lr at the new end; the checkpoint it resumed from, and the best, outlive retention, and a resume that
will delete step folders names them."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from lmlab.commands import main
from lmlab.core import cache, peak
from lmlab.core.busy import cores
from lmlab.core.config import FinetuneConfig, TrainConfig
from lmlab.core.config_toml import load_config, toml_value
from lmlab.core.errors import UserError
from lmlab.core.peak import peak_key
from lmlab.run.rundir import RunDir
from lmlab.train.finetune import finetune
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from lmlab.train.schedule import lr_at, lr_at_position, position_of
from tests.helpers import (
    ALPACA_TINY,
    LMLAB,
    copy_run,
    cpu_ticks,
    digests,
    events_of,
    fake_cpu,
    refused,
    run_cli,
    same_weights,
    spawn,
    stable_events,
    wait_until,
    waits_for_lock,
    write_config,
)

MIN_LR = 3e-4  # tests/helpers.py's tiny config


def lrs(run) -> dict[int, float]:
    """The LR of each logged step (a line's last step)."""
    return {e["step"]: e["lr"] for e in RunDir(run).events() if e["event"] == "train"}


def said(capsys) -> str:
    return said_in(capsys.readouterr().out)


def said_in(out: str) -> str:
    return " ".join(out.split())


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_position_of_an_lr_is_where_the_schedule_has_it(schedule):
    cfg = TrainConfig(schedule=schedule, learning_rate=1e-3, min_lr=1e-4)
    for position in (0.81, 0.9, 1.0) if schedule == "wsd" else (0.0, 0.25, 0.5, 0.99, 1.0):
        assert position_of(lr_at_position(position, cfg), cfg) == pytest.approx(position, abs=1e-9)
    assert position_of(cfg.learning_rate, cfg) == 0.0  # the peak: wsd's stable stretch goes on from its start
    assert position_of(1.0, cfg) == 0.0 and position_of(0.0, cfg) == 1.0  # clipped to the schedule


@pytest.mark.slow
def test_a_resume_still_warming_up_says_the_warmup_it_has_left(tmp_path, char_dataset, capsys):
    """`schedule kept from step 40: lr 2.4e-04 -> 3.0e-05` hid the warmup still to run."""
    config, run = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=3), tmp_path / "run"
    assert main(["train", str(config), "--run", str(run), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.max_iters=20"]) == 0
    assert ("schedule kept from step 3: lr 2.0e-03, rising to 3.0e-03 by step 5 (warmup), then -> 3.0e-04 at step "
            "20") in said(capsys)


@pytest.mark.slow
def test_extending_a_run_goes_on_from_its_lr_and_decays_at_the_new_end(tmp_path, char_dataset, capsys):
    config, run = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=40), tmp_path / "run"
    # to step 40 of a cosine laid over 100 steps: the LR there is mid-decay
    assert main(["train", str(config), "--run", str(run), "--device", "cpu", "--set", "train.log_interval=1",
                 "--set", "train.lr_decay_iters=100"]) == 0
    over_100 = TrainConfig(max_iters=100, learning_rate=3e-3, min_lr=MIN_LR, warmup_iters=5)
    capsys.readouterr()
    # max_iters alone: the schedule's end (lr_decay_iters) stands, and the line says so
    assert main(["train", "--resume", str(run), "--set", "train.max_iters=60", "--set", "train.log_interval=1"]) == 0
    assert f"schedule kept from step 40: lr {lr_at(40, over_100):.1e} -> {MIN_LR:.1e} at step 100" in said(capsys)
    # then the end moves to 90: laid anew from the LR of step 60 (no warmup again), min_lr at 90
    assert main(["train", "--resume", str(run), "--set", "train.max_iters=90", "--set", "train.lr_decay_iters=0",
                 "--set", "train.log_interval=1"]) == 0
    line = re.search(r"schedule re-laid from step 60: lr ([\d.e+-]+) -> 3\.0e-04 at step 90", said(capsys))
    steps = lrs(run)  # a line's LR is its last step's: line 61 is step index 60
    assert line and float(line[1]) == pytest.approx(lr_at(60, over_100), rel=0.05)
    assert steps[61] == pytest.approx(lr_at(60, over_100)) and steps[90] == pytest.approx(MIN_LR)
    assert all(steps[s + 1] <= steps[s] + 1e-12 for s in range(40, 90))  # continuous and falling throughout
    # a resume of the same length keeps it: nothing said, nothing changed
    assert main(["train", "--resume", str(run), "--set", "train.max_iters=90", "--set", "train.lr_decay_iters=0",
                 "--set", "train.log_interval=1"]) == 0
    assert "schedule" not in said(capsys) and lrs(run) == steps


@pytest.mark.slow
def test_a_budgeted_run_extended_by_steps_keeps_its_lr(tmp_path, char_dataset, capsys):
    """training.md's recipe: `--set train.budget_seconds=0 --set train.max_iters=N` on a budgeted run."""
    run = tmp_path / "run"
    cfg = load_config(write_config(tmp_path / "tiny.toml", char_dataset), [
        "train.budget_seconds=5", "train.log_interval=1", "train.warmup_iters=0", "train.min_lr=1e-5",
        "train.eval_interval=50"])
    end = Trainer(train_job(cfg, run, "cpu")).run().steps  # the budget counts from run(): the test's process is old
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.budget_seconds=0", "--set",
                 f"train.max_iters={end + 10}", "--set", "train.log_interval=1"]) == 0
    assert re.search(rf"schedule re-laid from step {end}: lr [\d.e+-]+ -> 1\.0e-05 at step {end + 10}", said(capsys))
    steps = lrs(run)
    assert all(steps[s + 1] <= steps[s] + 1e-12 for s in range(end - 1, end + 10))  # no jump back up at the resume


@pytest.mark.slow
def test_retention_keeps_the_step_resumed_from_and_says_what_it_deletes(tmp_path, char_dataset, capsys):
    config, run = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=30), tmp_path / "run"
    every = ["--set", "train.checkpoint_interval=5", "--set", "train.eval_interval=100"]
    assert main(["train", str(config), "--run", str(run), "--device", "cpu", *every]) == 0
    assert [p.name for p in RunDir(run).step_folders()] == ["step_000020", "step_000025", "step_000030"]
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.max_iters=50", *every]) == 0
    assert ("note: with train.keep_checkpoints = 3, the checkpoints to come delete step_000020, step_000025; "
            "step_000030 (resumed from and best) stay") in said(capsys)
    assert [p.name for p in RunDir(run).step_folders()] == ["step_000030", "step_000040", "step_000045",
                                                            "step_000050"]
    assert main(["sample", str(run), "--checkpoint", "30", "--max-new-tokens", "5"]) == 0  # the write-up's sample
    capsys.readouterr()
    # resumed twice: both steps it went on from stay, and best (one of them, or the end)
    assert main(["train", "--resume", str(run), "--set", "train.max_iters=70", *every]) == 0
    assert re.search(r"delete step_000040, step_000045; step_000030 \(resumed from( and best)?\), step_000050 "
                     r"\(resumed from( and best)?\) stay", said(capsys))
    assert [p.name for p in RunDir(run).step_folders()] == ["step_000030", "step_000050", "step_000060",
                                                            "step_000065", "step_000070"]


@pytest.mark.slow
def test_the_loss_plot_marks_where_a_run_was_resumed(tmp_path, char_dataset):
    """A dashed line at the step resumed from, the full height of the axes: a resume that changed the machine,
    the threads or the schedule shows where the curve changes."""
    from matplotlib.image import imread

    config, run = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=20), tmp_path / "run"
    assert main(["train", str(config), "--run", str(run), "--device", "cpu"]) == 0
    assert main(["train", "--resume", str(run), "--set", "train.max_iters=40"]) == 0
    resumed = imread(run / "loss.png")
    # The same run's plot without its resume event: what differs is the line (and its legend entry)
    (run / "metrics.jsonl").write_text("".join(line for line in (run / "metrics.jsonl").open()
                                               if '"event": "resume"' not in line))
    from lmlab.analysis.plots import plot_losses

    plain = imread(plot_losses(RunDir(run), tmp_path / "plain.png"))
    differs = (abs(resumed - plain).sum(axis=2) > 0.1)
    tall = differs.sum(axis=0)  # per column of pixels
    assert tall.max() > 0.5 * differs.shape[0] and (tall > 0.5 * differs.shape[0]).sum() <= 4  # one thin line


@pytest.mark.slow
def test_sigterm_during_a_long_step_ends_the_run_within_seconds(tmp_path, tiny_run):
    """A step of a million micro-batches takes far longer than the stop grace period on any machine: it is
    abandoned, nothing of it saved, the lock released, and the same command again starts over. The signal goes in
    the first step, whatever the speed of either process: once the model line (the set-up's last) is out and the
    run has spent a second of its own CPU time after it, which only the step takes. (Sent once the start event was
    logged, a busy machine let it land in the set-up that follows it, and the run stopped before its first step.)"""
    config = write_config(tmp_path / "tiny.toml", Path(RunDir(tiny_run).config().data.dataset))
    target = tmp_path / "long"
    proc = spawn("train", config, "--run", target, "--set", "train.grad_accum_steps=1000000", "--device", "cpu",
                 cwd=tmp_path)
    line = ""
    while not line.startswith("model: "):
        line = proc.stdout.readline()
        assert line, proc.communicate()
    ticks = cpu_ticks(proc.pid)
    wait_until(lambda: cpu_ticks(proc.pid) > ticks + os.sysconf("SC_CLK_TCK"), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)  # the step alone would take hours
    assert proc.returncode == 0, (out, err)
    said = " ".join(out.split())  # as printed, wrapped or not
    assert "stopped by SIGTERM during step 1, which was abandoned" in said and "run the same command again" in said
    assert not RunDir(target).step_folders() and not RunDir(target).running()
    assert RunDir(target).events()[-1]["stopped_by"] == "SIGTERM"


def _records(tmp_path: Path) -> Path:
    """24 records: 22 train (6 steps an epoch at batch 4), 2 held out."""
    path = tmp_path / "records.json"
    path.write_text(json.dumps(json.loads(ALPACA_TINY.read_text())[:24]))
    return path


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
        wait_until(lambda size=size: metrics.stat().st_size > size, proc)


@pytest.mark.slow
def test_a_fine_tune_killed_or_stopped_at_any_point_then_run_again_ends_bitwise_equal(capsys, tmp_path,
                                                                                      imported_gpt2):
    data = _records(tmp_path)
    # The threads on every core and the fused attention, fixed: a step's last bits depend on both, and a load that
    # comes or goes would change the count or tip `auto`'s timing of the paths.
    settings = ["--set", "finetune.epochs=2", "--set", "finetune.batch_size=4", "--set",
                "finetune.checkpoint_interval=2", "--set", "finetune.learning_rate=0.003", "--set",
                f"finetune.threads={len(cores())}", "--set", "finetune.attention=fused"]

    def command(name: str) -> list[str]:
        return ["finetune", str(imported_gpt2), "--data", str(data), "--out", str(tmp_path / name), "--device", "cpu",
                *settings]

    whole = tmp_path / "whole"
    ft = FinetuneConfig(str(data), epochs=2, batch_size=4, checkpoint_interval=2, learning_rate=0.003,
                        threads=len(cores()), attention="fused")
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
    same_weights(whole, killed, stopped)
    assert RunDir(killed).unfinished() is None and RunDir(stopped).unfinished() is None
    assert stable_events(killed) == stable_events(whole)
    # The stop's own checkpoint is in the record (it was written); where the stop fell between the interval's
    # checkpoints it is one more than the uninterrupted run has, and nothing else differs.
    stop_step = next(e["step"] for e in RunDir(stopped).events() if e["event"] == "resume")
    stops = {"event": "checkpoint", "step": stop_step, "best": False}
    assert [e for e in stable_events(stopped) if e != stops or stops in stable_events(whole)] == stable_events(whole)


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory, corpus_dir, char_dataset) -> Path:
    """A char dataset of as many characters as the runs' but not the same ones (w and W become Q and Z)."""
    from lmlab.data.prepare import prepare

    root = tmp_path_factory.mktemp("other")
    (root / "corpus").mkdir()
    for doc in corpus_dir.glob("*.txt"):
        (root / "corpus" / doc.name).write_text(doc.read_text().replace("w", "Q").replace("W", "Z"))
    target, meta, _ = prepare([str(root / "corpus")], "char", name="other", out_dir=root / "data")
    assert meta["vocab_size"] == json.loads((char_dataset / "meta.json").read_text())["vocab_size"]
    return target


def test_a_resume_or_init_from_onto_another_tokenizer_is_refused_even_with_force(capsys, tmp_path, tiny_run,
                                                                                 other_tokenizer):
    copy = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    kept = digests(copy)
    why = ("has another tokenizer than", "--force or not", f"`lmlab prepare CORPUS --tokenizer {copy}` makes one")
    refused(capsys, "train", "--resume", copy, "--set", f"data.dataset={other_tokenizer}", "--set",
            "train.max_iters=20", "--force", needles=(f"dataset {other_tokenizer}", f"than {copy}", *why))
    assert digests(copy) == kept
    config = write_config(tmp_path / "tiny.toml", other_tokenizer, max_iters=2)
    refused(capsys, "train", config, "--run", tmp_path / "new", "--init-from", copy,
            needles=(f"than --init-from {copy}", "has another tokenizer"))
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_a_resume_whose_dataset_moved_says_how_to_point_at_it(capsys, tmp_path, tiny_run):
    dataset = RunDir(tiny_run).config().data.dataset
    moved = Path(shutil.copytree(tiny_run, tmp_path / "moved"))
    (moved / "config.toml").write_text((moved / "config.toml").read_text().replace(dataset, str(tmp_path / "gone")))
    refused(capsys, "train", "--resume", moved, "--set", "train.max_iters=20",
            needles=("which is not here (moved or deleted)",
                     f"lmlab train --resume {moved} --set data.dataset=DIR", "or put the dataset back"))
    assert main(["train", "--resume", str(moved), "--set", "train.max_iters=12", "--set",
                 f"data.dataset={dataset}"]) == 0
    assert RunDir(moved).config().data.dataset == dataset and RunDir(moved).events()[-1]["step"] == 12


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("lines", [1, 3])
def test_train_piped_into_head_during_its_set_up_stops_before_its_first_step(tmp_path, char_dataset, lines):
    """`lmlab train CONFIG | head -3` (the reader gone while the run sets up) never leaves it `crashed`, without a
    checkpoint or an `end` event. A reader gone before the run is begun ends the command as a pipe's reader ends
    any (status 141), nothing written; once it is begun, as one gone later does: a checkpoint of where it stands,
    `stopped_by` SIGPIPE, status 0. (Which of the two a line count meets depends on the notes a machine prints.)"""
    config = write_config(tmp_path / "long.toml", char_dataset, max_iters=1_000_000)
    run = tmp_path / "run"
    child = subprocess.Popen([LMLAB, "train", str(config), "--run", str(run), "--device", "cpu"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    for _ in range(lines):
        assert not child.stdout.readline().startswith("step ")  # still setting up
    child.stdout.close()  # as `head -N` does once it has its lines
    code, err = child.wait(timeout=300), child.stderr.read()
    assert code in (0, 141) and "Traceback" not in err, err
    if code == 141:
        assert not run.exists() and not (tmp_path / ".run.lock").exists()
        return
    end = events_of(run, "end")[-1]
    assert (end["stopped_by"], end["step"]) == ("SIGPIPE", 0)
    assert RunDir(run).checkpoint("latest").name == "step_000000"


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_during_the_set_up_ends_it_at_once_in_one_line(tmp_path, char_dataset, stop):
    """A stop signal while PyTorch loads ends the command at once in one line (never without a word, Python's
    default for SIGTERM, nor held, as SIGINT is in a call that does not return to Python). Sent as the first line is
    read (PyTorch still loading): one line, status 130, nothing written; or, should the run have been begun already,
    stopped after no step."""
    config = write_config(tmp_path / "long.toml", char_dataset, max_iters=1_000_000)
    run = tmp_path / "run"
    child = subprocess.Popen([LMLAB, "train", str(config), "--run", str(run), "--device", "cpu"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    said = ""
    while "setting up" not in " ".join(said.split()):  # the line folds at 200 columns where tmp_path is long
        line = child.stdout.readline()
        assert line, child.communicate()
        said += line
    child.send_signal(stop)
    out, err = child.communicate(timeout=300)
    assert "Traceback" not in err, err
    if child.returncode == 130:
        assert f"stopped by {stop.name} while it set up: nothing was written" in err
        assert not run.exists() and not (tmp_path / ".run.lock").exists()
        return
    assert child.returncode == 0 and events_of(run, "end")[-1]["stopped_by"] == stop.name, out + err


@pytest.mark.slow
def test_finetune_piped_into_head_during_its_set_up_stops_after_a_step_and_goes_on(tmp_path, imported_gpt2):
    """The same of a fine-tune (`lmlab finetune ... | head -1` left it `crashed`): stopped as SIGPIPE with a
    checkpoint, and the same command again finishes it."""
    command = [LMLAB, "finetune", str(imported_gpt2), "--data", str(ALPACA_TINY), "--out", str(tmp_path / "ft"),
               "--set", "finetune.epochs=1", "--device", "cpu"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    child.stdout.readline()
    child.stdout.close()
    assert child.wait(timeout=300) == 0, child.stderr.read()
    end = events_of(tmp_path / "ft", "end")[-1]
    assert end["stopped_by"] == "SIGPIPE" and RunDir(tmp_path / "ft").step_folders()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "val loss by epoch" in done.stdout, done.stderr
    assert events_of(tmp_path / "ft", "end")[-1]["stopped_by"] is None


@pytest.mark.slow
def test_train_piped_into_head_stops_as_sigterm_does_and_resumes(tmp_path, char_dataset, capsys):
    """`lmlab train ... | head`: the reader goes, the next line written raises SIGPIPE, and the run ends after its
    step with a checkpoint, `stopped_by` SIGPIPE, status 0, and resumes."""
    config = write_config(tmp_path / "long.toml", char_dataset, max_iters=1_000_000)
    run = tmp_path / "run"
    child = subprocess.Popen([LMLAB, "train", str(config), "--run", str(run), "--device", "cpu", "--set",
                              "train.log_interval=1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in child.stdout:  # the loop's first line: the stop handler is in place
        if line.startswith("step "):
            break
    child.stdout.close()  # as `head` does once it has its lines
    assert child.wait(timeout=120) == 0, child.stderr.read()
    end = events_of(run, "end")[-1]
    assert end["stopped_by"] == "SIGPIPE" and RunDir(run).checkpoint("latest").name == f"step_{end['step']:06d}"
    code, _, err = run_cli(capsys, "train", "--resume", run, "--device", "cpu", "--set",
                           f"train.max_iters={end['step'] + 2}")
    assert code == 0, err
    assert events_of(run, "resume")[-1]["step"] == end["step"] and events_of(run, "end")[-1]["step"] == end["step"] + 2


# Every setting a resume may be given by --set: a value other than the trained run's, and what a resume does with it
# by steps and by its budget's plan. "refused": one sentence naming it, status 2, nothing written; "honoured":
# config.toml and the resume event say it, in force from the step resumed at; "relaid": honoured, the schedule laid
# again from where the LR stands, and said. A [model] setting is the weights' shape: refused either way.
HONOURED, RELAID, REFUSED = "honoured", "relaid", "refused"
RESUMED: dict[str, tuple[object, str, str]] = {
    "data.dataset": ("COPY", HONOURED, HONOURED),  # the same bytes elsewhere
    "train.batch_size": (4, HONOURED, HONOURED), "train.grad_accum_steps": (2, HONOURED, HONOURED),
    "train.micro_batch": ("auto", REFUSED, REFUSED), "train.max_iters": (24, RELAID, REFUSED),
    "train.budget_seconds": (1000.0, REFUSED, REFUSED), "train.optimizer": ("muon", REFUSED, REFUSED),
    "train.learning_rate": (0.002, RELAID, REFUSED), "train.min_lr": (0.0001, RELAID, REFUSED),
    "train.schedule": ("wsd", RELAID, REFUSED), "train.decay_fraction": (0.5, RELAID, REFUSED),
    "train.warmup_iters": (3, RELAID, REFUSED), "train.warmup_epochs": (0.5, REFUSED, REFUSED),
    "train.lr_decay_iters": (30, RELAID, REFUSED), "train.weight_decay": (0.05, REFUSED, REFUSED),
    "train.beta1": (0.8, REFUSED, REFUSED), "train.beta2": (0.95, REFUSED, REFUSED),
    "train.grad_clip": (0.5, HONOURED, HONOURED), "train.eval_interval": (7, HONOURED, HONOURED),
    "train.eval_iters": (2, HONOURED, REFUSED), "train.log_interval": (2, HONOURED, HONOURED),
    "train.checkpoint_interval": (3, HONOURED, HONOURED), "train.keep_checkpoints": (5, HONOURED, HONOURED),
    "train.patience": (4, HONOURED, HONOURED), "train.seed": (7, REFUSED, REFUSED),
    "train.spike_zscore": (5.0, HONOURED, HONOURED), "train.spike_patience": (2, HONOURED, HONOURED),
    "train.rollback_lr_factor": (0.25, HONOURED, HONOURED), "train.dtype": ("auto", HONOURED, HONOURED),
    "train.compile": (False, HONOURED, HONOURED), "train.attention": ("math", REFUSED, REFUSED),
    "train.threads": (2, HONOURED, HONOURED), "train.tracker": ("tensorboard", HONOURED, HONOURED),
    "train.tracker_project": ("other", HONOURED, HONOURED), "train.tracker_run": ("named", HONOURED, HONOURED),
    "train.parallel": ("fsdp", HONOURED, HONOURED), "train.collective_timeout": (60.0, HONOURED, HONOURED),
    **{f"model.{name}": (value, REFUSED, REFUSED) for name, value in {
        "kind": "recurrent", "n_layer": 3, "n_head": 4, "n_embd": 64, "block_size": 16, "dropout": 0.1, "bias": False,
        "vocab_size": 200, "gelu_approx": "tanh", "pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu",
        "qk_norm": True, "tie_embeddings": False, "n_kv_head": 1, "head_dim": 8, "mlp_hidden": 64,
        "rope_theta": 500.0, "norm_eps": 1e-5, "bigram_buckets": 16, "rnn_cell": "lstm", "options.width": 2}.items()},
}


def test_every_setting_has_its_resume_outcome_stated():
    from lmlab.core.config_toml import SECTIONS

    fields = {f"{section}.{f.name}" for section in ("data", "model", "train")
              for f in dataclasses.fields(SECTIONS[section])}
    assert {key.replace("options.width", "options") for key in RESUMED} == fields


@pytest.fixture(scope="session")
def resumable(tmp_path_factory, char_dataset) -> dict[str, Path]:
    """A run by steps ended at step 20, and a budgeted run cut back to its checkpoint before the last (its steps
    to the end are few); and a copy of their dataset elsewhere."""
    root = tmp_path_factory.mktemp("resumable")
    config = write_config(root / "tiny.toml", char_dataset, max_iters=20)
    config.write_text(config.read_text().replace("[train]\n", "[train]\nmicro_batch = \"set\"\n"))  # as resumed
    steps = Trainer(train_job(load_config(config), root / "steps", "cpu")).run().run_dir
    seconds = 6.0
    for _ in range(4):  # a start-up slower than the budget: a roomier one
        try:
            settings = [f"train.budget_seconds={seconds}", "train.eval_interval=50", "train.checkpoint_interval=10"]
            budgeted = Trainer(train_job(load_config(config, settings), root / f"b{seconds:g}", "cpu"))
            break
        except UserError:
            seconds *= 2
    run = budgeted.run().run_dir
    folders = RunDir(run).step_folders()
    assert len(folders) >= 2, "the budget left too few steps for two checkpoints"
    for folder in folders[-1:]:
        shutil.rmtree(folder)
    cut = int(folders[-2].name.removeprefix("step_"))
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    saved = max(i for i, line in enumerate(lines) if json.loads(line) == {**json.loads(line), "event": "checkpoint",
                                                                          "step": cut})
    (run / "metrics.jsonl").write_text("".join(lines[:saved + 1]))
    return {"steps": steps, "budget": run, "copy": Path(shutil.copytree(char_dataset, root / "copy"))}


def _resume_with(capsys, tmp_path, resumable, key, mode) -> tuple[int, str, str, Path, object]:
    value, by_steps, by_budget = RESUMED[key]
    value = str(resumable["copy"]) if value == "COPY" else value
    run = copy_run(resumable[mode], tmp_path)
    shown = str(value).lower() if isinstance(value, bool) else value
    more = ["--set", "train.max_iters=24"] if mode == "steps" and key != "train.max_iters" else []
    code, out, err = run_cli(capsys, "train", "--resume", run, "--set", f"{key}={shown}", *more)
    return code, out, err, run, value


def _cases(refused: bool) -> list[tuple[str, str]]:
    return [(key, mode) for key, (_, *outcomes) in RESUMED.items()
            for mode, outcome in zip(("steps", "budget"), outcomes) if (outcome == REFUSED) == refused]


@pytest.mark.parametrize("key, mode", _cases(refused=True))
def test_a_setting_a_resume_cannot_honour_is_refused_writing_nothing(capsys, tmp_path, resumable, key, mode):
    kept = digests(copy_run(resumable[mode], tmp_path, "kept"))
    code, out, err, run, _ = _resume_with(capsys, tmp_path, resumable, key, mode)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    assert key.split(".")[1] in lines[0], lines[0]
    assert {p.relative_to(run): b for p, b in digests(run).items()} == \
        {p.relative_to(tmp_path / "kept"): b for p, b in kept.items()}


@pytest.mark.slow
@pytest.mark.parametrize("key, mode", _cases(refused=False))
def test_a_setting_a_resume_honours_is_in_config_toml_and_its_resume_event(capsys, tmp_path, resumable, key, mode):
    expected = RESUMED[key][1 if mode == "steps" else 2]
    code, out, err, run, value = _resume_with(capsys, tmp_path, resumable, key, mode)
    assert code == 0, (out, err)
    section, name = key.split(".")
    assert getattr(getattr(RunDir(run).config(), section), name) == value  # config.toml
    resumed = events_of(run, "resume")[-1]
    assert resumed["changed"][key][1] == value and events_of(run, "end")
    said = " ".join(out.split())
    assert f"{key} {toml_value(resumed['changed'][key][0])} -> {toml_value(value)}" in said
    assert ("schedule " in said and " from step " in said) == (expected == RELAID or mode == "steps")
    if mode == "budget":
        assert "by its checkpoint's plan" in said


CHANGED = ("--set", "train.learning_rate=1e-3", "--set", "train.batch_size=4", "--set", "train.max_iters=120",
           "--set", "train.eval_interval=1000", "--set", "train.checkpoint_interval=50")  # its next checkpoint: 50


@pytest.mark.slow
@pytest.mark.parametrize("then", ["killed, resumed plainly", "killed, resumed with other changes",
                                  "checkpointed, resumed plainly"])
def test_a_resume_that_changed_settings_stays_on_record_however_the_next_resume_goes(tmp_path, trained, then):
    """A resume whose --set changes settings rewrites config.toml as it begins. Killed before its next checkpoint, the
    next resume goes on from the checkpoint before it, by config.toml's settings: its resume event and line say each
    change from those that checkpoint trained by (its state.json keeps them), not from config.toml's, so nothing reads
    as if the run always had them. Once a checkpoint carries them, a plain resume changes nothing and the record of
    the change stays before it."""
    run, checkpointed = copy_run(trained, tmp_path), then.startswith("checkpointed")
    proc = spawn("train", "--resume", run, *CHANGED, cwd=tmp_path)
    # A checkpoint is whole once its folder takes its step's name; its event comes just before (a kill between the
    # two leaves an event that the resume drops), so the folder is what is waited for.
    wait_until((lambda: "step_000050" in [f.name for f in RunDir(run).step_folders()]) if checkpointed else
               (lambda: RunDir(run).config().train.learning_rate == 1e-3), proc)
    proc.kill()
    proc.wait()
    assert RunDir(run).step_folders()[-1].name == ("step_000050" if checkpointed else "step_000020")
    more = ["--set", "train.spike_zscore=5.0"] if "other changes" in then else []
    done = subprocess.run([LMLAB, "train", "--resume", run, *more], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    train, resumes = RunDir(run).config().train, events_of(run, "resume")
    assert (train.learning_rate, train.batch_size, events_of(run, "end")[-1]["step"]) == (1e-3, 4, 120)
    assert [r["step"] for r in resumes] == ([20, 50] if checkpointed else [20])
    changed = resumes[0]["changed"]
    assert changed["train.learning_rate"] == [3e-3, 1e-3] and changed["train.batch_size"] == [8, 4]
    assert ("train.spike_zscore" in changed) == bool(more) and ("changed" in resumes[-1]) != checkpointed
    said = " ".join(done.stdout.split())
    assert ("train.learning_rate 0.003 -> 0.001" in said and "train.batch_size 8 -> 4" in said) != checkpointed


@pytest.mark.slow
def test_a_resume_whose_machine_chose_another_dtype_says_it_as_a_change(tmp_path, char_dataset, monkeypatch, capsys):
    """`dtype = "auto"` trained in bf16 on a CPU where it paid, resumed on one where it does not (a CPU kind faked,
    its peaks cached): float32 from there, said where changes are said, in the resume line and event."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fake_cpu(monkeypatch, "avx512-bf16")
    for dtype, flops in ((torch.bfloat16, 1.8e12), (torch.float32, 0.28e12)):
        cache.keep("peak", peak_key(torch.device("cpu"), dtype), {"flops": flops, "quiet": True,
                                                                 "measured_at": "2026-11-22 18:39:39", "load": None})
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=10)
    for kind, more in (("avx512-bf16", ["--run", tmp_path / "run", config, "--set", "train.dtype=auto"]),
                       ("avx2", ["--resume", tmp_path / "run", "--set", "train.max_iters=14"])):
        fake_cpu(monkeypatch, kind)
        monkeypatch.setattr(peak, "_memo", {})  # another command, on another machine
        code, out, err = run_cli(capsys, "train", *more)
        assert code == 0, err
    assert events_of(tmp_path / "run", "resume")[-1]["changed"]["dtype"] == ["bfloat16", "float32"]
    assert 'from here train.max_iters 10 -> 14, dtype "bfloat16" -> "float32"' in said_in(out)
