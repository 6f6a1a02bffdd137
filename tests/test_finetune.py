"""Instruction fine-tuning: response-only labels, a deterministic held-out split, val loss per epoch with the
best epoch kept, and the prompt format used again by `sample --instruction`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from lmlab.commands import main
from lmlab.core import threads
from lmlab.core.busy import Load, cores
from lmlab.core.errors import UserError
from lmlab.data.tokenizers import EOT, train_tokenizer
from lmlab.model.loss import IGNORE
from lmlab.run.prompt import alpaca_format, read_records
from lmlab.run.rundir import RunDir
from lmlab.train.finetune import Finetuner, _batch, encode_example, split_records
from lmlab.train.loop import Trainer
from tests.helpers import ALPACA_TINY, LMLAB, hog

RECORD = {"instruction": "Repeat the word twice.", "input": "moon", "output": "moon moon"}


@pytest.mark.parametrize("spec", ["bpe:300", "char"])
def test_the_loss_covers_exactly_the_response_and_its_end_marker(spec):
    # A corpus with every character of the template and the records, so the char tokenizer can encode them.
    texts = [alpaca_format(train_tokenizer("char", ["x"], ["x"])).render("x", "y") + ALPACA_TINY.read_text()]
    tokenizer = train_tokenizer(spec, texts, texts)
    fmt = alpaca_format(tokenizer)
    assert fmt.end == (EOT if spec.startswith("bpe") else "\n\n")
    ids, scored = encode_example(tokenizer, fmt, RECORD)
    assert tokenizer.decode(t for t, s in zip(ids, scored) if s) == "moon moon" + fmt.end
    assert tokenizer.decode(t for t, s in zip(ids, scored) if not s) == fmt.render("Repeat the word twice.", "moon")
    assert scored == sorted(scored)  # the prompt first, then the answer: one contiguous scored tail
    x, y = _batch([(ids, scored), (ids[:5] + ids[-3:], scored[:5] + scored[-3:])])
    assert x.shape == y.shape == (2, len(ids) - 1)
    assert y[0][y[0] != IGNORE].tolist() == [t for t, s in zip(ids[1:], scored[1:]) if s]
    assert (y[1, 7:] == IGNORE).all()  # padding is never scored


def test_the_held_out_split_is_deterministic_and_disjoint():
    records = read_records(ALPACA_TINY)
    train, val = split_records(records, 0.1)
    assert len(val) == 8 and len(train) == 72
    shuffled_val = split_records(list(reversed(records)), 0.1)[1]
    assert sorted(map(json.dumps, shuffled_val)) == sorted(map(json.dumps, val))  # chosen by content, not order
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in val}


@pytest.mark.slow
def test_a_fine_tune_is_the_training_loop_with_its_own_hooks_and_overrides_nothing_else():
    # What a fine-tune changes of a run is named in one place (Trainer.HOOKS): a method of the loop it overrode
    # besides those would be a second road through the loop that training never tests.
    overridden = {name for name in vars(Finetuner) if name in vars(Trainer) and not name.startswith("__")}
    assert overridden - {"DOING"} == set(Trainer.HOOKS)
    assert all(callable(getattr(Trainer, hook)) for hook in Trainer.HOOKS)


def test_bad_records_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([RECORD, {"input": "x", "output": "y"}]))
    done = subprocess.run([LMLAB, "finetune", "runs/none", "--data", bad], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "run" in done.stderr  # the base run is checked first
    with pytest.raises(UserError, match="record 1 has no `instruction`"):
        read_records(bad)


@pytest.mark.slow
def test_finetune_through_the_cli_keeps_the_best_epoch_and_its_prompt_format(tmp_path, imported_gpt2):
    run = tmp_path / "runs/sft"
    settings = tmp_path / "sft.toml"
    settings.write_text("[finetune]\nepochs = 3\nlearning_rate = 3e-3\n")
    done = subprocess.run([LMLAB, "finetune", imported_gpt2, settings, "--data", ALPACA_TINY, "--out", run,
                           "--set", "finetune.epochs=2", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "val loss by epoch:" in done.stdout and "best epoch" in done.stdout
    events = RunDir(run).events()
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["epoch"] for e in evals] == [1, 2]  # --set wins over the file
    assert events[0]["init_from"] == str(imported_gpt2) and events[0]["origin"]["val_records"] == 8
    assert events[0]["kind"] == RunDir(run).kind() == "fine-tuned"
    ft = RunDir(run).config().finetune
    assert (ft.epochs, ft.learning_rate, ft.data) == (2, 3e-3, str(ALPACA_TINY))
    best = min(evals, key=lambda e: e["val_loss"])
    assert (run / "checkpoints/best").read_text().strip() == f"step_{best['step']:06d}"
    state = json.loads((run / "checkpoints" / f"step_{best['step']:06d}" / "state.json").read_text())
    assert state["training"]["attention"] in ("fused", "math")  # the path a resumed fine-tune goes on by
    assert evals[-1]["val_loss"] < events[-1]["base_val_loss"] - 0.5  # it learned something
    assert json.loads((run / "prompt.json").read_text())["end"] == EOT
    assert (run / "loss.png").exists() and (run / "config.toml").exists()
    assert RunDir(run).tokenizer().vocab == RunDir(imported_gpt2).tokenizer().vocab
    # Every epoch has its train lines, so `log --wide` gives each its grad norm (an epoch of 9 steps under the base's
    # log_interval of 10 had none).
    logged = subprocess.run([LMLAB, "log", run, "--json"], capture_output=True, text=True, timeout=120)
    assert [row["grad_norm"] is not None for row in json.loads(logged.stdout)["evaluations"]] == [True, True]

    answer = subprocess.run([LMLAB, "sample", run, "--instruction", "Repeat the word twice.", "--input", "moon",
                             "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu"],
                            capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr
    assert "instruction 'Repeat the word twice.'" in (run / "samples.txt").read_text()


class LoadedMeter:
    """A load meter on four faked cores whose every window outlasts the chooser's wait (CHECK_SECONDS): a fine-tune's
    set-up after its choice took that long on a loaded machine, so its first look at the load comes after its first
    step. `others` are the others' shares of the cores, a window each (the last one on)."""

    def __init__(self, *others: float):
        self.others = list(others)

    def start(self):
        return self

    def elapsed(self) -> float:
        return threads.CHECK_SECONDS + 1

    def stop(self) -> Load:
        return Load(self.elapsed(), 4, self.others.pop(0) if len(self.others) > 1 else self.others[0], None)


@pytest.mark.slow
def test_on_faked_cores_a_fine_tune_takes_the_threads_the_load_leaves_and_a_look_lowers_them_after(
        tmp_path, imported_gpt2, monkeypatch, capsys):
    """Four faked cores, whatever the host has, with the others' share of them faked. The start takes the cores the
    others leave: 2 of 4 threads. The look at the load after step 1 (a set-up slower than the wait, as CI's loaded
    host had) finds the others on 3 of the 4 cores and lowers the threads to the one they leave, as a training run's
    look does (tests/test_threads.py); each change is a line and its event."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "most_threads", lambda: (4, None))
    monkeypatch.setattr(threads, "LoadMeter", lambda: LoadedMeter(0.5, 0.75))
    data = tmp_path / "few.json"
    data.write_text(json.dumps(read_records(ALPACA_TINY)[:12]))
    capsys.readouterr()
    assert main(["finetune", str(imported_gpt2), "--data", str(data), "--device", "cpu", "--set", "finetune.epochs=1",
                 "--out", str(tmp_path / "run")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    events = RunDir(tmp_path / "run").events()
    assert [e for e in events if e["event"] == "threads"] == [
        {"event": "threads", "step": 0, "threads": 2, "most": 4, "reason": "busy", "others": 0.5},
        {"event": "threads", "step": 1, "threads": 1, "most": 4, "reason": "busy", "others": 0.75}]
    assert ("step 0: fine-tuning on 2 of 4 threads: other processes used 50% of the 4 cores (finetune.threads sets "
            "them)") in out
    assert ("step 1: fine-tuning on 1 of 4 threads: other processes used 75% of the 4 cores (finetune.threads sets "
            "them)") in out
    assert events[0]["machine"]["torch_threads"] == 2


@pytest.mark.twin("test_on_faked_cores_a_fine_tune_takes_the_threads_the_load_leaves_and_a_look_lowers_them_after")
@pytest.mark.skipif(len(cores()) < 2, reason="one core: there is nothing to choose")
@pytest.mark.slow
def test_a_fine_tune_chooses_its_threads_as_training_does(tmp_path, imported_gpt2, monkeypatch, capsys):
    """As set (finetune.threads) they are kept; on busy cores the start takes those the others leave, and every change
    is said in a line and kept as a `threads` event (how much the load took is the machine's, not the test's).
    After the start, a look at the load every CHECK_SECONDS may lower them as it asks ("busy") or try more and undo
    the trial, as training's looks do: at step 1 already where a loaded set-up outlasted the wait (the faked twin)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    data = tmp_path / "few.json"
    data.write_text(json.dumps(read_records(ALPACA_TINY)[:12]))
    command = ["finetune", str(imported_gpt2), "--data", str(data), "--device", "cpu", "--set", "finetune.epochs=1"]
    assert main([*command, "--out", str(tmp_path / "one"), "--set", "finetune.threads=1"]) == 0
    start = RunDir(tmp_path / "one").events()[0]
    assert start["machine"]["torch_threads"] == 1 and RunDir(tmp_path / "one").config().finetune.threads == 1
    assert not any(e["event"] == "threads" for e in RunDir(tmp_path / "one").events())  # set: never changed
    capsys.readouterr()
    with hog(len(cores())):
        assert main([*command, "--out", str(tmp_path / "busy")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    events = RunDir(tmp_path / "busy").events()
    changes = [e for e in events if e["event"] == "threads"]
    timed = [e for e in changes if e["step"] == 0]  # the start's choice, said where it lowered them
    assert all(e["reason"] == "busy" and e["threads"] < e["most"] == len(cores()) for e in timed), changes
    assert all(e["step"] > 0 and e["reason"] in ("busy", "undone", "quiet again") and e["most"] == len(cores())
               for e in changes[len(timed):]), changes
    said = re.findall(r"step (\d+): fine-tuning on (\d+) (?:of \d+ )?threads?: ([^()]+) \(finetune\.threads sets "
                      r"them\)", out)
    assert [(e["step"], e["threads"]) for e in changes] == [(int(s), int(n)) for s, n, _ in said], out
    assert all("other processes used" in why for e, (_, _, why) in zip(changes, said) if e["reason"] == "busy"), out
    assert events[0]["machine"]["torch_threads"] == (timed[0]["threads"] if timed else len(cores()))


@pytest.mark.slow
def test_the_new_run_is_named_by_out_as_import_hf_and_answer_name_theirs(tmp_path, imported_gpt2, capsys):
    """`--run`, the spelling before, still works and says so once; both at once is refused."""
    data = tmp_path / "few.json"
    data.write_text(json.dumps(read_records(ALPACA_TINY)[:12]))
    command = ["finetune", str(imported_gpt2), "--data", str(data), "--set", "finetune.epochs=1", "--device", "cpu",
               "--set", "finetune.threads=1"]
    assert main([*command, "--run", str(tmp_path / "old")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("note: `finetune --run` is now `finetune --out`, as import-hf and answer spell it; --run still "
                     "works") == 1
    assert RunDir(tmp_path / "old").kind() == "fine-tuned"
    assert RunDir(tmp_path / "old").resume_command().startswith(f"lmlab finetune {imported_gpt2} --data {data} "
                                                                f"--out {tmp_path / 'old'}")
    assert main([*command, "--run", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == "error: --run is the old spelling of --out; pass --out alone.\n"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_a_base_run_being_trained_now_is_said_by_a_fine_tune_and_a_sample_of_it(tmp_path, imported_gpt2, corpus_dir,
                                                                                  capsys):
    """A training run whose lock a process holds is not a finished result: fine-tuning it says that it fine-tunes the
    checkpoint as it stands, and a sample of it, to wait for it to end; once no process trains it, neither says so."""
    from lmlab.core.locks import WriterLock

    assert main(["prepare", str(corpus_dir), "--tokenizer", str(imported_gpt2), "--name", "plays", "--out-dir",
                 str(tmp_path / "data")]) == 0
    base = tmp_path / "base"
    assert main(["train", str(imported_gpt2 / "config.toml"), "--init-from", str(imported_gpt2), "--run", str(base),
                 "--set", f"data.dataset={next((tmp_path / 'data').glob('plays-*'))}", "--set", "train.max_iters=2",
                 "--set", "train.eval_interval=2", "--set", "train.eval_iters=1", "--set", "train.batch_size=2"]) == 0
    lock = WriterLock(base)  # what a `lmlab train` of it holds while it trains
    lock.acquire("held")
    try:
        capsys.readouterr()
        assert main(["finetune", str(base), "--data", str(ALPACA_TINY), "--out", str(tmp_path / "tuned"), "--set",
                     "finetune.epochs=1", "--set", "finetune.batch_size=8"]) == 0
        said = " ".join(capsys.readouterr().out.split())
        assert (f"note: {base} is a training run being trained now (step_000002 its newest), not a finished result; "
                "fine-tuning its best checkpoint (step 2) as it stands") in said
        assert main(["sample", str(base), "--max-new-tokens", "2"]) == 0
        assert (f"note: {base} is a training run being trained now (step_000002 its newest), not a finished result; "
                "wait for it to end") in capsys.readouterr().err
    finally:
        lock.release()
    assert main(["sample", str(base), "--max-new-tokens", "2"]) == 0
    assert "not a finished result" not in capsys.readouterr().err


@pytest.mark.slow
def test_a_continued_fine_tune_names_what_keeps_its_checkpoints(tmp_path, imported_gpt2, capsys):
    """[finetune] has no keep_checkpoints: what a continued fine-tune's checkpoints will delete is said with the
    setting that decides it (its base run's train.keep_checkpoints) and the one a fine-tune has."""
    base = shutil.copytree(imported_gpt2, tmp_path / "base")
    config = (base / "config.toml").read_text()
    (base / "config.toml").write_text(config.replace("keep_checkpoints = 3", "keep_checkpoints = 100"))
    data = tmp_path / "few.json"
    data.write_text(json.dumps(read_records(ALPACA_TINY)[:12]))
    command = ["finetune", str(base), "--data", str(data), "--device", "cpu", "--set", "finetune.epochs=1", "--set",
               "finetune.batch_size=2", "--set", "finetune.checkpoint_interval=1", "--set", "finetune.threads=1"]
    assert main([*command, "--out", str(tmp_path / "whole")]) == 0
    # As if killed after its third checkpoint: the later step folders and events gone.
    cut = shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    for folder in RunDir(cut).step_folders()[3:]:
        shutil.rmtree(folder)
    lines = (cut / "metrics.jsonl").read_text().splitlines(keepends=True)
    third = [i for i, line in enumerate(lines) if '"checkpoint"' in line][2]
    (cut / "metrics.jsonl").write_text("".join(lines[:third + 1]))
    (base / "config.toml").write_text(config.replace("keep_checkpoints = 3", "keep_checkpoints = 1"))
    capsys.readouterr()
    assert main([*command, "--out", str(cut)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert ("note: as its base run's train.keep_checkpoints = 1 says ([finetune] has no such setting), the checkpoints "
            "to come delete step_000001, step_000002; ") in said, said
    assert "a larger finetune.checkpoint_interval writes fewer" in said and "raise keep_checkpoints" not in said
