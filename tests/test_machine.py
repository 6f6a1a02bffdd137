"""lmlab.core.machine and lmlab.core.cache: one Machine per job whose choices are rules, said in one line and
recorded in one event; the one cache file, whose damage, edits or unwritable folder are a note and a measurement,
never an error; the budget's timing on the run's own step leaves every bit of it as it was; a second `train` of the
same shape measures nothing, and nothing but the machine's own modules chooses threads, compiles or builds a
Machine."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmlab.core import cache, peak
from lmlab.core.cache import cache_path
from lmlab.core.config import ModelConfig, RunConfig, TrainConfig
from lmlab.core.machine import GRAPHS_STEP, no_graphs
from lmlab.core.peak import peak_flops, peak_key, processor_identity
from lmlab.model import build_model
from lmlab.model.memory import remembered
from lmlab.run.rundir import RunDir
from lmlab.train import timing
from lmlab.train.step import TrainStep
from lmlab.train.timing import Timing, time_config, time_step, timing_key
from tests.helpers import (
    ALPACA_TINY,
    CPU_KIND_HOOK,
    LMLAB,
    ROOT,
    Server,
    a_machine,
    chosen,
    forget_choices,
    refused_process,
    roomier,
    trusted,
    write_config,
)

CPU = torch.device("cpu")


def kept(value: int) -> int | None:
    """Keep `value` under a key of its own, then read it back as a new process would."""
    cache.keep("test", {"value": value}, {"n": value})
    found = cache.recall("test", {"value": value}, trusted)
    return None if found is None else found["n"]


def test_a_value_is_kept_per_kind_and_key_and_read_back():
    missing = cache.recall("test", {"value": 3}, trusted), cache.recall("other", {"value": 1}, trusted)
    assert (kept(1), kept(2), *missing) == (1, 2, None, None)
    entries = json.loads(cache_path().read_text())["entries"]
    assert {e["kind"] for e in entries.values()} >= {"test", "peak"}  # the peaks beside: one file


@pytest.mark.parametrize("damage, note", [
    (lambda path: path.write_text("{not json"), "is not valid JSON (damaged, or edited by hand)"),
    (lambda path: path.write_text(json.dumps({"format": 0, "entries": {}})), "was written by another lmlab"),
    (lambda path: path.write_text(path.read_text().replace('"n": 7', '"n": 8')), "do not match its checksum"),
])
def test_a_damaged_or_edited_cache_is_a_note_and_a_measurement(damage, note):
    kept(7)
    saved = cache_path().read_text()
    try:
        damage(cache_path())
        cache.take_notes()
        assert cache.recall("test", {"value": 7}, trusted) is None
        notes = cache.take_notes()
        assert len(notes) == 1 and note in notes[0] and "measured again" in notes[0]
        assert cache.take_notes() == []  # said once
        assert kept(7) == 7  # rewritten whole
    finally:
        cache_path().write_text(saved)


@pytest.mark.parametrize("blocked", ["file", "folder"])
def test_an_unwritable_cache_is_a_note_naming_it_and_the_value_stands(tmp_path, monkeypatch, blocked):
    """XDG_CACHE_HOME a file (lmlab/ cannot be made under it), or a folder where machine.json goes: one note that
    names the cache and XDG_CACHE_HOME; the value measured is used."""
    if blocked == "file":
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        (tmp_path / "lmlab" / "machine.json").mkdir(parents=True)
    cache.take_notes()
    assert kept(3) is None
    notes = cache.take_notes()
    assert notes and all("the machine cache" in n and "XDG_CACHE_HOME" in n for n in notes), notes
    assert ("it is a folder" in " ".join(notes)) == (blocked == "folder")


# What may stand where the machine cache's file or its lock is, and a word of the note that says so.
IN_ITS_PLACE = {
    "pipe": (os.mkfifo, "it is a named pipe, not a file"),
    "device": (lambda path: path.symlink_to("/dev/zero"), "it is a link to /dev/zero, a character device"),
    "folder": (Path.mkdir, "folder"),
    "bytes": (lambda path: path.write_bytes(os.urandom(3000)), "is not valid JSON (damaged, or edited by hand)"),
}
TRAIN_2 = ["train", "{config}", "--run", "{run}", "--device", "cpu"]
SAMPLE_2 = ["sample", "{auto}", "--max-new-tokens", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("name, damage, command", [
    *((name, damage, TRAIN_2 if damage == "pipe" else SAMPLE_2) for name in ("machine.json", ".machine.json.lock")
      for damage in ("pipe", "device", "folder")),
    *(("machine.json", "bytes", command) for command in (TRAIN_2, ["plan", "{config}"], SAMPLE_2))])
def test_a_command_goes_on_over_what_stands_in_the_caches_place_and_says_so_once(tmp_path, tiny_run, name, damage,
                                                                                command):
    """A pipe (whose open would wait for a writer), a device, a folder or bytes that are not UTF-8 where the cache
    or its lock is: the command runs, measuring what it would have read, and one note names that file; a pipe,
    device or folder is left as it was, never written through or over."""
    cache_home = tmp_path / "home"
    (cache_home / "lmlab").mkdir(parents=True)
    make, said = IN_ITS_PLACE[damage]
    make(cache_home / "lmlab" / name)
    auto = Path(shutil.copytree(tiny_run, tmp_path / "auto"))  # its dtype chosen by the peaks the cache keeps
    (auto / "config.toml").write_text((auto / "config.toml").read_text().replace('"float32"', '"auto"'))
    names = {"config": write_config(tmp_path / "tiny.toml", RunDir(tiny_run).config().data.dataset, max_iters=2),
             "run": tmp_path / "run", "auto": auto}
    done = subprocess.run([LMLAB, *(part.format(**names) for part in command)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "XDG_CACHE_HOME": str(cache_home)})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    notes = [note for note in " ".join((done.stdout + done.stderr).split()).split("note: ") if "machine cache" in note]
    assert len(notes) == 1 and f"{cache_home / 'lmlab' / name} " in notes[0] and said in notes[0], notes
    assert damage == "bytes" or not (cache_home / "lmlab" / name).is_file()


@pytest.mark.slow
def test_a_refused_command_says_the_caches_note_before_its_error_which_ends_it(tmp_path, char_dataset):
    """A command refused after it found the machine cache damaged says the note first: its last line is why it
    stopped, as every refusal's is."""
    cache_home = tmp_path / "home"
    (cache_home / "lmlab").mkdir(parents=True)
    IN_ITS_PLACE["bytes"][0](cache_home / "lmlab" / "machine.json")
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    done = subprocess.run([LMLAB, "plan", config, "--budget", "1s"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XDG_CACHE_HOME": str(cache_home)})
    error = refused_process(done, "give a budget of at least")
    assert -1 < done.stderr.find("note: the machine cache ") < done.stderr.index(error), done.stderr


TINY = RunConfig(model=ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20),
                 train=TrainConfig(batch_size=2, attention="fused"))


def peak_read_back(edit: dict) -> float:
    """This CPU's float32 peak kept as a quiet measurement's entry with `edit` (its checksum recomputed), then had
    as a command's start has it: its FLOP/s."""
    entry = {"flops": 2e11, "quiet": True, "measured_at": "2026-11-22 18:39:39",
             "load": {"seconds": 0.75, "cores": 2, "others": 0.01, "loadavg": 0.3}}
    cache.keep("peak", peak_key(CPU, torch.float32), {**entry, **edit})
    peak._memo.clear()
    return peak_flops(CPU, torch.float32).flops


def timing_read_back(edit: dict) -> Timing | None:
    """A tiny config's step timing kept with `edit`, then read back as a budget reads it (`timing.recall`)."""
    machine, kept = a_machine(), Timing(torch.get_num_threads(), 0.5, 0.1, 1000, 1.0, 0.1, "fused")
    timing.keep(machine, TINY, dataclasses.replace(kept, **edit))
    return timing.recall(machine, TINY, build_model(TINY.model), "fused")


def plot_read_back(kept: object) -> float:
    """A redraw's seconds kept as `kept`, then read back as a budget reads them (`timing.plot_seconds`)."""
    cache.keep("plot", processor_identity(torch.device("cpu")), kept)  # kept as it is: keeping checks nothing
    return timing.plot_seconds()


def memory_read_back(kept: object) -> list[int]:
    """A memory estimate kept as `kept`, then had again as the memory check has it."""
    remembered("test", TINY.model, lambda: kept)  # kept as it is: keeping checks nothing
    return remembered("test", TINY.model, lambda: [7])


@pytest.mark.parametrize("read_back, edit, measured", [
    *((peak_read_back, {"flops": flops}, lambda flops: 1e8 < flops < 1e15) for flops in (
        1e30, -2e11, 0.0, 1e3, math.nan, "fast", None)),
    (peak_read_back, {"quiet": "yes"}, lambda flops: flops != 2e11),
    (peak_read_back, {"load": {"others": 5.0}}, lambda flops: flops != 2e11),
    *((timing_read_back, {name: value}, lambda timing: timing is None) for name, value in (
        ("step", 1e-9), ("step", -0.5), ("step", 0.0), ("step", math.nan), ("step", math.inf), ("step", "fast"),
        ("eval_batch", -1.0), ("checkpoint_bytes", None))),
    *((plot_read_back, kept, lambda seconds: seconds == 0.0) for kept in (-0.5, math.nan, math.inf, "slow", None)),
    *((memory_read_back, kept, lambda bytes_: bytes_ == [7]) for kept in ([-1], ["a"], "text", [2**70], None)),
])
def test_every_value_read_back_from_the_cache_is_checked_before_it_is_trusted(tmp_path, monkeypatch, read_back, edit,
                                                                            measured):
    """A value in the cache edited with its checksum recomputed (a peak past what the processor computes or of
    another type, a step faster than its FLOPs at that ceiling, negative, NaN or text, a redraw's seconds that are
    none, a memory estimate that is no count of bytes): its reader drops it with a note naming the entry and what it
    holds, and has the value again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(peak, "SECONDS", 0.04)
    monkeypatch.setattr(peak, "_memo", {})
    cache.take_notes()
    assert measured(read_back(edit))
    notes = cache.take_notes()
    assert len(notes) == 1 and "the machine cache's entry" in notes[0] and " holds " in notes[0], notes
    assert notes[0].endswith("(edited by hand, or damaged): it is measured again.")


def test_the_budget_timing_on_the_runs_own_step_leaves_its_bits_as_they_were():
    """Timed steps train the model and its optimizer and draw random numbers: all of it is restored, so the step
    that follows computes the bits it computes on a twin never timed."""
    cfg = RunConfig(model=ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20, dropout=0.1),
                    train=TrainConfig(batch_size=2, compile=False, attention="fused"))
    steps = []
    for timed in (True, False):
        torch.manual_seed(0)
        step = TrainStep(build_model(cfg.model), cfg.train, a_machine())
        if timed:
            step(*_batch(), cfg.train.learning_rate)
            timing = time_step(step, cfg)
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
    machine = a_machine()
    for deadline, full in ((0.0, False), (float("inf"), True)):
        timing = time_config(cfg, machine, deadline)
        kept = cache.recall("timing", timing_key(machine, cfg, "fused"), trusted)
        assert timing.full == full and (kept is not None) == full


@pytest.mark.slow
def test_a_step_timing_is_read_back_only_by_the_model_code_that_ran_it(tmp_path):
    """A step timed and kept is read back by the same code, and timed again by a process whose model code changed (a
    norm or an attention edited since): a kept timing never outlives the code it timed."""
    script = ("import sys, torch\nfrom lmlab.core.config import ModelConfig, RunConfig, TrainConfig\n"
              "from lmlab.model import build_model\nfrom lmlab.train.timing import recall, time_config\n"
              "from tests.helpers import a_machine\n"
              "cfg = RunConfig(model=ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=20),\n"
              "                train=TrainConfig(batch_size=2, attention='fused'))\n"
              "if sys.argv[1] == 'time':\n    time_config(cfg, a_machine())\n"
              "with torch.device('meta'):\n    model = build_model(cfg.model)\n"
              "print(recall(a_machine(), cfg, model, 'fused') is not None)")
    edited = tmp_path / "edited"
    shutil.copytree(ROOT / "lmlab", edited / "lmlab", ignore=shutil.ignore_patterns("__pycache__"))
    with open(edited / "lmlab" / "model" / "gpt.py", "a") as gpt:
        gpt.write("\n# an edit of the model's code\n")
    read = []
    for source, what in ((ROOT, "time"), (ROOT, "read"), (edited, "read")):
        done = subprocess.run([sys.executable, "-c", script, what], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  [str(source), str(ROOT), str(CPU_KIND_HOOK)])})
        assert done.returncode == 0, done.stderr
        read.append(done.stdout.split()[-1])
    assert read == ["True", "True", "False"]


def _batch() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    ids = torch.arange(32).reshape(2, 16) % 20
    return [(ids, ids)], 1


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cuda_graphs_replay_a_compiled_step_by_the_rule_over_the_whole_range(device):
    """CUDA graphs only for a compiled step on CUDA, in one process, one micro-batch a step, of a kind that allows
    them, shorter than GRAPHS_STEP at the peak; each other case says why. A machine's line says the verdict."""
    for compiled in (False, True):
        for alone in (False, True):
            for accumulation in (1, 2, 8):
                for at_peak in (0.0, GRAPHS_STEP / 10, GRAPHS_STEP * 0.99, GRAPHS_STEP, GRAPHS_STEP * 100):
                    for allowed in (False, True):
                        why = no_graphs(device, compiled, alone, accumulation, at_peak, allowed)
                        graphs = (device == "cuda" and compiled and alone and accumulation == 1 and allowed
                                  and at_peak < GRAPHS_STEP)
                        assert (why is None) == graphs and (graphs or why), (compiled, alone, accumulation, at_peak)
    machine = a_machine(device)
    machine.peak = type("Peak", (), {"flops": 1e12})()
    assert machine.graphs(True, True, 1, 1e12 * GRAPHS_STEP / 2, True) == (device == "cuda")
    assert machine.made["graphs"][0] == ("CUDA graphs" if device == "cuda" else "no CUDA graphs")


@pytest.mark.parametrize("setting", ["auto", True, False])
def test_compiling_is_a_rule_of_the_device_and_the_setting(setting):
    """On a CPU, auto is eager and true compiles (no trial undoes it); the line says which and why."""
    machine = a_machine()
    compiled, note = machine.compiles(setting)
    assert compiled == (setting is True) and (note is not None) == (setting is True)
    assert machine.made["compile"] == ("compiled" if compiled else "eager",
                                       "rule: eager here" if setting == "auto" else "train.compile")


@pytest.mark.slow
def test_a_second_train_of_the_same_shape_measures_nothing(tmp_path, char_dataset):
    """Two budgeted `lmlab train` processes of one shape on one cache: the first times the budget's step (its only
    measurement besides the peak, which the session measured; its first redraw of loss.png is kept too), the second
    reads it back, its plan counting that redraw, and leaves the timings as they were; each says its rules in one
    line and records them in its `machine` event; `sample` and `eval` of the run time nothing."""
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
            said.append(" ".join(done.stdout.split("machine: ", 1)[1].split("\n\n")[0].split()))
            if n == 1:
                timings, plots = _entries("timing"), _entries("plot")
        if not refusal:
            break
        seconds = roomier(seconds, refusal)
    else:
        pytest.fail(f"three budgets in a row were refused: {refusal}")
    assert "attention fused (rule: " in said[0] and "eager (train.compile)" in said[0]
    assert "no CUDA graphs (not on this device)" in said[0] and "(measured)" in said[0]
    assert "(measured)" not in said[1] and "(read back)" in said[1], said[1]
    assert _entries("timing") == timings and len(timings) == 1
    # the first run's redraw of loss.png, kept: the second's plan counts it for each evaluation
    (plot,) = [entry["value"] for entry in plots.values()]
    planned = next(e for e in RunDir(runs[1]).events() if e["event"] == "budget")
    assert 0 < plot < 60 and planned["eval_seconds"] >= plot
    for run in runs:
        assert chosen(run, "graphs") == ("no CUDA graphs", "not on this device")
        assert chosen(run, "compile") == ("eager", "train.compile")
    for command in (["sample", "--max-new-tokens", "2"], ["eval"]):
        done = subprocess.run([LMLAB, command[0], runs[0], "--device", "cpu", *command[1:]],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert _entries("timing") == timings


def _entries(kind: str) -> dict:
    """The machine cache's entries of `kind` (a peak measured on a busy machine is measured again at each start)."""
    return {k: v for k, v in json.loads(cache_path().read_text())["entries"].items() if v["kind"] == kind}


@pytest.mark.slow
def test_a_finetune_and_serve_measure_nothing(tmp_path, imported_gpt2):
    """`finetune` asks the machine's rules as `train` does, and `serve` its threads: neither times anything."""
    before = _entries("timing")
    done = subprocess.run([LMLAB, "finetune", imported_gpt2, "--data", ALPACA_TINY, "--out", tmp_path / "ft",
                           "--set", "finetune.epochs=1", "--set", "finetune.threads=1", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    Server(imported_gpt2).stop()
    assert _entries("timing") == before


# Where the names that make the machine's choices may stand: nothing else sets torch's threads, compiles, times a
# peak or a step, or builds a job's Machine or ThreadChooser.
ALLOWED = {
    "set_num_threads": {"core/threads.py", "core/peak.py", "inference/compiled.py"},
    "compile": {"train/compiled.py", "inference/graphs.py"},
    "Machine": {"train/preflight.py", "experiments/miniseries.py", "commands/plan.py"},
    "ThreadChooser": {"core/machine.py", "train/preflight.py", "train/finetune.py", "api/run.py", "serving/startup.py",
                      "commands/plan.py"},
    "measured_peak": {"core/peak.py"},
    "time_step": {"train/timing.py"},
}


def test_the_machines_choices_are_made_only_where_the_listing_allows():
    """A call of torch.set_num_threads, torch.compile, Machine(...) or its constructors, ThreadChooser(...), or the
    two timings (the peak's, a step's) anywhere else in lmlab/ fails here: a new place must be argued for; a place that
    no longer calls one leaves the listing, so that it stays the map."""
    found: dict[str, set[str]] = {name: set() for name in ALLOWED}
    for path in sorted((ROOT / "lmlab").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "Machine":
                name = "Machine"  # Machine.of, Machine.measured
            if name in found and (name != "compile" or getattr(func, "value", None) is not None and
                                  getattr(func.value, "id", "") == "torch"):
                found[name].add(str(path.relative_to(ROOT / "lmlab")))
    for name, allowed in ALLOWED.items():
        assert found[name] == allowed, (f"{name}: called in {sorted(found[name] - allowed)}, "
                                        f"no longer in {sorted(allowed - found[name])}")
