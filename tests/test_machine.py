"""lmlab.train.machine: the one component that decides how this machine runs a model. A choice is measured once per
machine and shape and read back after; a damaged, edited, foreign or unwritable cache is a note and a measurement,
never an error; the budget's timing on the run's own step leaves every bit of it as it was; and a second `train` or
`finetune` of the same shape measures nothing, `sample`, `eval` and `serve` at most their threads."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from lmlab.core.config import ModelConfig, RunConfig, TrainConfig
from lmlab.model import build_model
from lmlab.train.machine import MEASURED, READ_BACK, ROWS, Machine, cache_path
from lmlab.train.step import TrainStep
from lmlab.train.timing import time_config, time_step, timing_shape
from tests.helpers import ALPACA_TINY, LMLAB, Server, forget_choices, roomier, write_config

CPU = torch.device("cpu")


def decided(machine: Machine, shape: dict) -> tuple[dict | None, str, int]:
    """`machine`'s decision of a faked row at `shape`, and how many times it measured (at most once)."""
    measured = []
    value, how = machine.decide("attention", shape, lambda: measured.append(1) or {"ms": {"fused": 1.0, "math": 2.0}})
    return value, how, len(measured)


def test_a_choice_is_measured_once_per_shape_and_read_back_after():
    assert decided(Machine(CPU, torch.float32), {"batch": 4}) == ({"ms": {"fused": 1.0, "math": 2.0}}, MEASURED, 1)
    assert decided(Machine(CPU, torch.float32), {"batch": 4}) == ({"ms": {"fused": 1.0, "math": 2.0}}, READ_BACK, 0)
    assert decided(Machine(CPU, torch.float32), {"batch": 8})[1:] == (MEASURED, 1)  # another shape
    assert decided(Machine(CPU, torch.bfloat16), {"batch": 4})[1:] == (MEASURED, 1)  # another dtype
    entries = json.loads(cache_path().read_text())["entries"]
    assert {e["row"] for e in entries.values()} == {"attention"} and len(entries) == 3
    assert {row.name for row in ROWS} == {"threads", "attention", "compile", "graphs", "timing"}


@pytest.mark.parametrize("damage, note", [
    (lambda path: path.write_text("{not json"), "is not valid JSON (damaged, or edited by hand)"),
    (lambda path: path.write_text(json.dumps({"format": 0, "entries": {}})), "was written by another lmlab"),
    (lambda path: path.write_text(path.read_text().replace("1.0", "0.5")), "does not match its checksum"),
])
def test_a_damaged_or_edited_cache_is_a_note_and_a_measurement(damage, note):
    decided(Machine(CPU, torch.float32), {"batch": 4})
    damage(cache_path())
    machine = Machine(CPU, torch.float32)
    assert decided(machine, {"batch": 4}) == ({"ms": {"fused": 1.0, "math": 2.0}}, MEASURED, 1)
    assert len(machine.notes) == 1 and note in machine.notes[0] and "measured again" in machine.notes[0]
    assert decided(Machine(CPU, torch.float32), {"batch": 4})[1] == READ_BACK  # rewritten whole


def test_an_unwritable_cache_is_a_note_and_the_choice_stands(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # lmlab/ cannot be made under a file
    machine = Machine(CPU, torch.float32)
    assert decided(machine, {"batch": 4}) == ({"ms": {"fused": 1.0, "math": 2.0}}, MEASURED, 1)
    assert len(machine.notes) == 1 and "cannot be written" in machine.notes[0] and "XDG_CACHE_HOME" in machine.notes[0]


def test_the_budget_timing_on_the_runs_own_step_leaves_its_bits_as_they_were():
    """Timed steps train the model and its optimizer and draw random numbers: all of it is restored, so the step
    that follows computes the bits it computes on a twin never timed."""
    cfg = RunConfig(model=ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20, dropout=0.1),
                    train=TrainConfig(batch_size=2, compile=False, attention="fused"))
    steps = []
    for timed in (True, False):
        torch.manual_seed(0)
        step = TrainStep(build_model(cfg.model), cfg.train, CPU, torch.float32)
        if timed:
            step(*_batch(), cfg.train.learning_rate)
            timing = time_step(step, cfg, [torch.get_num_threads()])
            assert timing.step > 0 and timing.eval_batch > 0
        else:
            step(*_batch(), cfg.train.learning_rate)
        step(*_batch(), cfg.train.learning_rate)
        steps.append((step, torch.get_rng_state()))
    (timed_step, timed_rng), (twin, twin_rng) = steps
    for (name, a), b in zip(timed_step.model.state_dict().items(), twin.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(timed_rng, twin_rng)  # dropout drew the same numbers
    for a, b in zip(timed_step.optimizer.state.values(), twin.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_timing_cut_short_by_its_deadline_is_not_kept():
    """A deadline the warm-up step shows two steps ending past leaves that step standing for the step, no measurement
    of one: a later run must time it, not read it back; the same timing in full is kept."""
    cfg = RunConfig(model=ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20),
                    train=TrainConfig(batch_size=2, attention="fused"))
    threads = torch.get_num_threads()
    for deadline, full in ((0.0, False), (float("inf"), True)):
        timing = time_config(cfg, CPU, torch.float32, [threads], deadline)
        kept = Machine(CPU, torch.float32).recall("timing", timing_shape(cfg, "fused", torch.float32, threads))
        assert timing.full == full and (kept is not None) == full


def _batch() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    ids = torch.arange(32).reshape(2, 16) % 20
    return [(ids, ids)], 1


@pytest.mark.slow
def test_a_second_train_of_the_same_shape_measures_nothing(tmp_path, char_dataset):
    """Two budgeted `lmlab train` processes of one shape on one cache: the first measures each choice once (the
    attention paths, the budget's step, the threads where the load asks), the second reads all of it back and the
    cache is left as it was; `sample` and `eval` of the run time at most their threads' one decision."""
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    settings = [a for s in ("train.attention=auto", "train.threads=0", "train.compile=false")
                for a in ("--set", s)]
    # What is tested is what each run measures, not how long it trains: a budget a few times a quiet start-up's, made
    # roomier, on a cache forgotten again, where a busy machine's start leaves it too little.
    seconds = 15.0
    for attempt in range(3):
        forget_choices()
        runs, said, refusal = [tmp_path / f"try{attempt}" / f"run{n}" for n in (1, 2)], [], ""
        for n, run in enumerate(runs, 1):
            done = subprocess.run([LMLAB, "train", config, "--run", run, "--device", "cpu", "--budget",
                                   f"{seconds:g}s", *settings], capture_output=True, text=True, timeout=300,
                                  env=os.environ)
            if done.returncode == 2 and "give a budget of at least" in done.stderr:
                refusal = done.stderr
                break
            assert done.returncode == 0, done.stdout + done.stderr
            said.append(next(line for line in done.stdout.splitlines() if line.startswith("machine: ")))
            if n == 1:
                kept = cache_path().read_bytes()
        if not refusal:
            break
        seconds = roomier(seconds, refusal)
    else:
        pytest.fail(f"three budgets in a row were refused: {refusal}")
    assert "(measured)" in said[0] and "attention" in said[0] and "eager (train.compile)" in said[0]
    assert "no CUDA graphs (not on this device)" in said[0]
    assert "(measured)" not in said[1] and "(read back)" in said[1], said[1]
    assert cache_path().read_bytes() == kept
    for n, run in enumerate(runs, 1):
        events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        attention = [e for e in events if e["event"] == "attention"]
        assert len(attention) == 1 and attention[0]["how"] == (MEASURED if n == 1 else READ_BACK)
        assert [(e["step"], e["graphs"], e["how"]) for e in events if e["event"] == "graphs"] == [
            (0, False, "not on this device")]
    rows = {json.loads(cache_path().read_text())["entries"][k]["row"] for k in json.loads(cache_path().read_text())
            ["entries"]}
    assert {"attention", "timing"} <= rows <= {"attention", "timing", "threads"}
    for command in (["sample", "--max-new-tokens", "2"], ["eval"]):
        before = _rows()
        done = subprocess.run([LMLAB, command[0], runs[0], "--device", "cpu", *command[1:]],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        added = _rows() - before
        assert len(added) <= 1 and {row for row, _ in added} <= {"threads"}



@pytest.mark.slow
def test_a_second_finetune_of_the_same_shape_measures_nothing_and_serve_at_most_its_threads(tmp_path, imported_gpt2):
    """`finetune` asks the machine's component as `train` does: the first of a shape measures its attention paths, a
    second reads them back and adds nothing to the cache; `serve` times at most its threads' one decision."""
    added = []
    for n in (1, 2):
        before = _rows()
        done = subprocess.run([LMLAB, "finetune", imported_gpt2, "--data", ALPACA_TINY, "--out", tmp_path / f"ft{n}",
                               "--set", "finetune.epochs=1", "--set", "finetune.threads=1", "--device", "cpu"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        added.append({row for row, _ in _rows() - before})
    assert "attention" in added[0] and added[1] == set(), added
    before = _rows()
    Server(imported_gpt2).stop()
    added_by_serve = _rows() - before
    assert len(added_by_serve) <= 1 and {row for row, _ in added_by_serve} <= {"threads"}

def _rows() -> set[tuple[str, str]]:
    path = Path(cache_path())
    entries = json.loads(path.read_text())["entries"] if path.exists() else {}
    return {(entry["row"], key) for key, entry in entries.items()}
