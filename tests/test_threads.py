"""The threads torch computes with: as set (train.threads, OMP_NUM_THREADS), one on one core, else by the machine's
rule: every core after a quiet set-up, the cores others leave free after a busy one, then as the load changes. What
each count trains at on a busy machine is measured by benchmarks/busy_threads.py, never asserted here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lmlab
from lmlab.commands import main
from lmlab.core import busy, threads
from lmlab.core.busy import BUSY_SHARE, MIN_WINDOW, THREAD_VARIABLES, Load, cores
from lmlab.core.errors import UserError
from lmlab.core.machine import Machine
from lmlab.core.peak import peak_flops
from lmlab.core.threads import Choice, ThreadChooser
from lmlab.run.rundir import RunDir
from tests.helpers import LMLAB, hog, write_config, write_corpus

CPU = torch.device("cpu")


def test_a_lowered_choice_says_why_in_words_and_in_its_event():
    choice = Choice(1, 2, "busy", Load(1.0, 2, 0.47, 1.2))
    assert choice.lowered
    assert choice.describe("train.threads") == ("1 of 2 threads: other processes used 47% of the 2 cores "
                                                "(train.threads sets them)")
    assert choice.record(40) == {"event": "threads", "step": 40, "threads": 1, "most": 2, "reason": "busy",
                                 "others": 0.47}
    undone = Choice(1, 2, "undone", Load(1.0, 2, 0.0, None), (0.5, 0.25))
    assert undone.describe("x") == ("1 of 2 threads: a trial was slower: a training step took 500.0 ms, 250.0 ms "
                                    "before it; other processes used 0% of the 2 cores (x sets them)")
    assert Choice(1, 1, "one core").describe("x") == "1 thread (one core)"


def train(tmp_path, char_dataset) -> dict:
    """A tiny run through the command; its start event."""
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=5)
    assert main(["train", str(config), "--run", str(tmp_path / "run"), "--device", "cpu"]) == 0
    events = RunDir(tmp_path / "run").events()
    assert not any(e["event"] == "threads" for e in events)  # nothing was lowered: nothing to say
    return events[0]


@pytest.mark.slow
def test_a_set_thread_count_is_kept_untimed(tmp_path, char_dataset, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert train(tmp_path, char_dataset)["machine"]["torch_threads"] == 1


@pytest.mark.twin("test_on_faked_cores_the_threads_are_those_the_load_leaves")
@pytest.mark.skipif(len(cores()) < 2, reason="one core: every count is every core")
@pytest.mark.slow
def test_a_run_on_threads_it_set_divides_by_every_cores_peak_and_gives_the_process_its_threads_back(
        tmp_path, char_dataset, monkeypatch):
    """train.threads = 1 measured its peak on that one thread, where lmlab's own choice of one thread divided by the
    peak of every core: a peak on another count, measured busy, gave no MFU. And the run left its caller (a notebook,
    a script going on after `lmlab.train`) on its own count."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=5)
        start = RunDir(lmlab.train(config, run=tmp_path / "run", device="cpu", threads=1).path).events()[0]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert start["machine"]["torch_threads"] == 1
    assert start["peak_flops"] == peak_flops(torch.device("cpu"), torch.float32).flops  # every core's, this process's


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
@pytest.mark.slow
def test_a_process_on_one_core_trains_on_one_thread(tmp_path, char_dataset, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    everything = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(everything)})
    try:
        start = train(tmp_path, char_dataset)
    finally:
        os.sched_setaffinity(0, everything)
    assert start["machine"]["cpu_cores"] == start["machine"]["torch_threads"] == 1


def window(load: Load):
    """`LoadMeter.stop` for a window whose load was `load`: kept on the meter too, as every reader of a meter finds it
    (the peak's measurement among them)."""
    def stop(meter: busy.LoadMeter) -> Load:
        meter.load = load
        return load

    return stop


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 16])
def test_on_faked_cores_the_threads_are_those_the_load_leaves(monkeypatch, cores):
    """The rule over the whole range of loads and windows, on faked cores whatever the host has: a quiet window, or one
    too short to tell, gives every core; a busy one the cores the others leave, one at the least; a setting, one core
    or a GPU's job is never lowered. Nothing is timed."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for module in (threads, busy):
        monkeypatch.setattr(module, "cores", lambda: list(range(cores)))
    before = torch.get_num_threads()
    try:
        for others in (None, 0.0, BUSY_SHARE / 2, BUSY_SHARE, BUSY_SHARE + 0.01, 0.25, 0.5, 0.75, 0.99, 1.0):
            for seconds in (0.0, MIN_WINDOW / 2, MIN_WINDOW, 3.0):
                load = Load(seconds, cores, others, None)
                monkeypatch.setattr(threads.LoadMeter, "stop", window(load))
                choice = Machine(CPU, torch.float32, ThreadChooser(0, "train.threads")).start()
                lowered = cores > 1 and load.busy and others is not None and seconds >= MIN_WINDOW
                want = max(1, round(cores * (1 - others))) if lowered and others is not None else cores
                assert (choice.threads, choice.most, torch.get_num_threads()) == (want, cores, want), (others, seconds)
                assert choice.reason == ("one core" if cores == 1 else "busy" if want < cores else "quiet")
                fixed = Machine(CPU, torch.float32, ThreadChooser(1, "train.threads")).start()
                assert (fixed.threads, fixed.reason) == (1, "train.threads")
                gpu = Machine(torch.device("cuda"), torch.float32, ThreadChooser(0, "train.threads")).start()
                assert (gpu.threads, gpu.reason) == (cores, "cuda: the CPU only feeds it")
    finally:
        torch.set_num_threads(before)


@pytest.mark.twin("test_on_faked_cores_the_threads_are_those_the_load_leaves")
@pytest.mark.skipif(len(cores()) < 2, reason="one core: there is nothing to choose")
def test_on_cores_that_others_hold_the_threads_are_lowered_untimed(monkeypatch):
    """Other processes on every core through the start's window: the job starts on one thread, and says why."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        with hog(len(cores())):
            chooser = ThreadChooser(0, "train.threads")
            time.sleep(4 * MIN_WINDOW)
            choice = Machine(CPU, torch.float32, chooser).start()
        assert choice.reason == "busy" and choice.load is not None and choice.most == len(cores())
        assert choice.threads < choice.most and torch.get_num_threads() == choice.threads
    finally:
        torch.set_num_threads(before)
    assert json.dumps(choice.record(0))  # an event metrics.jsonl can hold


class SteppedMeter:
    """A load meter on a fake clock that each step moves by its seconds; `others` is the others' share of the cores."""

    def __init__(self):
        self.now = self.began = 0.0
        self.others = 0.0

    def start(self):
        self.began = self.now
        return self

    def elapsed(self):
        return self.now - self.began

    def stop(self):
        return Load(self.elapsed(), 2, self.others, None)


@pytest.mark.parametrize("trial, counts, reason", [(1.5, [1, 2, 1, 1], "undone"),  # the cores taken again: a stall
                                                   (0.25, [1, 2, 2, 2], "quiet again")])  # faster: kept
def test_a_load_lowers_the_threads_as_it_asks_and_only_more_threads_are_a_trial(monkeypatch, trial, counts, reason):
    """A hog arrives: a look at the load lowers the threads to one and keeps them there, though its steps (0.375 s) are
    slower than the quiet steps of two before the hog (0.25 s): no timing judges what the load asked for, and going
    back to two would stall. The hog leaves: a look tries two threads, undone at a first step slower than one's."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for module in (threads, busy):
        monkeypatch.setattr(module, "cores", lambda: [0, 1])
    meter, before = SteppedMeter(), torch.get_num_threads()
    try:
        chooser = ThreadChooser(0, "train.threads", window=meter)
        chooser.start(CPU)

        def steps(*seconds: float) -> list[int]:
            seen = []
            for each in seconds:  # binary fractions: an exact clock
                meter.now += each
                seen.append(torch.get_num_threads())
                chooser.stepped(each)
            return seen

        assert steps(*[0.25] * 19) == [2] * 19  # quiet, until a look at the load is due
        meter.others = 0.5
        assert steps(0.25, *[0.375] * 13) == [2] + [1] * 13 and chooser.choice.reason == "busy"
        meter.others = 0.0  # the look after 5 s of steps on one thread finds the cores quiet again
        assert steps(0.375, trial, 0.375 if counts[-1] == 1 else 0.25, 0.375 if counts[-1] == 1 else 0.25) == counts
        chosen = chooser.choice
    finally:
        torch.set_num_threads(before)
    assert chosen.reason == reason


def test_the_choice_restarts_from_every_core_and_a_gpu_job_keeps_them(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(1)  # what an earlier job of this process chose
    chooser = ThreadChooser(0, "train.threads")
    assert torch.get_num_threads() == len(cores())
    choice = Machine(torch.device("cuda"), torch.float32, chooser).start()  # a GPU job's
    assert (choice.threads, choice.reason) == (len(cores()), "cuda: the CPU only feeds it")


@pytest.mark.twin("test_on_faked_cores_the_threads_are_those_the_load_leaves")
@pytest.mark.skipif(len(cores()) < 2, reason="one core: there is nothing to choose")
@pytest.mark.slow
def test_on_busy_cores_a_refusal_stays_one_line_and_a_sample_says_its_threads_after_its_prompt(
        tmp_path, char_dataset, monkeypatch, capsys):
    """The thread note of `sample` and `eval` comes once their input passed its checks: CI's loaded host printed it
    before a refusal, which is one line."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    run = str(tmp_path / "run")
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=5)
    assert main(["train", str(config), "--run", run, "--device", "cpu", "--set", "train.threads=1"]) == 0
    capsys.readouterr()
    with hog(len(cores())):
        refused = main(["sample", run, "--prompt", "ROMEO: Zzyzx §", "--device", "cpu"])
        _, refusal = capsys.readouterr()
        sampled = main(["sample", run, "--prompt", "ROMEO:", "--max-new-tokens", "5", "--device", "cpu"])
        out, notes = capsys.readouterr()
    assert refused == 2 and len(refusal.splitlines()) == 1 and refusal.startswith("error: "), refusal
    assert sampled == 0 and out.startswith("ROMEO:")
    # Whether the load lowered the threads is a timing; when it did, the note says so and why (before the rate).
    *threads, rate = notes.splitlines()
    assert re.fullmatch(r"generated \d+ tokens in [\d.]+ s \(the prompt read first\): [\d,.]+ tok/s", rate), notes
    assert all(line.startswith("note: decoding on 1 of ") and "other processes used" in line for line in threads), notes


@pytest.mark.parametrize("name", THREAD_VARIABLES)
def test_every_thread_pools_variable_above_the_cores_is_refused_before_the_command_runs(monkeypatch, tmp_path,
                                                                                       capsys, name):
    """Every thread pool's variable above the cores (RAYON_NUM_THREADS=100000, which would make `prepare --tokenizer
    bpe:300` train its tokenizer for minutes) is one sentence before the command runs, as OMP_NUM_THREADS is."""
    corpus = write_corpus(tmp_path / "corpus", n_docs=2, speeches=5)
    for other in THREAD_VARIABLES:
        monkeypatch.delenv(other, raising=False)
    out = tmp_path / "data"
    # every spelling its library reads as 100,000 (OpenMP's: spaces and a list around it too)
    for value in ("100000", "+100000", "0100000", *(("\t+100000 ", "100000,2") if name == "OMP_NUM_THREADS" else ())):
        monkeypatch.setenv(name, value)
        assert main(["prepare", str(corpus), "--tokenizer", "bpe:300", "--out-dir", str(out)]) == 2, value
        assert capsys.readouterr().err == (
            f"error: {name} is 100,000, more than the {len(cores())} core{'s' * (len(cores()) > 1)} this process may "
            f"use; set it to at most {len(cores())}, or unset it to let lmlab choose.\n")
        assert not out.exists()
        with pytest.raises(UserError, match=f"{name} is 100,000"):  # the library's entries refuse it too
            lmlab.prepare(corpus, tokenizer="bpe:300", out_dir=out)
    monkeypatch.setenv(name, str(len(cores())))  # at most the cores, as it is set
    assert main(["prepare", str(corpus), "--tokenizer", "bpe:300", "--out-dir", str(out)]) == 0


BIG = 10**5
# (OMP_NUM_THREADS, RAYON_NUM_THREADS, RAYON_RS_NUM_CPUS: None unset) -> the pools they size, as libgomp reads the
# first (C spaces, a sign, digits, a list: strtoul, a '-' wrapping around) and rayon-core the others (a '+' and
# digits alone; RAYON_NUM_THREADS=0 is the cores, one that does not parse leaves it to RAYON_RS_NUM_CPUS)
POOLS = [
    ((None, None, None), {}),
    ((" +100000\t", "+100000", None), {"OMP_NUM_THREADS": BIG, "RAYON_NUM_THREADS": BIG}),
    (("100000,2", " 100000", None), {"OMP_NUM_THREADS": BIG}),
    (("0100000", "100000 ", "+100000"), {"OMP_NUM_THREADS": BIG, "RAYON_RS_NUM_CPUS": BIG}),
    (("-18446744073709451616", "0100000", "7"), {"OMP_NUM_THREADS": BIG, "RAYON_NUM_THREADS": BIG}),
    (("9223372036854775807", "18446744073709551615", None), {"OMP_NUM_THREADS": 2**63 - 1,
                                                              "RAYON_NUM_THREADS": 2**64 - 1}),
    (("9223372036854775808", "18446744073709551616", "100000"), {"RAYON_RS_NUM_CPUS": BIG}),
    (("+ 3", "0", "100000"), {}), (("++3", "-3", None), {}), (("3,", "++3", "+"), {}), (("3abc", "", "x"), {}),
    (("-3", "٣", "3.0"), {}), (("0", "3e3", " 3"), {}), (("", "9" * 5000, "9" * 5000), {}), (("٣", "+", "-0"), {}),
    (("9" * 5000, "1_000", "0x10"), {}),
]


@pytest.mark.parametrize("values, pools", POOLS, ids=[" ".join(repr(v)[:14] for v in vs) for vs, _ in POOLS])
def test_each_thread_variable_is_read_as_its_library_reads_it(monkeypatch, values, pools):
    for name, value in zip(THREAD_VARIABLES, values):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert busy.env_pools() == pools
    over = {name: count for name, count in pools.items() if count > len(cores())}
    if over:
        with pytest.raises(UserError, match=rf"^{next(iter(over))} is {next(iter(over.values())):,}, more than"):
            busy.env_threads()
    else:
        assert busy.env_threads() == pools.get("OMP_NUM_THREADS")


LIBRARIES = """
import ctypes, json, os, sys
import tokenizers
from tokenizers import models, pre_tokenizers
openmp = ctypes.CDLL(sys.argv[1]).omp_get_max_threads()  # the count libgomp read at its load
tokenizer = tokenizers.Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
before = len(os.listdir("/proc/self/task"))
tokenizer.encode_batch(["a a"] * 10000)  # starts rayon's pool whole
rayon = len(os.listdir("/proc/self/task")) - before
from lmlab.core.busy import env_pools
print(json.dumps({"openmp": openmp, "rayon": rayon, "pools": env_pools()}))
"""
# Spellings whose counts its library takes or refuses, each a process of its own: rayon's few enough to start.
SPELLINGS = [{}, {"OMP_NUM_THREADS": " +100000\t", "RAYON_NUM_THREADS": "+3"},
             {"OMP_NUM_THREADS": "100000,2", "RAYON_NUM_THREADS": " 3"},
             {"OMP_NUM_THREADS": "-18446744073709451616", "RAYON_NUM_THREADS": "03"},
             {"OMP_NUM_THREADS": "+ 3", "RAYON_NUM_THREADS": "3 "},
             {"OMP_NUM_THREADS": "3,", "RAYON_NUM_THREADS": "-3"},
             {"OMP_NUM_THREADS": "9223372036854775808", "RAYON_NUM_THREADS": "0", "RAYON_RS_NUM_CPUS": "3"},
             {"OMP_NUM_THREADS": "3abc", "RAYON_NUM_THREADS": "x", "RAYON_RS_NUM_CPUS": "+3"},
             {"RAYON_NUM_THREADS": "99999999999999999999", "RAYON_RS_NUM_CPUS": "3"}]


@pytest.mark.slow
def test_lmlab_reads_each_thread_variable_as_libgomp_and_rayon_do(tmp_path):
    """The counts of the libraries themselves: torch's libgomp and the tokenizers library's rayon pool."""
    found = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    if not found or not Path("/proc/self/task").is_dir():
        pytest.skip("torch here has no libgomp (its OpenMP is another), or no /proc to count rayon's threads")
    env = {k: v for k, v in os.environ.items() if k not in (*THREAD_VARIABLES, "TOKENIZERS_PARALLELISM")}
    seen = []
    for spelling in SPELLINGS:
        done = subprocess.run([sys.executable, "-c", LIBRARIES, found[0]], env={**env, **spelling}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, check=True)
        seen.append(json.loads(done.stdout.splitlines()[-1]))
    default = seen[0]  # each library's count with no variable set
    for spelling, said in zip(SPELLINGS, seen):
        assert said["openmp"] == said["pools"].get("OMP_NUM_THREADS", default["openmp"]), (spelling, said)
        rayon = said["pools"].get("RAYON_NUM_THREADS", said["pools"].get("RAYON_RS_NUM_CPUS", default["rayon"]))
        assert said["rayon"] == rayon, (spelling, said)


def test_an_omp_num_threads_above_the_cores_is_refused_like_the_thread_options(monkeypatch):
    """OMP_NUM_THREADS=100000 is one sentence in `sample` and `train`, as `--threads 100000` is: never torch's
    100,000 OpenMP threads, which leave the system none to give (a Rust panic in tokenizers, then SIGSEGV)."""
    legacy = Path(__file__).parent / "data" / "legacy" / "trained"
    done = subprocess.run([LMLAB, "sample", legacy, "--max-new-tokens", "3"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "100000"}, timeout=300)
    assert done.returncode == 2 and not done.stdout and done.stderr == (
        f"error: OMP_NUM_THREADS is 100,000, more than the {len(cores())} core{'s' * (len(cores()) > 1)} this "
        f"process may use; set it to at most {len(cores())}, or unset it to let lmlab choose.\n")
    monkeypatch.setenv("OMP_NUM_THREADS", str(len(cores()) + 1))  # the library's readers refuse it too
    with pytest.raises(UserError, match="OMP_NUM_THREADS is"):
        ThreadChooser(0, "train.threads")
    monkeypatch.setenv("OMP_NUM_THREADS", str(len(cores())))
    assert ThreadChooser(0, "train.threads").most == len(cores())


@pytest.mark.parametrize("command", [["answer", "--data", "ALPACA", "--out", "OUT", "--max-new-tokens", "2"],
                                     ["sample", "--prompt", "ROMEO:", "--max-new-tokens", "2"]])
def test_every_command_that_decodes_says_threads_the_load_lowered(monkeypatch, imported_gpt2, tmp_path, capsys,
                                                                  command):
    """Every command that decodes (`answer` as `sample` and `eval`) says the threads others' load left it. On four
    faked cores, half of them busy, each says it once, on stderr."""
    from tests.helpers import ALPACA_TINY, copy_run

    run = copy_run(imported_gpt2, tmp_path)  # sample keeps its text in the run
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "cores", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(busy, "cores", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(busy, "_busy_seconds", lambda cpus: None)
    monkeypatch.setattr(threads.LoadMeter, "stop", window(Load(1.0, 4, 0.5, None)))
    places = {"ALPACA": str(ALPACA_TINY), "OUT": str(tmp_path / "answers.jsonl")}
    before = torch.get_num_threads()
    try:
        code = main([command[0], str(run), "--device", "cpu", *[places.get(a, a) for a in command[1:]]])
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert notes == ["note: decoding on 2 of 4 threads: other processes used 50% of the 4 cores (OMP_NUM_THREADS "
                     "sets them)"], err


def two_cores_whose_load_is(monkeypatch, load: dict[str, float]) -> None:
    """Two faked cores whose others' share is `load["others"]` at each look (a window long enough to tell), which a
    test changes mid-decode; every step looks (CHECK_SECONDS 0), so a change is heard at the next token."""
    monkeypatch.setattr(threads, "CHECK_SECONDS", 0.0)
    for module in (threads, busy):
        monkeypatch.setattr(module, "cores", lambda: [0, 1])
    monkeypatch.setattr(busy, "_busy_seconds", lambda cpus: None)

    def stop(meter: busy.LoadMeter) -> Load:
        meter.load = Load(1.0, 2, load["others"], None)
        return meter.load

    monkeypatch.setattr(threads.LoadMeter, "stop", stop)


HEARD = ["note: decoding on 1 of 2 threads: other processes used 50% of the 2 cores (OMP_NUM_THREADS sets them)"]


@pytest.mark.parametrize("env, busy_mid, counts, notes, loaded", [
    (None, 0.5, [2, 2, 1, 1], HEARD, False),  # a load arrives mid-sample: heard, said once
    (None, 0.5, [2, 2, 1, 1], HEARD, True),  # the same of a run `load` kept before
    (None, 0.0, [2, 2, 2, 2], [], False),  # quiet throughout: never changed
    ("2", 0.5, [2, 2, 2, 2], [], False)])  # set: never changed, whatever the load
def test_a_sample_hears_a_load_that_arrives_mid_decode_unless_its_threads_are_set(tiny_run, monkeypatch, capsys, env,
                                                                                  busy_mid, counts, notes, loaded):
    """A sample starts on quiet cores, on both; a load that takes half of them after its first tokens lowers the
    threads to the one it leaves at the next token, as training's mid-run rule does, said once on stderr in the
    start's words (`ThreadChooser.stepped`, through the decoder), also where `Run.load` loaded the run before;
    OMP_NUM_THREADS keeps its count."""
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    load = {"others": 0.0}
    two_cores_whose_load_is(monkeypatch, load)
    before, seen = torch.get_num_threads(), []
    try:
        run = lmlab.Run(tiny_run)
        if loaded:
            run.load(device="cpu")
        pieces = run.sample("ROMEO:", device="cpu", stream=True, keep=False, max_new_tokens=40, temperature=0)
        for i, _ in enumerate(pieces):
            seen.append(torch.get_num_threads())
            if i == 1:
                load["others"] = busy_mid
    finally:
        torch.set_num_threads(before)
    assert len(seen) > 4 and seen[:2] + seen[-2:] == counts, seen
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")] == notes


def test_the_server_hears_a_load_that_arrives_mid_serve_and_health_reports_its_threads(tiny_run, monkeypatch):
    """The server starts on three quiet faked cores, decoding on two (one left to the HTTP side); a load on half of
    them that comes once it serves lowers its decode steps to one thread at the next step, said once in its log in
    sample's words, and `State.threads` (what /health reports) follows."""
    import asyncio

    from lmlab.core.config import SamplingParams
    from lmlab.serving import startup
    from lmlab.serving.batcher import Job
    from lmlab.serving.edge import ServeOptions
    from lmlab.serving.requests import Request
    from lmlab.serving.state import State
    from lmlab.serving.streaming import Relay

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "CHECK_SECONDS", 0.0)
    for module in (threads, busy, startup):
        monkeypatch.setattr(module, "cores", lambda: [0, 1, 2])
    monkeypatch.setattr(busy, "_busy_seconds", lambda cpus: None)
    load = {"others": 0.0}

    def stop(meter: busy.LoadMeter) -> Load:
        meter.load = Load(1.0, 3, load["others"], None)
        return meter.load

    monkeypatch.setattr(threads.LoadMeter, "stop", stop)
    logged: list[str] = []
    state = State(["tiny"], None, lambda _: None, log=logged.append, relay=Relay(asyncio.new_event_loop()))
    before = torch.get_num_threads()
    try:
        startup.Startup(state, ServeOptions(tiny_run, device="cpu", max_batch=2), time.perf_counter())._load()
        assert state.served is not None, state.failure
        assert state.threads == 2
        load["others"] = 0.5
        job = Job(Request([[0]], [SamplingParams(max_new_tokens=8, temperature=0)]))
        state.served.batcher.submit(job)
        deadline = time.monotonic() + 60
        while not job.choices or job.choices[0].finish_reason is None:
            assert time.monotonic() < deadline, "the job did not end"
            time.sleep(0.01)
    finally:
        torch.set_num_threads(before)
    assert state.threads == 1
    changes = [line for line in logged if line.startswith("lmlab serve: decoding on")]
    assert changes == ["lmlab serve: decoding on 1 of 2 threads: other processes used 50% of the 3 cores (--threads "
                       "sets them)"], logged
