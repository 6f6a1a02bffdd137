"""Where commands write and what happens when they cannot: no output option writes into a run or a dataset; a
destination that cannot be written, a read-only file system, a file where a folder should be, a full disk or a failed
checkpoint write is one sentence and keeps the newest checkpoint; a cache folder that cannot be written stops
nothing; a reader that goes away ends a command quietly."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.commands import build_parser, main
from lmlab.core.errors import UserError
from lmlab.core.fileio import atomic_write_text
from lmlab.run.checkpoint import load_state
from lmlab.run.rundir import RunDir
from tests.helpers import (
    ALPACA_TINY,
    LMLAB,
    besides_load_notes,
    copy_run,
    digests,
    drop_root_bypass,
    in_one_process,
    refused,
    refused_process,
    stable_events,
    write_config,
    write_corpus,
)


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
        results = in_one_process([["train", config, "--run", locked / "run"],
                            ["train", "--resume", shared, "--set", "train.max_iters=20"],
                            ["finetune", imported_gpt2, "--data", ALPACA_TINY, "--out", locked / "tuned"],
                            ["prepare", corpus_dir, "--tokenizer", "char", "--out-dir", locked / "data"],
                            ["import-hf", hf_gpt2, "--out", locked / "imported"],
                            ["export-hf", tiny_run, locked / "exported"],
                            ["report", tiny_run, "--out", locked / "report"],
                            ["answer", imported_gpt2, "--data", ALPACA_TINY, "--out", locked / "a.jsonl"],
                            ["sample", shared, "--max-new-tokens", "5"],
                            ["eval", shared, "--json"]], tmp_path, preexec_fn=drop_root_bypass)
    finally:
        for folder in [locked, *locked.rglob("*")]:
            folder.chmod(0o755)
    for status, _, err in results[:-2]:
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
        assert "(Permission denied)" in lines[0] and "make it writable for you or choose another folder" in lines[0]
        assert "free some space" not in lines[0]
    for status, _, err in results[-2:]:  # the sample was printed, the evaluation too: only not kept in the run
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
    results = in_one_process(commands, tmp_path, under=["unshare", "-m", "-r", "sh", "-c", READ_ONLY_MOUNT, "sh",
                                                        source, mounted])
    for status, _, err in results:
        assert "read-only file system" in err and "free some space" not in err and "Traceback" not in err, err
        assert status == (2 if "not kept in the run" not in err else 0), err
    assert [status for status, _, _ in results] == [2, 2, 0, 0]
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


@pytest.mark.parametrize("link", ["missing", "loop"])
def test_a_link_that_leads_nowhere_where_a_folder_should_be_is_named_with_where_it_leads(capsys, tmp_path, tiny_run,
                                                                                          corpus_dir, link):
    """A link to a missing folder, or a loop of links, as the folder a command writes or in its path."""
    blocker = tmp_path / "link"
    if link == "missing":
        blocker.symlink_to(tmp_path / "gone" / "run")
        said = (f"{blocker} is a link to {tmp_path / 'gone' / 'run'}, which does not exist: create "
                f"{tmp_path / 'gone' / 'run'}, remove the link or choose another path")
    else:
        blocker.symlink_to("other")
        (tmp_path / "other").symlink_to("link")
        said = f"{blocker} is a link to other that leads back to itself: remove the link or choose another path"
    config = write_config(tmp_path / "tiny.toml", Path(RunDir(tiny_run).config().data.dataset))
    for args in (["train", config, "--run", blocker], ["train", config, "--run", blocker / "sub"],
                 ["export-hf", tiny_run, blocker], ["report", tiny_run, "--out", blocker / "sub"],
                 ["prepare", corpus_dir, "--tokenizer", "char", "--out-dir", blocker]):
        refused(capsys, *args, needles=(said,))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["link", "tiny.toml", *(["other"] * (link == "loop"))])
    assert blocker.is_symlink() and not blocker.exists()



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
                ["eval", tiny_run, "--json"], ["eval", tiny_run], ["runs", tiny_run.parent],
                ["compare", tiny_run, tiny_run, "--json"],
                ["data", "stats", RunDir(tiny_run).config().data.dataset]]
    done = subprocess.run([sys.executable, "-c", PIPED, json.dumps([[str(a) for a in c] for c in commands])],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr and "Exception" not in done.stderr, done.stderr
    assert json.loads(done.stderr.rsplit("\n", 1)[-1]) == [141] * len(commands)  # after eval's progress lines


SERVE_ONCE = """
import json, socket, subprocess, sys, time, urllib.request
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = subprocess.Popen([sys.argv[1], "serve", sys.argv[2], "--port", str(port), "--no-compile", "--device", "cpu"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
while True:  # 503 while the run loads, 200 once it is ready; a server that stopped says why on stderr
    try:
        urllib.request.urlopen(f"{url}/health", timeout=5)
        break
    except OSError:  # not listening yet, 503 while loading, or too busy loading to answer within 5 s
        if server.poll() is not None or time.monotonic() > deadline:
            sys.exit(server.communicate(timeout=30)[1])
        time.sleep(0.1)
request = urllib.request.Request(f"{url}/v1/completions", data=b'{"prompt": "RO", "max_tokens": 3}',
                                 headers={"Content-Type": "application/json"})
print(json.loads(urllib.request.urlopen(request, timeout=60).read())["usage"]["completion_tokens"])
server.terminate()
print(server.wait(timeout=30))
"""


@pytest.mark.slow
def test_a_cache_folder_that_cannot_be_written_stops_nothing(tmp_path, tiny_run):
    """train, sample (of a run whose dtype `auto` measures the peaks), serve --no-compile and the compiler of the
    kept step, as a user for whom the cache folder is read-only: each works, the peak and the font list measured or
    built again, with a note where the command shows the peak; the compiler says so before compiling anything."""
    cache = tmp_path / "cache"
    (cache / "lmlab").mkdir(parents=True)
    for folder in (cache / "lmlab", cache):
        folder.chmod(0o555)
    auto = Path(shutil.copytree(tiny_run, tmp_path / "auto"))
    (auto / "config.toml").write_text((auto / "config.toml").read_text().replace('dtype = "float32"', 'dtype = "auto"'))
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "COLUMNS": "200"}
    config = write_config(tmp_path / "tiny.toml", Path(RunDir(tiny_run).config().data.dataset), max_iters=2)

    def as_a_user(*command: object) -> subprocess.CompletedProcess:
        return subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env, cwd=tmp_path,
                              preexec_fn=drop_root_bypass, timeout=300)

    try:
        trained = as_a_user(LMLAB, "train", config, "--run", tmp_path / "new", "--device", "cpu")
        sampled = as_a_user(LMLAB, "sample", auto, "--max-new-tokens", "5", "--device", "cpu")
        served = as_a_user(sys.executable, "-c", SERVE_ONCE, LMLAB, auto)
        folder = RunDir(auto).checkpoint("best")
        compiler = as_a_user(sys.executable, "-m", "lmlab.inference.compiled", auto, folder,
                             json.loads((folder / "state.json").read_text())["files"]["model.safetensors"], "2",
                             "float32", "1", "cpu")
    finally:
        for folder in (cache, cache / "lmlab"):
            folder.chmod(0o755)
    said = " ".join(trained.stdout.split())
    assert trained.returncode == 0 and "best val loss" in said, trained.stdout + trained.stderr
    assert f"note: the machine cache {cache}/lmlab/.machine.json.lock cannot be written (Permission denied" in said
    assert "Matplotlib" not in trained.stderr and "Traceback" not in trained.stderr
    assert sampled.returncode == 0 and sampled.stdout.strip(), sampled.stderr
    assert besides_load_notes(sampled.stderr).startswith("generated "), sampled.stderr  # its speed line alone
    assert served.returncode == 0 and served.stdout.split() == ["3", "0"], served.stdout + served.stderr
    said = compiler.stderr.strip().splitlines()  # at once: the compiler never started
    assert compiler.returncode == 1 and len(said) == 1
    assert said[0].startswith(f"could not write {cache}/lmlab/compiled/")
    assert "(Permission denied); make it writable for you" in said[0]
    assert not list(cache.rglob("*.pt2")) and sorted(p.name for p in cache.rglob("*")) == ["lmlab"]


# Every option naming where a command writes, with the rest of a command line that would otherwise run.
OUTPUTS = {
    ("sample", "--out"): "sample {run} --prompts {prompts} --max-new-tokens 2 --out {target}",
    ("eval", "--samples"): "eval {run} --task {task} --samples {target}",
    ("compare", "--plot"): "compare {run} {run} --plot {target}",
    ("log", "--plot"): "log {run} --plot {target}",
    ("scaling", "--plot"): "scaling {run} {run} --plot {target}",
    ("answer", "--out"): "answer {run} --data {alpaca} --max-new-tokens 2 --out {target}",
    ("judge", "--out"): "judge --answers {answers} --endpoint http://127.0.0.1:9/v1 --model m --out {target}",
    ("report", "--out"): "report {run} --no-eval --out {target}",
    ("export-hf", "OUT"): "export-hf {run} {target}",
    ("export-gguf", "OUT"): "export-gguf {run} {target}",
    ("import-hf", "--out"): "import-hf {run} --out {target}",
    ("train", "--run"): "train {config} --run {target}",
    ("finetune", "--out"): "finetune {run} --data {alpaca} --out {target}",
    ("finetune", "--run"): "finetune {run} --data {alpaca} --run {target}",  # --out's old spelling
    ("prepare", "--out-dir"): "prepare {corpus} --tokenizer char --out-dir {target}",
    ("sweep", "--dir"): "sweep {config} --set train.max_iters=1,2 --dir {target}",
    ("scaling", "--dir"): "scaling {config} --refit --dir {target}",
}


# `destination(..., "run")`
MAKE_RUNS = {("train", "--run"), ("finetune", "--out"), ("finetune", "--run"), ("import-hf", "--out")}


@pytest.fixture(scope="session")
def paths(tmp_path_factory, tiny_run, corpus_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outputs")
    victim = Path(shutil.copytree(tiny_run, root / "victim"))
    (root / "prompts.txt").write_text("ROMEO:\n")
    (root / "task.jsonl").write_text(json.dumps({"context": "ROMEO:", "choices": [" a", " b"], "answer": 0}) + "\n")
    (root / "answers.jsonl").write_text("")
    dataset = Path(RunDir(tiny_run).config().data.dataset)
    return {"run": tiny_run, "victim": victim, "dataset": dataset, "corpus": corpus_dir,
            "prompts": root / "prompts.txt", "task": root / "task.jsonl", "answers": root / "answers.jsonl",
            "alpaca": ALPACA_TINY, "config": write_config(root / "tiny.toml", dataset)}


def _outputs(parser: argparse.ArgumentParser, prefix: str = "") -> dict[tuple[str, str], argparse.Action]:
    """(command, option) of every option or positional typed as a destination, through the subcommands."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= _outputs(sub, f"{prefix} {name}".strip())
        elif hasattr(action.type, "destination"):
            found[(prefix, (action.option_strings or [action.dest.upper()])[0])] = action
    return found


def test_every_option_naming_a_destination_goes_through_the_one_check():
    checked = _outputs(build_parser())
    assert set(checked) == set(OUTPUTS), "give a new output option type=destination(...) and a row in OUTPUTS"
    # An option named like an output but not typed as one would write wherever it is told.
    named = {(command, (a.option_strings or [a.dest.upper()])[0]) for command, _, sub in _commands()
             for a in sub._actions if a.dest in ("out", "out_dir", "plot", "samples") or (a.metavar or "") == "DIR"
             and a.dest != "runs"}
    assert named <= set(checked), sorted(named - set(checked))


@pytest.mark.parametrize("where", ["the output", "a folder of it"])
@pytest.mark.parametrize("command, option", list(OUTPUTS))
def test_a_loop_of_links_as_any_output_is_refused_and_both_links_stay(capsys, paths, tmp_path, command, option, where):
    """A loop of links has no file at its end to write: every output (a file or a folder, checked as the command line
    is parsed) and the one writer under them refuse it in one sentence, never renaming a file over a link."""
    (tmp_path / "loopa").symlink_to("loopb")
    (tmp_path / "loopb").symlink_to("loopa")
    target = tmp_path / "loopa" if where == "the output" else tmp_path / "loopa" / "out"
    refused(capsys, *OUTPUTS[(command, option)].format(**paths, target=target).split(),
            needles=(f"{option} {tmp_path / 'loopa'} is a link to loopb that leads back to itself: remove the link or "
                     "choose another path",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loopa", "loopb"]
    assert os.readlink(tmp_path / "loopa") == "loopb" and os.readlink(tmp_path / "loopb") == "loopa"
    with pytest.raises(UserError, match="leads back to itself"):  # what a command writes with no option too
        atomic_write_text(target, "x")
    assert os.readlink(tmp_path / "loopa") == "loopb"


def _commands():
    from lmlab.commands.common import subcommands

    return subcommands(build_parser())


@pytest.mark.parametrize("inside", ["victim/checkpoints/step_000010/model.safetensors", "victim/metrics.jsonl",
                                    "victim/config.toml", "victim", "victim/new", "dataset/meta.json",
                                    "dataset", "dataset/new"])
@pytest.mark.parametrize("command, option", list(OUTPUTS))
@pytest.mark.slow
def test_no_output_option_writes_into_a_run_or_a_dataset(capsys, paths, command, option, inside):
    folder, _, rest = inside.partition("/")
    target = paths[folder] / rest if rest else paths[folder]
    if inside == "victim" and (command, option) in MAKE_RUNS:
        return  # a run folder to make may be one already: its command refuses it or carries on (test_locks.py)
    kept = digests(paths["victim"], paths["dataset"])
    line = refused(capsys, *OUTPUTS[(command, option)].format(**paths, target=target).split(),
                   needles=(f"{option} {target}", "run folder" if folder == "victim" else "dataset dir",
                            "choose a path outside it"))
    assert ("is the " if not rest else "is inside the ") in line
    assert digests(paths["victim"], paths["dataset"]) == kept


@pytest.mark.slow
def test_a_runs_own_report_folder_and_paths_beside_runs_are_taken(capsys, paths, tmp_path):
    assert main(["report", str(paths["run"]), "--no-eval", "--out", str(paths["run"] / "report")]) == 0
    refused(capsys, "report", paths["run"], "--no-eval", "--out", paths["run"] / "report" / "deeper",
            needles=("is inside the run folder",))
    assert main(["compare", str(paths["run"]), str(paths["run"]), "--plot", str(tmp_path / "beside.png")]) == 0
    assert (tmp_path / "beside.png").read_bytes()[:4] == b"\x89PNG"
    link = tmp_path / "link"
    link.symlink_to(paths["victim"])  # through a link, the folder it names
    kept = digests(paths["victim"])
    refused(capsys, "compare", paths["run"], paths["run"], "--plot", link / "loss.png", needles=("is inside the run",))
    assert digests(paths["victim"]) == kept


def test_a_grid_written_by_default_into_a_run_folder_is_refused(capsys, paths, monkeypatch):
    monkeypatch.chdir(paths["victim"])  # `sample --prompts` writes prompt-grid.md where it is run
    refused(capsys, "sample", paths["run"], "--prompts", paths["prompts"], "--max-new-tokens", "2",
            needles=("--out prompt-grid.md is inside the run folder",))
    assert not (paths["victim"] / "prompt-grid.md").exists()


@pytest.mark.slow
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
    # Agreed like a stop signal caught during step 30's eval: the run ends after that step, writing nothing more.
    refused_process(done, "stopped at step 30", "loss.png could not be written", "File too large",
                    "newest checkpoint (step_000020) is kept", f"lmlab train --resume {run}")
    leftovers = [p.name for p in [*run.iterdir(), *(run / "checkpoints").iterdir()] if p.name.startswith(".")]
    assert not leftovers and load_state(RunDir(run).checkpoint("latest"))["step"] == 20
    assert main(["train", "--resume", str(run), *more]) == 0
    assert stable_events(run) == stable_events(whole)  # resumed exactly, as after a stop signal


@pytest.mark.slow
def test_after_a_failed_checkpoint_log_and_runs_hold_the_best_the_run_kept(tmp_path, trained, capsys):
    """A checkpoint never written (the file size limit fails it) is no new best: `log` and `runs` give step 20's,
    the best the run holds and resumes from, not step 30's."""
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
    """The lock's holder line, the first write of every writer, is reported as every failed write is, naming the
    file (never `error: a file: ...`). /dev/full fails every write, as a full disk does."""
    run = copy_run(trained, tmp_path)
    (tmp_path / ".run.lock").symlink_to("/dev/full")
    refused(capsys, "train", "--resume", run, needles=(f"could not write {tmp_path / '.run.lock'} (",))
    assert load_state(RunDir(run).checkpoint("latest"))["step"] == 20  # nothing was trained, nothing lost


@pytest.mark.slow
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
                          capture_output=True, text=True, preexec_fn=no_files)  # one sentence, not a traceback
    refused_process(done, "tokenizer.json (File too large", "free on its disk")


# The outputs that are one file and that OUTPUTS' lines write whole (scaling's needs two sizes, answer's a chat run,
# judge's a judge): a PNG, JSON lines and a grid, through the writer every output uses.
FILE_OUTPUTS = [("sample", "--out"), ("eval", "--samples"), ("compare", "--plot"), ("log", "--plot")]


def _socket(path: Path) -> Path:
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    return path


@pytest.mark.parametrize("command, option", FILE_OUTPUTS)
@pytest.mark.slow
def test_an_output_path_is_replaced_only_when_it_is_a_regular_file(capsys, paths, tmp_path, command, option):
    """A link is followed and stays a link; a character device (/dev/null) is written through and stays a device, and
    one that fails every write (/dev/full) is one sentence; a socket, a folder or anything else is refused."""
    line = OUTPUTS[(command, option)]
    real = tmp_path / "real.out"
    real.write_text("old")
    (tmp_path / "link").symlink_to(real)
    for target in (tmp_path / "link", "/dev/null"):
        code = main(line.format(**paths, target=target).split())
        assert code == 0, capsys.readouterr().err
        capsys.readouterr()
    assert (tmp_path / "link").is_symlink() and real.read_bytes() not in (b"", b"old")
    assert Path("/dev/null").is_char_device()
    if Path("/dev/full").exists():  # found out by writing, after the work: its progress lines come before
        assert main(line.format(**paths, target="/dev/full").split()) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "error: could not write /dev/full (No space left on device); name a regular file instead, then run the "
            "command again.")
    for where, what in ((_socket(tmp_path / "sock"), "a socket"), (tmp_path, "a folder")):
        refused(capsys, *line.format(**paths, target=where).split(),
                needles=(f"{option} {where} is {what}, not a file",))
    assert (tmp_path / "sock").is_socket() and not list(tmp_path.glob(".*tmp*"))


def test_the_one_writer_writes_a_named_pipe_through_and_refuses_a_disk(tmp_path):
    """Through the library: a named pipe's reader gets the bytes; a block device (the kind of /dev/sda) is refused
    before anything is written; a dangling link makes the file it names."""
    import stat
    import threading

    from lmlab.core.fileio import NOT_OUTPUTS, output_target

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(pipe.read_bytes()))
    reader.start()
    atomic_write_text(pipe, "through")
    reader.join(timeout=60)
    assert got == [b"through"] and stat.S_ISFIFO(os.stat(pipe).st_mode)
    (tmp_path / "dangling").symlink_to(tmp_path / "made.txt")
    atomic_write_text(tmp_path / "dangling", "made")
    assert (tmp_path / "made.txt").read_text() == "made" and (tmp_path / "dangling").is_symlink()
    assert stat.S_IFBLK in NOT_OUTPUTS  # a disk is never a stream to write through
    disks = [p for p in Path("/dev").iterdir() if p.is_block_device()]
    for disk in disks[:1]:
        with pytest.raises(UserError, match=f"{disk} is a block device"):
            output_target(disk)


def test_no_module_renames_over_a_path_but_the_one_writer():
    """Every rename in lmlab is the one writer's (core/fileio.py `replacing`) or moves what lmlab made into a place it
    owns: a new output cannot replace a device or a link by renaming over it."""
    import ast

    allowed = {"lmlab/core/fileio.py": 1,  # `replacing`
               "lmlab/data/prepare.py": 2, "lmlab/data/shards.py": 1,  # a dataset dir and its work folder's shards
               "lmlab/run/checkpoint.py": 1, "lmlab/hf/folder.py": 1,  # a step folder, an export folder made new
               "lmlab/inference/compiled.py": 1}  # the compiled steps' own cache
    found: dict[str, int] = {}
    for module in Path("lmlab").rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            # os.replace/rename(a, b), or a Path's replace/rename(target): a str's replace(old, new) takes two
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "replace", "rename") and (isinstance(node.func.value, ast.Name) and node.func.value.id == "os"
                                              or len(node.args) == 1 and not node.keywords):
                found[str(module)] = found.get(str(module), 0) + 1
    assert found == allowed
