"""torchrun across two hosts: two network namespaces joined by a veth pair (tests/hosts.py), each with its own
address and host name, reaching each other only over the veth, with the test's folder as their shared
filesystem. A job of one process per host trains over Gloo as one process does; then the faults a multi-node run
meets: every process of a host killed mid-checkpoint and mid-step, the network between the hosts down for longer
than the collective timeout, a host started with another config or dataset, a rendezvous host that cannot be
reached. Each ends with one sentence naming the rank, the host and what to do, the newest checkpoint whole, and
what was kept continues to the uninterrupted run's numbers.

Creating namespaces needs root (CAP_NET_ADMIN): where the machine refuses, these tests skip, saying so."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import pytest

from lmlab.core.config_toml import load_config
from lmlab.data.prepare import prepare
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from tests.helpers import (
    TOLERANCE,
    assert_same,
    finish,
    losses,
    same_weights,
    torchrun,
    val_losses,
    waits_for_lock,
    write_config,
    write_corpus,
    writer_pid,
)
from tests.hosts import TwoHosts, two_hosts, wait_until

# A run of STEPS steps logging every LOG and checkpointing every EVERY, so that between any two of rank 0's
# appends where a fault strikes, the ranks meet in a collective (see `held`); its LR schedule fixed in steps, and
# two micro-batches a step, one per host.
STEPS, LOG, EVERY = 20, 2, 5
# How long a collective waits for an answer here (train.collective_timeout, 600 s by default): the partition test
# waits this long, and it must stay above the longest wait of a healthy job on a busy 2-core machine (a few
# seconds: the hosts' start-up skew, rank 0 drawing the loss plot while rank 1 waits at the checkpoint after it).
COLLECTIVE_TIMEOUT = 10
# torchrun's rendezvous store answers within read_timeout seconds (60 by default: the unreachable rendezvous host is
# named after twice that), and a host whose launcher has not beaten for keep_alive_interval × keep_alive_max_attempt
# seconds (15 by default) is dropped from it, so a host started again joins within seconds.
RDZV = ["--rdzv-backend=c10d", "--rdzv-conf=read_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3"]
PORT = 29500  # each pair of hosts has a network of its own: every test can use the same port
SETTINGS = ["train.grad_accum_steps=2", "train.lr_decay_iters=20", f"train.max_iters={STEPS}",
            f"train.log_interval={LOG}", f"train.checkpoint_interval={EVERY}", f"train.eval_interval={STEPS}",
            "train.keep_checkpoints=9", f"train.collective_timeout={COLLECTIVE_TIMEOUT}"]
HUNG = 180  # seconds after which a job that has not ended is hung: the test fails, naming it
# Without it, a restarted worker can read its peers' addresses from the failed attempt (pytorch#135712).
ENV = {"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.fixture
def hosts() -> Iterator[TwoHosts]:
    with two_hosts() as pair:
        yield pair


class Job:
    """`torchrun ... -m lmlab train ARGS` on one host, its output in a file (a pipe nobody reads would fill)."""

    def __init__(self, hosts: TwoHosts, host: int, args: list[str], log: Path, *launcher: str):
        self.log = log
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", *RDZV,
                   f"--rdzv-endpoint={hosts.names[0]}:{PORT}", *launcher, "-m", "--", "lmlab", "train", *args,
                   "--device", "cpu"]
        with open(log, "w", encoding="utf-8") as out:
            self.proc = hosts.popen(host, command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **ENV})

    @property
    def output(self) -> str:
        return self.log.read_text(encoding="utf-8")

    def end(self, ok: bool = True) -> str:
        """The output once the job has ended, successfully or (ok=False) not."""
        try:
            self.proc.wait(timeout=HUNG)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.log.name} still runs after {HUNG} s:\n{self.output[-3000:]}")
        assert (self.proc.returncode == 0) == ok, self.output[-3000:]
        return self.output

    def said(self) -> list[str]:
        """lmlab's own lines of failure."""
        return [line for line in self.output.splitlines() if line.startswith("error: ")]

    def wait_to_say(self, count: int = 1) -> float:
        """Wait for lmlab's `count`th sentence of failure; the monotonic time it came."""
        wait_until(lambda: len(self.said()) >= count or self.proc.poll() is not None, f"{self.log.name} to fail", HUNG)
        assert len(self.said()) >= count, self.output[-3000:]
        return time.monotonic()


def start(hosts: TwoHosts, args: list[str], log: Path, *launcher: str, on: tuple[int, ...] = (0, 1),
          host1: tuple[str, ...] = ()) -> list[Job]:
    """The same command on each host of `on` (with `host1` added on host 1), logged to LOG.0, LOG.1."""
    return [Job(hosts, i, [*args, *(host1 if i else ())], log.with_suffix(f".{i}"), *launcher) for i in on]


def sets() -> list[str]:
    return [arg for setting in SETTINGS for arg in ("--set", setting)]


def next_event(run: Path) -> str:
    """The event rank 0 appends next: a train line every LOG steps, a checkpoint every EVERY, an eval at the end."""
    last = RunDir(run).events()[-1]
    if last["event"] == "train" and last["step"] == STEPS:
        return "eval"
    if last["event"] == "eval" or last["event"] == "train" and last["step"] % EVERY == 0:
        return "checkpoint"
    step = last["step"] + 1
    while step % LOG and step % EVERY:
        step += 1
    return "train" if step % LOG == 0 else "checkpoint"


def hold(metrics: Path) -> BinaryIO:
    """The lock rank 0 appends its events under, held (until the file returned is closed)."""
    lock = open(metrics, "ab")
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    return lock


@contextmanager
def held(hosts: TwoHosts, run: Path, pending: str, saved: int = 0) -> Iterator[None]:
    """Rank 0 held where its next event is `pending` and its newest checkpoint is of step `saved` or later, by
    holding the lock it appends its events under: rank 1 then waits for it in the step after its logged one
    (mid-step) for a train line, or in the checkpoint's barrier (mid-checkpoint). Whatever either host's speed:
    until rank 0 waits for that event, host 1 is frozen and the event rank 0 waits for let through; then rank 0
    cannot end its next step, and the lock is held again before host 1 goes on."""
    metrics = run / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and writer_pid(run), "the job to begin its run")
    writer = writer_pid(run)
    lock = hold(metrics)
    try:
        wait_until(lambda: waits_for_lock(writer, metrics), "rank 0 to append an event")
        while next_event(run) != pending or newest(run) < saved:
            hosts.signal(1, signal.SIGSTOP)
            size = metrics.stat().st_size
            lock.close()
            wait_until(lambda size=size: metrics.stat().st_size > size, "rank 0 to append the event it waited for")
            lock = hold(metrics)
            hosts.signal(1, signal.SIGCONT)
            wait_until(lambda: waits_for_lock(writer, metrics), "rank 0 to append its next event")
        yield
    finally:
        lock.close()


def newest(run: Path) -> int:
    """The step of the run's newest checkpoint, 0 before the first."""
    folders = RunDir(run).step_folders()
    return int(folders[-1].name.removeprefix("step_")) if folders else 0


def lost(me: int, how: str, step: int, run: Path) -> str:
    """The sentence rank `me` ends with when it lost the other host after `step`, the run's newest checkpoint whole."""
    peer = 1 - me
    return (f"error: rank {me} on host node{me} lost rank {peer} on host node{peer} ({how}) after step {step}; its "
            f"newest checkpoint (step_{newest(run):06d}) is whole: once every host is up and reaches the others, run "
            f"`lmlab train --resume {run}` on each under the same torchrun command (with --max-restarts, torchrun "
            "continues on its own when the host joins again).")


DIED = "its connection closed: the process died or its host went down"
SILENT = (f"waited {COLLECTIVE_TIMEOUT} s (train.collective_timeout) for an answer: the network between the hosts is "
          "down or a process is stuck")


def row(fault: str, happened: str, detect: float, final: str) -> None:
    """A row of the table of faults (`pytest tests/test_multinode.py -rP` shows them): what was lost is nothing,
    as each test asserts."""
    print(f"FAULT | {fault} | {happened} | {detect:.1f} s | nothing | {final}")


@pytest.fixture(scope="session")
def config(tmp_path_factory, char_dataset) -> Path:
    return write_config(tmp_path_factory.mktemp("cfg") / "tiny.toml", char_dataset, max_iters=STEPS)


@pytest.fixture(scope="session")
def single(tmp_path_factory, config) -> Path:
    """The reference: the run in one process, without torchrun."""
    run = tmp_path_factory.mktemp("single") / "run"
    Trainer(train_job(load_config(config, SETTINGS), run, "cpu")).run()
    return run


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, config) -> tuple[Path, int]:
    """The run over two hosts, uninterrupted: what every fault's run must end equal to; and the bytes host 1
    received over the veth meanwhile."""
    folder = tmp_path_factory.mktemp("two-hosts")
    with two_hosts() as hosts:
        for job in start(hosts, [str(config), "--run", str(folder / "run"), *sets()], folder / "job"):
            job.end()
        return folder / "run", hosts.received(1)


@pytest.mark.slow
def test_two_hosts_train_as_one_process_does(uninterrupted, single):
    run, received = uninterrupted
    assert_same(losses(run), losses(single), range(LOG, STEPS + 1, LOG))
    assert abs(val_losses(run)[STEPS] - val_losses(single)[STEPS]) < TOLERANCE
    assert RunDir(run).events()[0]["world_size"] == 2
    assert received > 100_000  # the gradients of 20 steps crossed the veth, the hosts' only link


@pytest.mark.slow
def test_a_host_killed_mid_checkpoint_rejoins_killed_mid_step_ends_the_job_and_the_run_ends_bitwise_on_one_host(
        hosts, tmp_path, config, uninterrupted):
    """Every process of host 1 SIGKILLed twice. Mid-checkpoint: host 0's torchrun (--max-restarts=1) starts its
    worker again, host 1 is started again, and the job continues from the checkpoint. Mid-step: its restart spent,
    the job ends naming the lost host. Then two processes on one host continue it, bitwise to the uninterrupted
    two-host run's end: the numbers depend on the world size, not on the hosts."""
    run, args = tmp_path / "run", [str(config), "--run", str(tmp_path / "run"), *sets()]
    first = start(hosts, args, tmp_path / "first", "--max-restarts=1")
    with held(hosts, run, "checkpoint"):  # rank 0 about to write step 5's checkpoint, rank 1 waiting for it
        hosts.signal(1, signal.SIGKILL)
        killed = time.monotonic()
    detected = first[0].wait_to_say() - killed
    assert first[0].said() == [lost(0, DIED, EVERY, run)]
    first[1].end(ok=False)
    [again] = start(hosts, args, tmp_path / "again", "--max-restarts=1", on=(1,))
    # Rank 0 logs the resume event before it prints its line: wait for the line itself.
    wait_until(lambda: f"Resumed {run} from step_{EVERY:06d}" in first[0].output, "the job to continue")
    with held(hosts, run, "train", saved=2 * EVERY):  # rank 1 in the step after rank 0's logged one
        hosts.signal(1, signal.SIGKILL)
        killed = time.monotonic()
    detected_again = first[0].wait_to_say(2) - killed
    out = first[0].end(ok=False)
    assert first[0].said()[1:] == [lost(0, DIED, RunDir(run).events()[-1]["step"], run)]
    assert first[0].proc.returncode == 1 and "exitcode  : 2" in out  # torchrun's, and lmlab's status 2 in its summary
    again.end(ok=False)
    finish(torchrun(["--resume", str(run)]))
    assert [e["event"] for e in RunDir(run).events()].count("resume") == 2
    assert losses(run) == losses(uninterrupted[0])
    same_weights(uninterrupted[0], run)
    final = f"val {val_losses(run)[STEPS]:.6f} = {val_losses(uninterrupted[0])[STEPS]:.6f}, weights bitwise equal"
    row("every process of host 1 SIGKILLed mid-checkpoint (--max-restarts=1)", "rank 0 names rank 1 on node1; node1 "
        "started again, the job continues from the checkpoint", detected, final)
    row("every process of host 1 SIGKILLed mid-step, restarts spent", "the job ends (status 1), rank 0 naming rank 1 "
        "on node1 and its newest checkpoint", detected_again, final + " (continued on one host)")


@pytest.mark.slow
def test_a_partition_longer_than_the_collective_timeout_ends_both_hosts_naming_each_other(
        hosts, tmp_path, config, uninterrupted):
    run = tmp_path / "run"
    jobs = start(hosts, [str(config), "--run", str(run), *sets()], tmp_path / "job")
    with held(hosts, run, "train", saved=EVERY):  # rank 1 waiting for rank 0 in a step
        hosts.link(up=False)
        down = time.monotonic()
    detected = min(job.wait_to_say() for job in jobs) - down
    jobs[0].end(ok=False)
    # torchrun's launcher on host 1 waits for the rendezvous store on host 0 as long as TCP retransmits (minutes
    # by default): it ends once the network is back and host 0 answers that its store has gone.
    hosts.link(up=True)
    jobs[1].end(ok=False)
    step = RunDir(run).events()[-1]["step"]
    assert jobs[0].said() == [lost(0, SILENT, step, run)] and jobs[1].said() == [lost(1, SILENT, step, run)]
    # Nothing is lost: the checkpoint continues (in one process here) to the uninterrupted run's numbers.
    Trainer(train_job(load_config(run / "config.toml"), run, "cpu", resume=True)).run()
    assert_same(losses(run), losses(uninterrupted[0]), range(LOG, STEPS + 1, LOG))
    final, want = val_losses(run)[STEPS], val_losses(uninterrupted[0])[STEPS]
    row(f"the veth down after step {step}, longer than train.collective_timeout ({COLLECTIVE_TIMEOUT} s)",
        "both hosts end, each naming the other's rank and host and the newest checkpoint", detected,
        f"val {final:.6f} vs {want:.6f} (continued in one process)")


@pytest.fixture(scope="session")
def other_dataset(tmp_path_factory) -> Path:
    """A dataset of the same characters as char_dataset's, from other documents."""
    folder = tmp_path_factory.mktemp("other")
    target, _, _ = prepare([str(write_corpus(folder / "corpus", seed=1))], "char", name="tiny", out_dir=folder)
    return target


@pytest.mark.slow
def test_a_host_that_cannot_join_is_refused_before_the_first_step(tmp_path, config, other_dataset):
    """Host 1 started with another config, with another dataset, or unable to reach the rendezvous host: three
    pairs of hosts at once, as each job only starts and stops."""
    cases = {"config": ("train.learning_rate=0.002", "(train.learning_rate 0.003 -> 0.002); start every host with "
                        "the same config and --set options."),
             "dataset": (f"data.dataset={other_dataset}", "; every host must read the same dataset: keep it on the "
                         "filesystem they share.")}
    with two_hosts() as a, two_hosts() as b, two_hosts() as c:
        c.link(up=False)
        began = time.time()
        [alone] = start(c, [str(config), "--run", str(tmp_path / "alone"), *sets()], tmp_path / "alone", on=(1,))
        jobs = {what: start(hosts, [str(config), "--run", str(tmp_path / what), *sets()], tmp_path / what,
                            host1=("--set", setting))
                for hosts, (what, (setting, _)) in zip((a, b), cases.items())}
        for what, (_, needle) in cases.items():
            for job in jobs[what]:  # each host says it, whichever launcher ends first
                job.end(ok=False)
                [said] = job.said()
                assert said.startswith(f"error: rank 1 on host node1 was started with another {what} than rank 0 on "
                                       "host node0 ("), said
                assert said.endswith(needle), said
            assert not (tmp_path / what / "metrics.jsonl").exists()  # refused before anything was written
            row(f"host 1 started with another {what}", "both hosts refuse it in one sentence before the first step "
                "(timed from the launch)", job.log.stat().st_mtime - began, "-")
        out = alone.end(ok=False)
    # torchrun's own words: lmlab has not started
    assert f"failed to connect to any network address of (node0, {PORT})" in out
    assert out.rstrip().endswith("The connection to the C10d store has failed. See inner exception for details.")
    assert not (tmp_path / "alone").exists()
    row("the rendezvous host unreachable at start", "torchrun on node1 ends naming node0 and the port (timed from "
        "the launch)", alone.log.stat().st_mtime - began, "-")
