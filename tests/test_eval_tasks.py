"""Task scores external evaluators reproduce, end to end: `lmlab eval --task` against lm-evaluation-harness run on
the run's `export-hf` folder (`hf`) and against a real `lmlab serve` (`local-completions`: logprobs, echo, prompt
lists and token ids through the continuous batcher); the server's log-probabilities on their own; task scores
kept in the run and shown by `compare`, `runs` and `report`; `--checkpoint` steps everywhere; `eval
--max-tokens`; a report that says what it evaluates."""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from rich.console import Console

from lmlab.commands import main
from lmlab.core.config_toml import load_config
from lmlab.data.prepare import prepare
from lmlab.inference.generate import document_start
from lmlab.inference.scoring import token_scores
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from tests.helpers import SPEAKERS, Server, hellaswag_items, phrase, post, write_config

pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")
from tests import lm_eval_reference  # noqa: E402  (needs lm_eval)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def bpe_run(tmp_path_factory, corpus_dir) -> Path:
    """A tiny GPT (context 64) trained 30 steps on a byte-level BPE dataset, a checkpoint every 10 steps, all kept."""
    root = tmp_path_factory.mktemp("tasks")
    dataset, _, _ = prepare([str(corpus_dir)], "bpe:300", name="tiny", out_dir=root / "data")
    config = load_config(write_config(root / "tiny.toml", dataset, max_iters=30),
                         ["train.keep_checkpoints=5", "model.block_size=64"])
    run = Trainer(train_job(config, root / "runs" / "bpe", "cpu", console=Console(quiet=True))).run().run_dir
    assert RunDir(run).checkpoint("best").name == "step_000030"  # it improved at every eval: best is the last
    return run


@pytest.fixture(scope="session")
def tasks(tmp_path_factory) -> dict[str, Path]:
    """A generic-layout task (24 items: an empty context and a context ending in a space among them) and a
    HellaSwag-layout one (8 items with WikiHow's markup), all fitting the run's 64-token context."""
    rng, root = random.Random(3), tmp_path_factory.mktemp("taskfiles")
    generic = [{"context": f"{rng.choice(SPEAKERS)}:\n{phrase(rng, 2, 4).capitalize()}", "answer": rng.randrange(4),
                "choices": [phrase(rng, 1, 4) + "," for _ in range(3)] + ["zq xv qqq"]} for _ in range(22)]
    generic += [{"context": "", "choices": ["ROMEO:", "night"], "answer": 0},
                {"context": "JULIET:\nSweet love ", "choices": ["thy heart", "of"], "answer": 1}]
    hellaswag = hellaswag_items(rng, 8)
    files = {"generic": root / "generic.jsonl", "hellaswag": root / "hellaswag.jsonl"}
    for layout, rows in (("generic", generic), ("hellaswag", hellaswag)):
        files[layout].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return files


@pytest.fixture(scope="module")
def served(bpe_run):
    server = Server(bpe_run, "--checkpoint", "30", "--max-batch", "8")
    yield server
    server.stop()


def lmlab_scores(run: Path, task: Path, out: Path, capsys) -> tuple[dict, list[list[float]]]:
    assert main(["eval", str(run), "--task", str(task), "--checkpoint", "30", "--samples", str(out), "--json",
                 "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out)["tasks"][0]
    return summary, [json.loads(line)["loglikelihoods"] for line in out.read_text().splitlines()]


def test_scores_equal_lm_evaluation_harness_hf_and_local_completions_against_lmlab_serve(
        bpe_run, tasks, served, tmp_path, capsys):
    ours = {layout: lmlab_scores(bpe_run, path, tmp_path / f"{layout}.jsonl", capsys) for layout, path in tasks.items()}
    assert all(s["truncated"] == 0 and s["skipped_long"] == 0 for s, _ in ours.values())  # local-completions' range
    exported = tmp_path / "exported"
    assert main(["export-hf", str(bpe_run), str(exported), "--checkpoint", "step_30"]) == 0
    include = tmp_path / "lm_eval_tasks"
    names = {layout: lm_eval_reference.write_task(include, f"lmlab_{layout}", path, layout)
             for layout, path in tasks.items()}
    hf = lm_eval_reference.run("hf", f"pretrained={exported},dtype=float32", list(names.values()), include, tmp_path)
    local = lm_eval_reference.run(  # batch_size 4: lists of token-id prompts, each its own choice in the batch
        "local-completions", f"model=bpe,base_url={served.url}/completions,tokenizer={exported},"
        "tokenizer_backend=huggingface,max_length=65", list(names.values()), include, tmp_path, batch_size=4)
    print("\ntask | items | lmlab acc / acc_norm | lm-eval hf | lm-eval local-completions | max |Δ ll| hf, local")
    for layout, (summary, lls) in ours.items():
        theirs = {backend: found["tasks"][names[layout]] for backend, found in (("hf", hf), ("local", local))}
        gaps = {b: max(abs(a - b_) for mine, other in zip(lls, t["loglikelihoods"]) for a, b_ in zip(mine, other))
                for b, t in theirs.items()}
        print(f"{layout} | {summary['items']} | {summary['acc']:.4f} / {summary['acc_norm']:.4f} | "
              f"{theirs['hf']['acc']:.4f} / {theirs['hf']['acc_norm']:.4f} | {theirs['local']['acc']:.4f} / "
              f"{theirs['local']['acc_norm']:.4f} | {gaps['hf']:.2e}, {gaps['local']:.2e}")
        for backend, result in theirs.items():
            assert len(result["loglikelihoods"]) == summary["items"] == len(lls)
            assert (result["acc"], result["acc_norm"]) == (summary["acc"], summary["acc_norm"]), backend
            assert gaps[backend] < 1e-4, backend
    assert any(" in=" in line and "out=4" in line for line in served.log)  # 4 prompts per request, 1 token each


def completion(served, **body) -> tuple[int, dict]:
    return post(f"{served.url}/completions", json.dumps({"model": "bpe", **body}).encode())


def test_the_server_returns_the_models_own_log_probabilities(bpe_run, served):
    run = RunDir(bpe_run).load("30", "cpu")
    ids = run.tokenizer.encode("ROMEO:\nSweet love thy")
    with torch.no_grad():
        exact = token_scores(run.model(torch.tensor([ids]))[0][0, :-1], torch.tensor(ids[1:]), 3)
    status, body = completion(served, prompt=ids, max_tokens=0, echo=True, logprobs=3)
    lp = body["choices"][0]["logprobs"]
    assert status == 200 and body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                                               "total_tokens": len(ids)}
    assert lp["tokens"] == [run.tokenizer.decode([t]) for t in ids] and lp["token_logprobs"][0] is None
    assert max(abs(a - b.logprob) for a, b in zip(lp["token_logprobs"][1:], exact)) < 1e-5
    assert lp["text_offset"][-1] == len(body["choices"][0]["text"]) - len(lp["tokens"][-1])
    for top, score in zip(lp["top_logprobs"][1:], exact):
        assert [run.tokenizer.decode([t]) for t in score.top_ids] == list(top)[:3]
        assert max(abs(a - b) for a, b in zip(top.values(), score.top_logprobs)) < 1e-5
    # an empty prompt stands for the start of a document, whose end-of-text token is not text to echo
    status, empty = completion(served, prompt="", max_tokens=3, echo=True, logprobs=1, temperature=0)
    choice = empty["choices"][0]
    assert status == 200 and choice["text"] == "".join(choice["logprobs"]["tokens"]) and "<|endoftext|>" not in \
        choice["text"] and choice["logprobs"]["text_offset"][:1] in ([], [0])
    # a string prompt is its token ids; a list of prompts gives each its n choices, in order, in one batch
    status, same = completion(served, prompt="ROMEO:\nSweet love thy", max_tokens=0, echo=True, logprobs=3)
    assert same["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"]
    status, many = completion(served, prompt=["ROMEO:", [5, 6, 7], "JULIET:"], n=2, max_tokens=3, temperature=0,
                              logprobs=1, seed=1)
    assert status == 200 and [c["index"] for c in many["choices"]] == list(range(6))
    assert many["choices"][0]["text"] == many["choices"][1]["text"]  # greedy: both choices of a prompt agree
    greedy = many["choices"][4]["logprobs"]
    assert "".join(greedy["tokens"]) == many["choices"][4]["text"]
    assert all(tok_lp == max(top.values()) for tok_lp, top in zip(greedy["token_logprobs"], greedy["top_logprobs"]))
    streamed = urllib.request.urlopen(urllib.request.Request(
        f"{served.url}/completions", data=json.dumps({"prompt": "JULIET:", "max_tokens": 3, "temperature": 0,
                                                      "logprobs": 1, "stream": True}).encode(),
        headers={"Content-Type": "application/json"}), timeout=30).read().decode()
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    streamed_lp = [v for c in chunks if c["choices"][0]["logprobs"]
                   for v in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed_lp == pytest.approx(greedy["token_logprobs"], abs=1e-5)  # alone, not in a batch of 6
    status, chat = post(f"{served.url}/chat/completions", json.dumps({
        "messages": [{"role": "user", "content": "love"}], "max_tokens": 3, "temperature": 0, "logprobs": True,
        "top_logprobs": 4}).encode())
    content = chat["choices"][0]["logprobs"]["content"]
    assert status == 200 and "".join(c["token"] for c in content) == chat["choices"][0]["message"]["content"]
    assert all(len(c["top_logprobs"]) == 4 and c["logprob"] == c["top_logprobs"][0]["logprob"] for c in content)
    assert all(bytes(c["bytes"]).decode() == c["token"] for c in content)


BAD = [(dict(logprobs=6), "logprobs"), (dict(logprobs=-1), "logprobs"), (dict(logprobs="3"), "logprobs"),
       (dict(echo=True, stream=True), "echo"), (dict(max_tokens=0), "max_tokens"), (dict(echo="yes"), "echo"),
       (dict(prompt=[1, 2.5]), "prompt"), (dict(prompt=[[1], [True]]), "prompt"), (dict(prompt=[10**9]), "prompt"),
       (dict(prompt=[-1]), "prompt"), (dict(prompt=[]), "prompt"), (dict(prompt=[[]]), "prompt"),
       (dict(prompt=[7] * 65), "prompt"), (dict(prompt=["a"] * 5, n=2), "prompt")]


def test_bad_log_probability_requests_get_a_400_naming_the_field(served):
    for fields, name in BAD:
        status, body = completion(served, **{"prompt": "x", "max_tokens": 2, **fields})
        assert status == 400 and body["error"]["param"] == name, (fields, body)
    for fields, name in [(dict(logprobs=True, top_logprobs=21), "top_logprobs"), (dict(top_logprobs=2), "top_logprobs"),
                         (dict(logprobs=1), "logprobs")]:
        status, body = post(f"{served.url}/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **fields}).encode())
        assert status == 400 and body["error"]["param"] == name, (fields, body)
    assert completion(served, prompt="x", max_tokens=1)[0] == 200  # still up


def test_task_scores_are_kept_and_shown_by_compare_runs_and_report(bpe_run, tasks, tmp_path, capsys):
    for limit in ([], ["--limit", "5"]):
        assert main(["eval", str(bpe_run), "--task", str(tasks["generic"]), *limit, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "choice 20/20 |" in out and "generic" in out and "± " in out  # a plain progress line when piped
    kept = RunDir(bpe_run).kept("tasks")
    assert {(r["task"], r["limit"]) for r in kept} >= {("generic", 5), ("generic", None)}
    full = [r for r in kept if r["task"] == "generic" and r["limit"] is None][-1]
    assert main(["compare", str(bpe_run), str(bpe_run), "--wide"]) == 0
    assert f"{full['acc_norm']:.4f} ({full['items']:,})" in capsys.readouterr().out  # the item count beside it
    assert main(["runs", str(bpe_run.parent), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["runs"][0]
    assert listed["tasks"]["generic"]["items"] == full["items"]  # the most items of a task
    report = tmp_path / "report"
    assert main(["report", str(bpe_run), "--out", str(report), "--device", "cpu", "--max-new-tokens", "5"]) == 0
    said = capsys.readouterr().out
    assert "Evaluating" in said and "tokens;" in said and "window " in said and "Sampling" in said
    md = (report / "report.md").read_text()
    assert f"| generic acc_norm | {full['acc_norm']:.4f} ± {full['acc_norm_stderr']:.4f} ({full['items']} items)" in md
    assert main(["report", str(bpe_run), "--out", str(report), "--device", "cpu", "--max-new-tokens", "5"]) == 0
    assert "reusing its kept full-split evaluation" in capsys.readouterr().out  # no second evaluation


def test_max_tokens_scores_a_documented_subset_kept_apart(bpe_run, capsys):
    assert main(["eval", str(bpe_run), "--max-tokens", "100", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "A subset: 2 of the split's" in out and "windows of 64 tokens, spread evenly over it (128 of" in out
    subset = [r for r in RunDir(bpe_run).kept("results") if r["max_tokens"] == 100]
    assert len(subset) == 1 and subset[0]["tokens"] == 128
    assert main(["eval", str(bpe_run), "--device", "cpu", "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["max_tokens"] is None and whole["tokens"] > 128 and whole["windows"] == whole["split_windows"]
    assert len(RunDir(bpe_run).kept("results")) == 2  # the subset and the whole split, kept apart


def test_a_checkpoint_step_is_taken_everywhere_and_a_missing_one_named(bpe_run, tmp_path, capsys):
    assert main(["sample", str(bpe_run), "--checkpoint", "step_10", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert "checkpoint step_000010 (step 10)" in (bpe_run / "samples.txt").read_text()
    capsys.readouterr()
    assert main(["eval", str(bpe_run), "--checkpoint", "20", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 20
    for argv in (["eval", str(bpe_run)], ["sample", str(bpe_run)], ["export-hf", str(bpe_run), str(tmp_path / "x")],
                 ["compare", str(bpe_run), str(bpe_run)], ["report", str(bpe_run), "--out", str(tmp_path / "r")],
                 ["serve", str(bpe_run)], ["answer", str(bpe_run), "--data", "d.json", "--out", str(tmp_path / "a")]):
        capsys.readouterr()
        assert main([*argv, "--checkpoint", "25"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "has no checkpoint at step 25; it has steps 10, 20, 30 (best 30, latest 30)" in err[0]
    assert not any((tmp_path / name).exists() for name in ("x", "r", "a"))


class FakeJudge:
    """An OpenAI-compatible judge on 127.0.0.1 that answers by the task it grades: "87" for most, a reply with no
    number for a task saying "mute", and a 400 (the judge prompt too long for its context) for one saying
    "refuse": an external endpoint's behaviours, made repeatable."""

    def __init__(self):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                if "refuse" in prompt:
                    status, answer = 400, {"error": {"message": "the judge prompt is longer than this model's context",
                                                     "type": "invalid_request_error", "param": "messages",
                                                     "code": None}}
                else:
                    reply = "excellent work" if "mute" in prompt else "87"
                    status, answer = 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "judge",
                                           "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                               "role": "assistant", "content": reply}}]}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_judge_scores_are_kept_in_the_answering_run_and_unscored_items_explained(bpe_run, tmp_path, capsys,
                                                                                monkeypatch):
    records = [{"instruction": "Praise the night.", "output": "o night"}, {"instruction": "refuse", "output": "no"},
               {"instruction": "mute", "output": "."}]
    data, answers = tmp_path / "asks.json", tmp_path / "answers.jsonl"
    data.write_text(json.dumps(records))
    assert main(["answer", str(bpe_run), "--data", str(data), "--out", str(answers), "--max-new-tokens", "2",
                 "--checkpoint", "30", "--device", "cpu"]) == 0
    assert {json.loads(line)["run"] for line in answers.read_text().splitlines()} == {str(bpe_run.resolve())}
    judge = FakeJudge()
    try:
        capsys.readouterr()
        assert main(["judge", "--answers", str(answers), "--endpoint", judge.url, "--model", "fake-judge"]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert ("mean score 87.0 over 1 of 3 answers scored (2 unscored: 1 refused by the endpoint "
                "(the first: 400:") in out
        assert "longer than this model's context" in out and "1 with no whole number from 0 to 100" in out
        assert f"the mean is kept in run {bpe_run.resolve()}" in out  # from elsewhere, where it is
        monkeypatch.chdir(bpe_run.parent)
        assert main(["judge", "--answers", str(answers), "--endpoint", judge.url, "--model", "fake-judge"]) == 0
        assert f"the mean is kept in run {bpe_run.name}: " in capsys.readouterr().out  # here, as named here
        kept = RunDir(bpe_run).kept("judgements")
        assert [(j["mean"], j["scored"], j["total"], j["judge_model"], j["step"]) for j in kept] == \
            [(87.0, 1, 3, "fake-judge", 30)]
        assert main(["compare", str(bpe_run), str(bpe_run), "--wide"]) == 0
        assert "87.0 (1/3, fake-judge)" in capsys.readouterr().out
        assert main(["runs", str(bpe_run.parent), "--wide"]) == 0
        assert "87.0 (1/3, fake-judge)" in capsys.readouterr().out

        refused = tmp_path / "refused.jsonl"
        refused.write_text("".join(line.replace("Praise the night.", "refuse") + "\n"
                                   for line in answers.read_text().splitlines()))
        assert main(["judge", "--answers", str(refused), "--endpoint", judge.url, "--model", "fake-judge"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "judge fake-judge scored none of the 3 answers: 2 refused by the endpoint" in err[0]
        assert len(RunDir(bpe_run).kept("judgements")) == 1  # nothing kept of a judging that scored nothing
    finally:
        judge.stop()


@pytest.mark.slow
def test_lm_evaluation_harness_hf_on_a_char_runs_export_gives_its_task_scores(writing_char_run, tmp_path, capsys):
    """A char run's export is the model: its vocabulary no wider than the model's rows, lm-eval's hf backend scores
    every choice as `lmlab eval --task` does. A char run has no end-of-text token, so lm-eval is told what an
    empty context starts from (`prefix_token_id`): lmlab's document start, a line break."""
    rng = random.Random(5)
    rows = [{"context": f"{rng.choice(SPEAKERS)}:\n{phrase(rng, 1, 3).capitalize()}", "answer": rng.randrange(3),
             "choices": [phrase(rng, 1, 2) + "," for _ in range(3)]} for _ in range(15)]
    rows.append({"context": "", "choices": ["ROMEO:", "night"], "answer": 0})
    task = tmp_path / "plays.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    samples = tmp_path / "samples.jsonl"
    assert main(["eval", str(writing_char_run), "--task", str(task), "--samples", str(samples), "--json",
                 "--device", "cpu"]) == 0
    ours = json.loads(capsys.readouterr().out)["tasks"][0]
    assert ours["items"] == 16 and ours["skipped_unseen"] == 0
    lls = [json.loads(line)["loglikelihoods"] for line in samples.read_text().splitlines()]
    exported = tmp_path / "exported"
    assert main(["export-hf", str(writing_char_run), str(exported)]) == 0
    name = lm_eval_reference.write_task(tmp_path / "lm_eval_tasks", "lmlab_chars", task, "generic")
    start = document_start(RunDir(writing_char_run).tokenizer())[0]
    theirs = lm_eval_reference.run("hf", f"pretrained={exported},dtype=float32,prefix_token_id={start}", [name],
                                   tmp_path / "lm_eval_tasks", tmp_path, batch_size=4)["tasks"][name]
    assert (theirs["acc"], theirs["acc_norm"]) == (ours["acc"], ours["acc_norm"])
    gap = max(abs(a - b) for mine, other in zip(lls, theirs["loglikelihoods"]) for a, b in zip(mine, other))
    assert gap < 1e-4, gap
