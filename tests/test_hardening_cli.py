"""Hardening, round three (issue 34), the command line's part: caches that cannot be written stop nothing, no output
option writes into a run or a dataset, a resume never swaps a run's tokenizer, prompts are refused by their length
before they are tokenized, and the minor ones (a moved dataset, names with a space, metrics.jsonl as standard JSON, a
grid's progress). The plugin checks are in tests/test_plugins.py, a torchrun peer's death in
tests/test_distributed.py and the new bounds in tests/test_cli_numbers.py.

Every refusal is one line starting with `error:`, status 2, and nothing written."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.commands import build_parser, main
from lmlab.run.rundir import RunDir
from tests.helpers import (
    ALPACA_TINY,
    LMLAB,
    besides_load_notes,
    drop_root_bypass,
    refused,
    spawn,
    wait_until,
    write_config,
)


def digests(*folders: Path) -> dict[Path, bytes]:
    """Every file under the folders, by path: what must come out of a refusal unchanged."""
    return {p: p.read_bytes() for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# 5. A cache that cannot be written -------------------------------------------------------------------------------

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
    assert f"note: the peak cache {cache}/lmlab/peak_flops.json cannot be written (Permission denied)" in said
    assert "Matplotlib" not in trained.stderr and "Traceback" not in trained.stderr
    assert sampled.returncode == 0 and sampled.stdout.strip(), sampled.stderr
    assert not besides_load_notes(sampled.stderr), sampled.stderr
    assert served.returncode == 0 and served.stdout.split() == ["3", "0"], served.stdout + served.stderr
    said = compiler.stderr.strip().splitlines()  # at once: the compiler never started
    assert compiler.returncode == 1 and len(said) == 1 and said[0].startswith(f"could not write {cache}/lmlab/compiled/")
    assert "(Permission denied); make it writable for you" in said[0]
    assert not list(cache.rglob("*.pt2")) and sorted(p.name for p in cache.rglob("*")) == ["lmlab"]


# 7. No output option writes into a run or a dataset --------------------------------------------------------------

# Every option naming where a command writes, with the rest of a command line that would otherwise run.
OUTPUTS = {
    ("sample", "--out"): "sample {run} --prompts {prompts} --max-new-tokens 2 --out {target}",
    ("eval", "--samples"): "eval {run} --task {task} --samples {target}",
    ("compare", "--plot"): "compare {run} {run} --plot {target}",
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
}


MAKE_RUNS = {("train", "--run"), ("finetune", "--out"), ("finetune", "--run"), ("import-hf", "--out")}  # `destination(..., "run")`


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_run, corpus_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outputs")
    victim = Path(shutil.copytree(tiny_run, root / "victim"))
    (root / "prompts.txt").write_text("ROMEO:\n")
    (root / "task.jsonl").write_text(json.dumps({"context": "ROMEO:", "choices": [" a", " b"], "answer": 0}) + "\n")
    (root / "answers.jsonl").write_text("")
    return {"run": tiny_run, "victim": victim, "dataset": Path(RunDir(tiny_run).config().data.dataset), "corpus": corpus_dir,
            "prompts": root / "prompts.txt", "task": root / "task.jsonl", "answers": root / "answers.jsonl",
            "alpaca": ALPACA_TINY, "config": write_config(root / "tiny.toml", Path(RunDir(tiny_run).config().data.dataset))}


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


def _commands():
    from lmlab.commands.common import subcommands

    return subcommands(build_parser())


@pytest.mark.parametrize("inside", ["victim/checkpoints/step_000010/model.safetensors", "victim/metrics.jsonl",
                                    "victim/config.toml", "victim", "victim/new", "dataset/meta.json",
                                    "dataset", "dataset/new"])
@pytest.mark.parametrize("command, option", list(OUTPUTS))
def test_no_output_option_writes_into_a_run_or_a_dataset(capsys, paths, command, option, inside):
    folder, _, rest = inside.partition("/")
    target = paths[folder] / rest if rest else paths[folder]
    if inside == "victim" and (command, option) in MAKE_RUNS:
        return  # a run folder to make may be one already: its command refuses it or carries on (tests/test_faults.py)
    kept = digests(paths["victim"], paths["dataset"])
    line = refused(capsys, *OUTPUTS[(command, option)].format(**paths, target=target).split(),
                   needles=(f"{option} {target}", "run folder" if folder == "victim" else "dataset dir",
                            "choose a path outside it"))
    assert ("is the " if not rest else "is inside the ") in line
    assert digests(paths["victim"], paths["dataset"]) == kept


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


# 8. A resume never swaps a run's tokenizer -----------------------------------------------------------------------

@pytest.fixture(scope="module")
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


# 10. Prompts refused by their length before they are tokenized ---------------------------------------------------

def test_a_prompt_longer_than_the_context_can_hold_is_refused_before_it_is_tokenized(capsys, tmp_path, tiny_run):
    """The run's context is 32 tokens of one character each; a longer prompt was tokenized whole (a 21 MB line took
    3.6 GB): refused at once, and a grid's cell says why."""
    huge = "ROMEO: " * 20_000
    refused(capsys, "sample", tiny_run, "--prompt", huge, needles=("--prompt is 140,000 characters", "32 tokens",
                                                              "at most 32", "shorten it"))
    refused(capsys, "sample", tiny_run, "--chat", huge, needles=("the chat's rendered prompt is",))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{huge}\nROMEO:\n")
    assert main(["sample", str(tiny_run), "--prompts", str(prompts), "--max-new-tokens", "3", "--json", "--out",
                 str(tmp_path / "grid.json")]) == 0
    cells = json.loads((tmp_path / "grid.json").read_text())["cells"]
    assert cells[0]["why_not"].startswith("the prompt is 140,000 characters") and cells[1]["text"] is not None
    assert main(["sample", str(tiny_run), "--prompt", huge[:32], "--max-new-tokens", "2"]) == 0  # as long as fits


def test_an_instruction_longer_than_the_context_is_cut_before_it_is_tokenized(capsys, imported_gpt2):
    """Put in a prompt format, the end is what the model answers from: the left of it goes, unread."""
    assert main(["sample", str(imported_gpt2), "--instruction", "Say hi. " * 300_000, "--max-new-tokens", "2"]) == 0
    assert not besides_load_notes(capsys.readouterr().err)


# 14. The minor ones ----------------------------------------------------------------------------------------------

def test_names_with_a_space_are_refused_and_a_corpus_name_with_one_is_dashed(capsys, tmp_path, tiny_run, corpus_dir):
    config = write_config(tmp_path / "tiny.toml", Path(RunDir(tiny_run).config().data.dataset), max_iters=2)
    refused(capsys, "train", config, "--run", tmp_path / "with space", needles=("'with space'", "holds a space"))
    refused(capsys, "prepare", corpus_dir, "--tokenizer", "char", "--out-dir", tmp_path / "data", "--name", "my data",
            needles=("--name 'my data' holds a space",))
    spaced = Path(shutil.copytree(corpus_dir, tmp_path / "my corpus"))
    assert main(["prepare", str(spaced), "--tokenizer", "char", "--out-dir", str(tmp_path / "data")]) == 0
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["my-corpus-char"]
    assert not (tmp_path / "with space").exists()


STRICT = {"parse_constant": lambda name: pytest.fail(f"metrics.jsonl holds {name}, which is not JSON")}


@pytest.mark.slow
def test_metrics_are_standard_json_a_non_finite_figure_is_null(tmp_path, tiny_run):
    """A run stopped before its first evaluation ends with no best val loss: `null`, where Python's json wrote
    `Infinity`, which jq, JavaScript and pandas refuse."""
    config = write_config(tmp_path / "tiny.toml", Path(RunDir(tiny_run).config().data.dataset), max_iters=100_000)
    proc = spawn("train", config, "--run", tmp_path / "run", "--set", "train.eval_interval=100000", "--device", "cpu",
                 cwd=tmp_path)
    wait_until(lambda: any(e["event"] == "train" for e in RunDir(tmp_path / "run").events()), proc)  # in its loop
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    end = json.loads(lines[-1], **STRICT)
    assert end["event"] == "end" and end["stopped_by"] == "SIGTERM" and end["best_val_loss"] is None
    assert all(json.loads(line, **STRICT) for line in lines)
    assert main(["runs", str(tmp_path)]) == 0  # its readers take it


def test_a_grid_of_many_prompts_shows_its_progress(capsys, tmp_path, tiny_run):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET:\n" * 100)
    assert main(["sample", str(tiny_run), "--prompts", str(prompts), "--max-new-tokens", "2", "--out",
                 str(tmp_path / "grid.md")]) == 0
    err = capsys.readouterr().err
    assert "Sampling 1 run(s) × 200 prompt(s) × 1 temperature(s)..." in err
    assert "cell 200/200" in err and "/s" in err and "written to" in err
