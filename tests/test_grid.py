"""Prompt grids: `sample RUN RUN --prompts FILE --temperature 0,0.8` draws every run x prompt x temperature, each
cell the text `sample --prompt P --temperature T` gives alone; a prompt a run cannot encode is a cell saying why;
prompts files that hold none, or are not UTF-8, are refused with nothing written; a grid of many prompts shows its
progress; a chat-aware grid asks an instruct model in its template and continues a base model."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lmlab.commands import main
from lmlab.core.config_toml import load_config
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from tests.helpers import LMLAB, run_cli, write_config


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory, char_dataset) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("grid")
    config = write_config(root / "tiny.toml", char_dataset, max_iters=10)
    return tuple(Trainer(train_job(load_config(config, overrides), root / name, "cpu")).run().run_dir
                 for name, overrides in (("deep", []), ("shallow", ["model.n_layer=1"])))


@pytest.mark.slow
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
@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_stopped_grid_keeps_and_writes_the_cells_that_ended(tmp_path, two_runs):
    """SIGTERM stops `sample --prompts` as a stop does (never silently, status -15), and every cell that ended is
    kept and written, without waiting for the rest of its run's cells or the grid's."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"ROMEO: {word}" for word in ("fair", "sweet", "night", "love", "day")))
    samples = [run / "samples.txt" for run in two_runs]

    def entries(path: Path) -> int:
        return path.read_text().count("--- checkpoint ") if path.exists() else 0

    kept = [entries(path) for path in samples]
    out = tmp_path / "grid.json"
    proc = subprocess.Popen([LMLAB, "sample", *map(str, two_runs), "--prompts", str(prompts), "--temperature",
                             "0,0.8", "--max-new-tokens", "1000", "--json", "--out", str(out), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while entries(samples[0]) <= kept[0]:  # a cell has ended
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    ended = [c for c in json.loads(out.read_text())["cells"] if c["text"] is not None]
    assert proc.returncode == 143 and not stdout, stderr
    assert stderr.splitlines()[-1] == (f"stopped by SIGTERM after {len(ended)} of 20 cells: the {len(ended)} that "
                                       f"ended are written to {out} (and each to its run's samples.txt)")
    added = sum(map(entries, samples)) - sum(kept)
    assert 1 <= len(ended) == added < 20
    cells = json.loads(out.read_text())["cells"]
    assert len(cells) == 20 and {c["why_not"] for c in cells if c["text"] is None} == {
        "stopped by SIGTERM before it ended"}


def test_a_grid_of_many_prompts_shows_its_progress(capsys, tmp_path, tiny_run):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET:\n" * 100)
    assert main(["sample", str(tiny_run), "--prompts", str(prompts), "--max-new-tokens", "2", "--out",
                 str(tmp_path / "grid.md")]) == 0
    err = capsys.readouterr().err
    assert "Sampling 1 run(s) × 200 prompt(s) × 1 temperature(s)..." in err
    assert "cell 200/200" in err and "/s" in err and "written to" in err


@pytest.fixture(scope="session")
def base_and_instruct(tmp_path_factory, corpus_dir, char_dataset):
    """A trained lmlab run (char) and an imported instruct model (Qwen2.5-style template), both tiny."""
    from lmlab.core.config_toml import load_config
    from lmlab.hf import import_hf
    from lmlab.train.loop import Trainer
    from lmlab.train.preflight import train_job

    pytest.importorskip("transformers")
    from tests.hf_reference import hf_chat_model

    root = tmp_path_factory.mktemp("grid")
    base = Trainer(train_job(load_config(write_config(root / "tiny.toml", char_dataset, max_iters=10)), root / "base",
                   "cpu")).run().run_dir
    import_hf(hf_chat_model(root / "Qwen2.5-tiny-Instruct", "qwen2.5", corpus_dir), root / "instruct")
    return base, root / "instruct"


@pytest.mark.slow
def test_a_chat_aware_grid_asks_an_instruct_model_in_its_template_and_continues_a_base_model(base_and_instruct,
                                                                                           tmp_path, capsys):
    base, instruct = base_and_instruct
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET: thou art fair\n")  # the base run's char tokenizer has their characters
    code, out, err = run_cli(capsys, "sample", base, instruct, "--prompts", prompts, "--chat", "--temperature", "0",
                             "--max-new-tokens", "8", "--json", "--out", tmp_path / "grid.json", "--device", "cpu")
    assert code == 0, err
    grid = json.loads((tmp_path / "grid.json").read_text())
    assert grid["chat"] is True and len(grid["cells"]) == 4
    asked = {(c["run"], c["prompt"]): c for c in grid["cells"]}
    assert {c["asked"] for (run, _), c in asked.items() if run == "base"} == {"continued"}
    assert {c["asked"] for (run, _), c in asked.items() if run == "instruct"} == {"asked through its chat template"}
    for prompt in ("ROMEO:", "JULIET: thou art fair"):  # each cell is what one run alone answers or continues
        code, alone, _ = run_cli(capsys, "sample", instruct, "--chat", prompt, "--temperature", "0",
                                 "--max-new-tokens", "8", "--device", "cpu")
        assert alone == asked[("instruct", prompt)]["text"] + "\n"
        code, alone, _ = run_cli(capsys, "sample", base, "--prompt", prompt, "--temperature", "0",
                                 "--max-new-tokens", "8", "--device", "cpu")
        assert alone == prompt + asked[("base", prompt)]["text"] + "\n"
    code, _, err = run_cli(capsys, "sample", base, "--chat")
    assert code == 2 and "--chat alone asks a grid's prompts" in err

    code, _, err = run_cli(capsys, "report", base, instruct, "--prompts", prompts, "--chat", "--temperature", "0",
                           "--max-new-tokens", "8", "--no-eval", "--out", tmp_path / "report", "--device", "cpu")
    report = (tmp_path / "report" / "report.md").read_text()
    assert code == 0 and "`instruct`, asked through its chat template, temperature 0" in report, err
    assert "`base`, continued, temperature 0" in report
    summary = report.split("## Machine")[0]
    assert "`instruct` is imported: its [data] and [train] are left out" in summary and "`train." not in summary
