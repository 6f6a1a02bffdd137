"""TorchInductor's cache and the builds a stop signal cuts short: a kernel file the C++ compiler left empty or cut
(a Ctrl-C reaches the compiler too) is deleted by the next lmlab command instead of loaded by the next compile, none
while a process builds into the cache, and a Ctrl-C while `train.compile = true` compiles is one line, not a compiler's
traceback. Each test has a cache of its own (TORCHINDUCTOR_CACHE_DIR)."""

from __future__ import annotations

import _ctypes
import fcntl
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.commands import main
from lmlab.run.rundir import RunDir
from tests.helpers import LMLAB, write_config


def test_kernel_builds_cut_short_are_discarded_when_no_other_process_builds_and_whole_ones_kept(tmp_path, monkeypatch,
                                                                                                capsys):
    """A kernel the compiler left cut short is never loaded by the next compile (it would fail "file too short"):
    it is discarded, unless another process is building, under any of the cache's locks (an AOTInductor build of
    `lmlab serve --compile` writes its object file under its wrapper's lock). A lock this process holds is a build
    a stop signal abandoned: no reason to wait. The kernels here are copies of a real shared library, whole, cut
    short and empty."""
    whole = Path(_ctypes.__file__).read_bytes()  # any ELF shared object will do
    cache = tmp_path / "inductor"
    kernels = {name: cache / name[1:3] / name for name in ("cwhole.main.so", "ccut.main.so", "cempty.main.so",
                                                          "cbuilt.kernel.o")}
    for name, path in kernels.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes({"cwhole.main.so": whole, "cempty.main.so": b""}.get(name, whole[: len(whole) // 3]))
    (cache / "locks").mkdir()
    for key in ("cwhole", "cwrapper"):
        (cache / "locks" / f"{key}.lock").touch()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(cache / "locks" / "cwrapper.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:  # another process's AOTInductor build, writing cbuilt.kernel.o under its wrapper's lock now
        assert holder.stdout.readline() == "held\n"
        assert main(["runs", str(tmp_path)]) in (0, 2)  # any command looks at the cache before it runs
        assert all(path.exists() for path in kernels.values())
    finally:
        holder.communicate("")
    # A compile worker of this process's (Inductor starts it with --parent=PID), its build abandoned by the signal
    # that is ending it: not another build.
    worker = subprocess.Popen([sys.executable, "-c", HOLD, str(cache / "locks" / "cwrapper.lock"),
                               f"--parent={os.getpid()}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline() == "held\n"
        assert main(["runs", str(tmp_path)]) in (0, 2)
        assert not kernels["cempty.main.so"].exists()
    finally:
        worker.communicate("")
    kernels["cempty.main.so"].write_bytes(b"")
    with open(cache / "locks" / "cwrapper.lock", "a") as ours:  # this process's own build, abandoned
        fcntl.flock(ours, fcntl.LOCK_EX)
        assert main(["runs", str(tmp_path)]) in (0, 2)
    capsys.readouterr()
    assert {name for name, path in kernels.items() if path.exists()} == {"cwhole.main.so"}
    assert kernels["cwhole.main.so"].read_bytes() == whole
    assert sorted(path.name for path in (cache / "locks").iterdir()) == ["cwhole.lock", "cwrapper.lock"]


@pytest.mark.slow
def test_what_is_no_kernel_file_in_the_compilers_cache_holds_no_command(tmp_path):
    """A pipe (whose open would wait for a writer), a link to /dev/zero or a folder named as a kernel in Inductor's
    cache, which every command looks at before it runs: the command runs, and leaves them as they were."""
    cache = tmp_path / "inductor"
    (cache / "ab").mkdir(parents=True)
    os.mkfifo(cache / "ab" / "cpipe.main.so")
    (cache / "ab" / "czero.main.so").symlink_to("/dev/zero")
    (cache / "ab" / "cfolder.kernel.o").mkdir()
    done = subprocess.run([LMLAB, "runs", tmp_path], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)})
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (cache / "ab").iterdir()) == ["cfolder.kernel.o", "cpipe.main.so", "czero.main.so"]


HOLD = "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); " \
       "sys.stdin.read()"


@pytest.mark.slow
def test_ctrl_c_while_training_compiles_stops_cleanly_and_the_next_compiled_run_trains(tmp_path, char_dataset):
    """A Ctrl-C that kills the C++ compiler mid-build ends the run as any stop does (its end event, no compiler
    traceback): the compiler's failure is the stop's doing. The next compiled run trains, past the empty kernel the
    killed build left."""
    cache = tmp_path / "inductor"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    config = write_config(tmp_path / "c.toml", char_dataset, max_iters=2)
    command = [LMLAB, "train", str(config), "--run", str(tmp_path / "run"), "--device", "cpu", "--set",
               "train.compile=true"]
    # As a terminal's Ctrl-C: SIGINT to the command's process group (the compiler's too), the moment the compiler
    # starts writing a kernel.
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while proc.poll() is None and not glob.glob(f"{cache}/*/*.main.so"):
        assert time.monotonic() < deadline, "no kernel was compiled within 600 s"
        time.sleep(0.002)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=600)
    # Stopped in the compile (the step abandoned) or, the signal late for it, after the step: the trainer's stop
    # either way, with the run's end event and the command that continues it.
    # a few lines at 80 columns (more where the peak was measured busy), never the compiler's thousands
    assert proc.returncode == 0 and "Traceback" not in out and len(out.splitlines()) < 40, out
    said = " ".join(out.split())
    assert "stopped by SIGINT" in said and ("run the same command again" in said or "Continue with" in said), out
    end = RunDir(tmp_path / "run").events()[-1]
    assert (end["event"], end["stopped_by"]) == ("end", "SIGINT") and not RunDir(tmp_path / "run").running()
    assert all(os.path.getsize(path) > 0 for path in glob.glob(f"{cache}/*/*.so"))
    command[command.index(str(tmp_path / "run"))] = str(tmp_path / "again")
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
