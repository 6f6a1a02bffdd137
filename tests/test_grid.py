"""Prompt grids: `sample RUN RUN --prompts FILE --temperature 0,0.8` draws every run x prompt x temperature, each
cell the text `sample --prompt P --temperature T` gives alone; a prompt a run cannot encode is a cell saying why;
prompts files that hold none, or are not UTF-8, are refused with nothing written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmlab.core.config import load_config
from lmlab.train.loop import Trainer
from tests.conftest import write_config
from tests.test_plugins import run_cli


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, char_dataset) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("grid")
    config = write_config(root / "tiny.toml", char_dataset, max_iters=10)
    return tuple(Trainer(load_config(config, overrides), root / name, "cpu").run().run_dir
                 for name, overrides in (("deep", []), ("shallow", ["model.n_layer=1"])))


def test_a_grid_is_every_run_prompt_and_temperature_as_each_would_be_sampled_alone(tmp_path, two_runs, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\\n\n\nJULIET: fair night\nZ€\n", encoding="utf-8")  # \n: a line break; blank skipped
    code, out, err = run_cli(capsys, "sample", *two_runs, "--prompts", prompts, "--temperature", "0,0.8", "--seed",
                             "7", "--max-new-tokens", "12", "--json", "--out", tmp_path / "grid.json")
    grid = json.loads(out)
    assert code == 0 and grid == json.loads((tmp_path / "grid.json").read_text()), err
    assert grid["prompts"] == ["ROMEO:\n", "JULIET: fair night", "Z€"] and grid["temperatures"] == [0.0, 0.8]
    assert len(grid["cells"]) == 2 * 3 * 2
    for cell in grid["cells"]:
        if cell["prompt"] == "Z€":  # neither 'Z' nor '€' is in the char tokenizer's corpus
            assert cell["text"] is None and "never saw ('Z€')" in cell["why_not"]
            continue
        run = next(r for r in two_runs if r.name == cell["run"])
        code, alone, _ = run_cli(capsys, "sample", run, "--prompt", cell["prompt"], "--temperature",
                                 str(cell["temperature"]), "--seed", "7", "--max-new-tokens", "12")
        assert alone == cell["prompt"] + cell["text"] + "\n" and cell["tokens"] == 12

    code, markdown, err = run_cli(capsys, "sample", *two_runs, "--prompts", prompts, "--temperature", "0,0.8",
                                  "--max-new-tokens", "4", "--out", tmp_path / "grid.md")
    assert code == 0 and markdown == (tmp_path / "grid.md").read_text()
    assert markdown.count("`deep`, temperature 0.8") == 3 and "### Prompt 3" in markdown
    assert "no text: the prompt contains characters the char tokenizer never saw" in markdown


@pytest.mark.parametrize("content, message", [
    (b"", "holds no prompts; write one per line"),
    (b"\n  \n", "holds no prompts; write one per line"),
    (b"ROMEO:\n\xff\xfe JULIET\n", r"is not UTF-8 text \(byte 7 is b'\\xff'\); save it as UTF-8."),
])
def test_a_prompts_file_with_no_prompts_or_not_utf8_is_refused_and_nothing_is_written(tmp_path, two_runs, capsys,
                                                                                      content, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    samples = [(run / "samples.txt").read_text() if (run / "samples.txt").exists() else None for run in two_runs]
    for command in (["sample", *two_runs], ["report", *two_runs, "--out", tmp_path / "report"]):
        code, _, err = run_cli(capsys, *command, "--prompts", prompts)
        assert code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "report").exists() and not Path("prompt-grid.md").exists()
    assert samples == [(run / "samples.txt").read_text() if (run / "samples.txt").exists() else None
                       for run in two_runs]


def test_grid_options_that_do_not_go_together_are_refused(two_runs, capsys):
    for extra, message in ((["--prompt", "A", "--prompts", "x.txt"], "--prompt and --prompts both name prompts"),
                           (["--chat", "Hi", "--prompts", "x.txt"], "--prompts and --chat TEXT both name prompts"),
                           (["--system", "Be brief."], "ask --system of one run at a time"),
                           (["--num-samples", "2"], "--num-samples draws several continuations of one prompt")):
        code, _, err = run_cli(capsys, "sample", *two_runs, *extra)
        assert code == 2 and message in err, err
    code, _, err = run_cli(capsys, "sample", two_runs[0], "--json")
    assert code == 2 and "--json goes with a prompt grid" in err
    code, _, err = run_cli(capsys, "compare", *two_runs, "--prompt", "A", "--temperature", "0,1")
    assert code == 2 and "--temperature" in err
