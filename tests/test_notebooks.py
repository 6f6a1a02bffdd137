"""docs/notebooks/ run top to bottom on a real Jupyter kernel (nbclient), at tiny budgets: each has a cell tagged
`parameters` (as papermill has), after which the test puts a cell of its own. And a run trained in a notebook's
cell stops on Kernel > Interrupt with a checkpoint, and resumes to the numbers of a run never interrupted."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient
from rich.console import Console

import lmlab
from tests.helpers import stable_events, write_config

NOTEBOOKS = Path(__file__).parent.parent / "docs" / "notebooks"


def execute(name: str, folder: Path, parameters: dict[str, object],
            replace: dict[str, str] | None = None) -> nbformat.NotebookNode:
    """The notebook run in `folder` with `parameters` set after its parameters cell, and each text of `replace` in its
    code (found in one cell at least) replaced as README's `docs-test: replace` does; a cell that raises fails it."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    for old, new in (replace or {}).items():
        cells = [cell for cell in notebook.cells if cell.cell_type == "code" and old in cell.source]
        assert cells, f"{old!r} is in no code cell of {name}"
        for cell in cells:
            cell.source = cell.source.replace(old, new)
    at = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{key} = {value!r}" for key, value in parameters.items()))
    notebook.cells.insert(at + 1, injected)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(folder)}}).execute()
    return notebook


def outputs(cell: nbformat.NotebookNode, kind: str) -> list[str]:
    """A cell's outputs of one MIME type (text/plain, text/html, image/png), and its printed text as text/plain."""
    found = [out.get("data", {}).get(kind) for out in cell.outputs] + [
        out.get("text") for out in cell.outputs if kind == "text/plain" and out.output_type == "stream"]
    return [text for text in found if text]


def cell_with(notebook: nbformat.NotebookNode, code: str) -> nbformat.NotebookNode:
    return next(cell for cell in notebook.cells if cell.cell_type == "code" and code in cell.source)


def test_the_notebooks_are_committed_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code and all(not cell.outputs and cell.execution_count is None for cell in code), path.name


@pytest.mark.slow
def test_the_quickstart_runs_on_a_kernel(tmp_path, corpus_dir):
    """Its runs train a few steps, not BUDGET: a budget counts start-up, which a loaded machine can stretch past any
    small budget (refused before a step), and nothing the notebook shows depends on how long it trained. A budget is
    the command line's and tests/test_budget.py's, as in README's Python block."""
    steps = {"budget=BUDGET": "max_iters=10, eval_interval=5, eval_iters=2"}
    notebook = execute("quickstart.ipynb", tmp_path, {"CORPUS": str(corpus_dir), "DEVICE": "cpu"}, replace=steps)
    runs = sorted((tmp_path / "runs").iterdir())
    assert [run.name.rsplit("-", 1)[1] for run in runs] == ["gpt2", "modern"]
    assert all([e["step"] for e in lmlab.Run(run).events if e["event"] == "end"] == [10] for run in runs)
    training = cell_with(notebook, "first = lmlab.train(")
    assert any("train step" in text for text in outputs(training, "text/plain"))  # the bar, updated in place
    assert any("<progress" in text for text in outputs(training, "text/html"))
    assert any("best val loss" in text for text in outputs(training, "text/plain"))
    compared = cell_with(notebook, "comparison = lmlab.compare(")
    assert [out.output_type for out in compared.outputs] == ["execute_result"]  # the HTML table, and nothing else
    assert all(f">{run.name}<" in compared.outputs[0].data["text/html"] for run in runs)
    for plot in ("first.plot()", "comparison.plot("):
        assert len(outputs(cell_with(notebook, plot), "image/png")) == 1  # shown once, inline
    assert "GPT," in "".join(outputs(cell_with(notebook, "model = second.model("), "text/plain"))
    assert "'perplexity'" in "".join(outputs(cell_with(notebook, "second.eval("), "text/plain"))


@pytest.mark.slow
def test_the_study_notebook_runs_on_a_kernel(tmp_path, writing_char_run):
    text = "ROMEO:\nLove night day sweet death fair,\nThou art the sun,\n"
    notebook = execute("study.ipynb", tmp_path, {"RUN": str(writing_char_run), "TEXT": text, "LAYER": 1, "HEAD": 1})
    assert "torch.Size([" in "".join(outputs(cell_with(notebook, "weights = head_weights("), "text/plain"))
    losses = cell_with(notebook, "F.cross_entropy(")
    assert outputs(losses, "image/png") and "nats: " in "".join(outputs(losses, "text/plain"))


@pytest.mark.slow
def test_the_study_notebook_as_shipped_studies_the_newest_run_and_says_what_another_kind_cannot_show(
        tmp_path, char_dataset, writing_char_run):
    """As shipped (RUN None) the notebook studies the run written to last, wherever `make demo` wrote it
    (runs/demo-<timestamp>); a model of another kind than lmlab's GPT (a recurrent one) shows its evaluations and
    losses, and one sentence says why not its attention."""
    shutil.copytree(writing_char_run, tmp_path / "runs" / "demo-20250101-120000")
    config = write_config(tmp_path / "gru.toml", char_dataset, max_iters=10)
    lmlab.train(config, run=tmp_path / "runs" / "gru", set=["model.kind=recurrent"], console=Console(quiet=True))
    text = "ROMEO:\nLove night day sweet death fair,\n"  # the characters of the tests' corpus
    notebook = execute("study.ipynb", tmp_path, {"RUNS": ["runs"], "TEXT": text})
    assert "gru" in "".join(outputs(cell_with(notebook, "lmlab.Run.newest("), "text/html"))
    said = "".join(outputs(cell_with(notebook, "GPT = "), "text/plain"))
    assert "gru is a recurrent model, not lmlab's GPT: its attention (if it has any) is not where this notebook" in said
    assert not outputs(cell_with(notebook, "ax.imshow("), "image/png")
    losses = cell_with(notebook, "F.cross_entropy(")
    assert outputs(losses, "image/png") and "nats: " in "".join(outputs(losses, "text/plain"))


@pytest.mark.slow
def test_a_run_in_a_notebook_stops_on_interrupt_and_resumes_exactly(tmp_path, char_dataset):
    config = write_config(tmp_path / "tiny.toml", char_dataset, max_iters=120)
    run, whole = tmp_path / "run", tmp_path / "whole"
    lmlab.train(config, run=whole, device="cpu", threads=1, console=Console(quiet=True))
    manager, kernel = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        kernel.execute_interactive("import lmlab", timeout=120)
        asked = kernel.execute(f"run = lmlab.train({str(config)!r}, run={str(run)!r}, device='cpu', threads=1)")
        metrics, started = run / "metrics.jsonl", time.monotonic()
        while not (metrics.exists() and '"event": "train"' in metrics.read_text()):
            assert time.monotonic() - started < 300, "the run never logged a step"
            time.sleep(0.02)
        manager.interrupt_kernel()  # Kernel > Interrupt: SIGINT to the kernel, whose cell runs the training
        said = replies(kernel, asked)
        assert said["status"] == "ok" and "stopped by SIGINT at step" in said["text"], said
        assert f'Continue with: lmlab.train(resume="{run}")' in said["text"]
        assert "no final score: the run was stopped before it" in " ".join(said["text"].split())
        said = replies(kernel, kernel.execute(f"lmlab.train(resume={str(run)!r}, device='cpu')"))
        assert said["status"] == "ok" and "best val loss" in said["text"], said
        said = replies(kernel, kernel.execute("lmlab.Run('nowhere')"))  # a mistake is its sentence, no traceback
        assert said["traceback"] == ["UserError: nowhere is not an lmlab run (no config.toml); pass a directory made "
                                     "by `lmlab train`, `lmlab finetune` or `lmlab import-hf`."]
    finally:
        manager.shutdown_kernel(now=True)
    # The stop's own checkpoint is in the record (it was written, between the interval's); nothing else differs.
    stop_step = next(e["step"] for e in lmlab.Run(run).events if e["event"] == "resume")
    stops = {"event": "checkpoint", "step": stop_step, "best": False}
    assert [e for e in stable_events(run) if e != stops or stops in stable_events(whole)] == stable_events(whole)


def replies(kernel, asked: str) -> dict:
    """What a cell showed (its text without rich's colours, its lines joined: rich wraps them at the notebook's
    width) and its reply's status and traceback."""
    text = []
    while True:
        message = kernel.get_iopub_msg(timeout=300)
        if message["parent_header"].get("msg_id") != asked:
            continue
        if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
            break
        content = message["content"]
        text.append(content.get("text") or content.get("data", {}).get("text/plain", ""))
    reply = kernel.get_shell_msg(timeout=60)["content"]
    return {"status": reply["status"], "traceback": reply.get("traceback"),
            "text": " ".join(re.sub(r"\x1b\[[0-9;]*m", "", "".join(text)).split())}
