"""Chat templates against transformers' `apply_chat_template`: a Qwen2.5-style and a Llama-3-style tokenizer folder
built here (no download), rendered and tokenized the same for several conversations; an imported instruct model
keeps its template and uses it in `sample --chat`, `serve` (multi-turn), `answer` and `judge`, stopping at the
end of its turn; templates that cannot render are refused in the template's own words."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from lmlab.core.config import SamplingParams
from lmlab.core.errors import UserError
from lmlab.data.tokenizers import load_pretrained
from lmlab.evals.judge import judge_prompt
from lmlab.hf import export_hf, import_hf
from lmlab.inference.generate import chatting, text_stream
from lmlab.run.chat import read_chat_template
from lmlab.run.rundir import RunDir
from tests.helpers import ALPACA_TINY, LMLAB, Server, read_answer, run_cli, sent

transformers = pytest.importorskip("transformers")
from tests.hf_reference import CONVERSATIONS, QWEN, STYLES, chat_folder, hf_chat_model  # noqa: E402  (needs transformers)


@pytest.mark.parametrize("style", STYLES)
def test_the_rendered_prompt_and_its_ids_are_transformers(tmp_path, corpus_dir, style):
    folder = chat_folder(tmp_path / style, style, corpus_dir)
    tokenizer = load_pretrained(folder)
    ours, theirs = read_chat_template(folder, tokenizer), transformers.AutoTokenizer.from_pretrained(folder)
    for messages in CONVERSATIONS:
        for generation in (True, False):
            if style == "gemma" and messages[0]["role"] == "system":  # refused by both, in the template's words
                with pytest.raises(UserError, match="cannot render these messages: System role not supported$"):
                    ours.render(messages, generation)
                with pytest.raises(Exception, match="System role not supported"):
                    theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
                continue
            text = ours.render(messages, generation)
            assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            assert tokenizer.encode(text, special=False) == theirs.apply_chat_template(
                messages, add_generation_prompt=generation, return_dict=False)
    assert ours.end_of_turn == (STYLES[style][0][0],)


@pytest.mark.slow
def test_an_imported_instruct_model_keeps_its_template_out_and_back_and_answers_through_it(tmp_path, corpus_dir,
                                                                                         capsys):
    source = hf_chat_model(tmp_path / "Qwen2.5-tiny-Instruct", "qwen2.5", corpus_dir)
    import_hf(source, tmp_path / "run")
    run = RunDir(tmp_path / "run")
    assert run.chat_template() == read_chat_template(source, load_pretrained(source))
    messages = [{"role": "system", "content": "Speak as a nurse."}, {"role": "user", "content": "Where is Romeo?"}]
    theirs = transformers.AutoTokenizer.from_pretrained(source)
    ids = theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        generated = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                   eos_token_id=theirs.convert_tokens_to_ids(["<|im_end|>"]))[0, len(ids):].tolist()
    expected = theirs.decode(generated).split("<|im_end|>")[0]
    code, out, err = run_cli(capsys, "sample", run.path, "--chat", "Where is Romeo?", "--system", "Speak as a nurse.",
                             "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu")
    assert code == 0 and out == expected + "\n", err
    assert "chat 'Where is Romeo?', system 'Speak as a nurse.'" in (run.path / "samples.txt").read_text()

    # `answer` asks each instruction (and input) as the user's message, as transformers would.
    code, _, err = run_cli(capsys, "answer", run.path, "--data", ALPACA_TINY, "--out", tmp_path / "answers.jsonl",
                           "--max-new-tokens", "8", "--device", "cpu")
    first = json.loads((tmp_path / "answers.jsonl").read_text().splitlines()[0])
    asked = first["instruction"] + (f"\n\n{first['input']}" if first["input"] else "")
    ids = theirs.apply_chat_template([{"role": "user", "content": asked}], add_generation_prompt=True,
                                     return_dict=False)
    with torch.no_grad():
        generated = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                   eos_token_id=theirs.convert_tokens_to_ids(["<|im_end|>"]))[0, len(ids):].tolist()
    assert code == 0 and first["model_answer"] == theirs.decode(generated).split("<|im_end|>")[0], err

    # Exported, the folder renders as the source did; imported again, the run has the same template.
    export_hf(run.path, tmp_path / "out")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for conversation in CONVERSATIONS:
        assert again.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == \
            theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == theirs.convert_tokens_to_ids("<|im_end|>")
    import_hf(tmp_path / "out", tmp_path / "back")
    assert RunDir(tmp_path / "back").chat_template().template == QWEN


@pytest.mark.slow
def test_a_reply_stops_at_the_end_of_the_turn_not_only_at_the_eos(tmp_path, corpus_dir):
    # Llama 3's eos (<|end_of_text|>) is not its end of turn (<|eot_id|>): a model that ends its turn at once
    # gives an empty reply, where decoding to the eos would run to max_new_tokens.
    import_hf(hf_chat_model(tmp_path / "Llama-3-tiny-Instruct", "llama3", corpus_dir, silent=True), tmp_path / "run")
    run = RunDir(tmp_path / "run").load("best", "cpu")
    assert run.chat_template.end_of_turn == ("<|eot_id|>",) and run.tokenizer.eot_token == "<|end_of_text|>"
    stream = text_stream(run, chatting(run, [("user", "Hello")]), SamplingParams(20, temperature=0))
    assert stream.text() == "" and stream.finish_reason == "stop" and stream.tokens == 1


def start_server(run: Path) -> tuple[subprocess.Popen, str]:
    """`lmlab serve RUN` on a free local port (eager: no compile at start); the process and its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([LMLAB, "serve", run, "--port", str(port), "--device", "cpu", "--no-compile"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5):
                return server, url
        except OSError:  # refused, reset, or timed out while the server imports torch
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
            time.sleep(0.2)


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_serve_renders_multi_turn_chats_and_judge_asks_through_the_template(tmp_path, corpus_dir, capsys):
    source = hf_chat_model(tmp_path / "gemma-tiny-it", "gemma", corpus_dir)
    import_hf(source, tmp_path / "judge")
    theirs = transformers.AutoTokenizer.from_pretrained(source)
    server, url = start_server(tmp_path / "judge")
    try:
        conversation = CONVERSATIONS[2]  # user, assistant, user
        status, reply = post(f"{url}/v1/chat/completions", {"messages": conversation, "max_tokens": 5,
                                                            "temperature": 0})
        assert status == 200 and reply["usage"]["prompt_tokens"] == len(
            theirs.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False))
        status, reply = post(f"{url}/v1/chat/completions", {"messages": CONVERSATIONS[1], "max_tokens": 5})
        assert status == 400 and reply["error"]["param"] == "messages" and reply["error"]["message"] == \
            f"the chat template of {tmp_path / 'judge'} cannot render these messages: System role not supported"
        answers = tmp_path / "answers.jsonl"
        answers.write_text(json.dumps({"instruction": "Name a colour.", "input": "", "output": "Red.",
                                       "model_answer": "Blue."}) + "\n")
        code, out, err = run_cli(capsys, "judge", "--answers", answers, "--endpoint", f"{url}/v1", "--model", "judge")
        # A tiny random judge answers without a score, so judge says why and exits 2; what matters here is the ask.
        assert code == 2 and "scored none of the 1 answers: 1 with no whole number" in err, err
    finally:
        server.terminate()
        log = server.communicate(timeout=30)[1]
    judged = json.loads((tmp_path / "answers-judged.jsonl").read_text())
    asked = [{"role": "user", "content": judge_prompt(judged)}]
    tokens = len(theirs.apply_chat_template(asked, add_generation_prompt=True, return_dict=False))
    assert re.search(rf"POST /v1/chat/completions 200 in={tokens} ", log), log  # the judge's first ask


BAD_TEMPLATES = {
    "not Jinja": ("{% for m in messages %}{{ m.content }}", r"the chat template of .* is not valid Jinja \(line 1: "
                  r"Unexpected end of template.*\); fix it, or remove it to import the model without one\."),
    "an undefined name": ("{{ greeting }}{% for m in messages %}{{ m.content }}{% endfor %}",
                          r"the chat template of .* uses 'greeting' is undefined, which nothing sets \(lmlab passes "
                          r"messages, add_generation_prompt, tools, documents and the special tokens "),
}


@pytest.mark.parametrize("case", BAD_TEMPLATES)
def test_a_template_that_cannot_render_is_refused_at_import_and_nothing_is_written(tmp_path, corpus_dir, capsys,
                                                                                  case):
    template, message = BAD_TEMPLATES[case]
    source = hf_chat_model(tmp_path / "model", "qwen2.5", corpus_dir)
    chat_folder(tmp_path / "model", "qwen2.5", corpus_dir, template)
    code, _, err = run_cli(capsys, "import-hf", source, "--out", tmp_path / "run")
    assert code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_messages_a_template_refuses_get_its_own_words(tmp_path, corpus_dir, capsys):
    # Gemma's rule: no system role. The template's raise_exception is the sentence (in serve too: a 400).
    import_hf(hf_chat_model(tmp_path / "model", "gemma", corpus_dir), tmp_path / "run")
    before = (tmp_path / "run" / "samples.txt").exists()
    code, _, err = run_cli(capsys, "sample", tmp_path / "run", "--chat", "Hi", "--system", "Be kind.")
    assert code == 2 and err == f"error: the chat template of {tmp_path / 'run'} cannot render these messages: " \
                                "System role not supported\n"
    assert (tmp_path / "run" / "samples.txt").exists() == before
    assert RunDir(tmp_path / "run").chat_template().end_of_turn == ("<end_of_turn>",)


# Templates a hostile or careless author ships: each bounded, in one sentence, never a stuck thread.
HOSTILE = {
    "a loop": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages }}",
               "takes more than 2 s to render"),
    "a recursive macro": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recurses without end"),
    "nothing": ("{% for m in messages %}{% endfor %}", "renders nothing"),
    "300 MB": ("{% for i in range(3000) %}{{ 'x' * 100000 }}{% endfor %}", "renders more than 4,000,000 characters"),
    "a gigabyte at once": ("{{ 'x'.ljust(1000000000) }}", "needs more than 256 MiB"),
}
# Fine for "Hi", but its work grows with the square of a message: the import's long probe finds it.
QUADRATIC = ("{% for m in messages %}{% for a in m.content %}{% for b in m.content %}{% endfor %}{% endfor %}"
             "{{ m.content }}{% endfor %}")


@pytest.fixture(scope="session")
def qwen_source(tmp_path_factory, corpus_dir) -> Path:
    return hf_chat_model(tmp_path_factory.mktemp("hostile") / "Qwen2.5-tiny-Instruct", "qwen2.5", corpus_dir)


def with_template(source: Path, folder: Path, template: str) -> Path:
    """A copy of `source` whose tokenizer_config.json holds `template`."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


def run_with_template(source: Path, folder: Path, template: str) -> Path:
    """An imported run whose chat_template.json was edited afterwards to hold `template` (no import checks it)."""
    import_hf(source, folder)
    kept = json.loads((folder / "chat_template.json").read_text())
    (folder / "chat_template.json").write_text(json.dumps({**kept, "template": template}))
    return folder


@pytest.mark.parametrize("case", [*HOSTILE, "quadratic"])
@pytest.mark.slow
def test_a_hostile_template_is_refused_at_import_in_one_sentence(tmp_path, qwen_source, capsys, case):
    template, says = HOSTILE.get(case, (QUADRATIC, "takes more than 2 s to render a chat of 31 messages"))
    source = with_template(qwen_source, tmp_path / "model", template)
    code, _, err = run_cli(capsys, "import-hf", source, "--out", tmp_path / "run")
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["a loop", "nothing", "300 MB"])
@pytest.mark.slow
def test_sample_and_answer_refuse_a_hostile_template_in_one_sentence(tmp_path, qwen_source, capsys, case):
    template, says = HOSTILE[case]
    run = run_with_template(qwen_source, tmp_path / "run", template)
    code, _, err = run_cli(capsys, "sample", run, "--chat", "Hi", "--max-new-tokens", "2", "--device", "cpu")
    assert code == 2 and err.startswith(f"error: the chat template of {run} {says}") and len(err.splitlines()) == 1, err
    if case == "nothing":  # answer renders through the same template (a loop there costs what it costs here)
        code, _, err = run_cli(capsys, "answer", run, "--data", ALPACA_TINY, "--out", tmp_path / "answers.jsonl",
                               "--max-new-tokens", "2", "--device", "cpu")
        assert code == 2 and says in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "answers.jsonl").exists()


@pytest.mark.slow
def test_chats_through_a_looping_template_get_400_while_completions_are_served_and_sigterm_drains(
        tmp_path, qwen_source):
    run = run_with_template(qwen_source, tmp_path / "run", HOSTILE["a loop"][0])
    server = Server(run, "--drain-seconds", "5")
    chat = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()
    try:
        with ThreadPoolExecutor(4) as pool:  # chats each of which would loop for good
            chats = [pool.submit(post_raw, f"{server.url}/chat/completions", chat) for _ in range(3)]
            chats.append(pool.submit(post_raw, f"{server.root}/tokenize", json.dumps(
                {"messages": [{"role": "user", "content": "Hi"}]}).encode()))
            completion = post_raw(f"{server.url}/completions", json.dumps({"prompt": "Hi", "max_tokens": 3}).encode())
            assert completion[0] == 200 and completion[1]["usage"]["completion_tokens"] <= 3
            for status, body in (future.result() for future in chats):
                assert status in (400, 429), body  # refused in one sentence, or busy: never a stuck thread
                if status == 400:
                    assert body["error"]["param"] == "messages" and body["error"]["message"] == \
                        f"the chat template of {run} takes more than 2 s to render these messages (a loop that " \
                        "does not end?); fix the template."
    finally:
        server.proc.terminate()
        assert server.proc.wait(timeout=60) == 0  # drained and stopped, with no thread left spinning
    assert not any("Traceback" in line for line in server.log)


def post_raw(url: str, data: bytes) -> tuple[int, dict]:
    """A POST's status and JSON body, waiting as long as a stuck server would make a client wait."""
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_the_render_worker_imports_nothing_from_the_working_folder_and_a_failed_start_is_said_as_itself(
        tmp_path, qwen_source):
    """The render worker imports nothing from the command's folder (a jinja2.py there never runs inside the
    sandbox), and a worker that fails to start is said as that failure, never as a template too slow to render."""
    run = tmp_path / "run"
    import_hf(qwen_source, run)
    here = tmp_path / "here"
    here.mkdir()
    planted = f"open({str(here / 'ran')!r}, 'w').close()\nraise RuntimeError('a planted jinja2')\n"
    (here / "jinja2.py").write_text(planted)
    chat = [LMLAB, "sample", run, "--chat", "Hi", "--max-new-tokens", "2", "--device", "cpu"]
    done = subprocess.run(chat, cwd=here, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and not (here / "ran").exists(), done.stderr
    # A folder the command imports from itself (PYTHONPATH) is the worker's too: a Jinja broken there is named.
    path = os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(chat, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": path})
    assert done.returncode == 2 and done.stderr == (
        f"error: the chat template of {run} could not be rendered: lmlab's process that renders chat templates did "
        "not start (RuntimeError: a planted jinja2); reinstall lmlab and jinja2.\n")


# Renders "Hi" at once and spins for good on a message "spin": a template that one client's chats make slow.
SPINNING = ("{% for m in messages %}{% if m.content == 'spin' %}{% for i in range(100000) %}"
            "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
            "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.slow
def test_chats_one_client_makes_slow_to_render_hold_up_no_other_clients_chat(tmp_path, qwen_source):
    """Chats whose templates take the whole 2 s render limit hold up their own client alone: another client's chat
    never waits behind them for the render threads."""
    run = run_with_template(qwen_source, tmp_path / "run", SPINNING)
    server = Server(run)
    spin = json.dumps({"messages": [{"role": "user", "content": "spin"}], "max_tokens": 2}).encode()
    hostile = [sent(server, "127.0.0.2", "/v1/chat/completions", spin) for _ in range(6)]
    try:
        deadline = time.monotonic() + 120
        while sum(server.health()["lanes"]["render"].values()) < len(hostile):  # every one of them in the lane
            assert time.monotonic() < deadline, server.health()
            time.sleep(0.1)
        assert server.health()["lanes"]["render"]["running"] == 1  # the other thread is left to other clients
        hi = json.dumps({"messages": [{"role": "user", "content": "Hi, how are you today?"}], "max_tokens": 2})
        status, answer = read_answer(sent(server, "127.0.0.3", "/v1/chat/completions", hi.encode()))
        assert status == 200 and answer["usage"]["completion_tokens"] <= 2, answer
        assert server.health()["lanes"]["render"]["waiting"] >= 2  # rendered around the spinning chats' queue
        status, answer = read_answer(hostile[0])
        assert status == 400 and "takes more than 2 s to render" in answer["error"]["message"], answer
    finally:
        for sock in hostile:
            sock.close()
        server.stop()
