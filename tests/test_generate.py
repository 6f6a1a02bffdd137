"""Sampling on its own: top-k and top-p filtering, stop strings found and held back in streamed text (against a
plain reference, and in time linear in the text), and the checks on SamplingParams that every command and the
server share; `sample --num-samples N` and `answer` decoding in batches what one-at-a-time decoding gives, and
`sample` printing tokens as they are generated."""

from __future__ import annotations

import json
import math
import os
import re
import select
import shutil
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.core.config import ModelConfig, SamplingParams, seeded
from lmlab.core.errors import UserError
from lmlab.data.tokenizers import train_tokenizer
from lmlab.inference.generate import (
    Detokenizer,
    StopStrings,
    TextStream,
    continue_all,
    continuing,
    instructing,
    sample,
    stream_ids,
    text_stream,
)
from lmlab.inference.sampling import filter_logits
from lmlab.model import build_model
from lmlab.run.rundir import RunDir
from tests.helpers import ALPACA_TINY, copy_run, run_cli, spawn

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))


def kept(logits: torch.Tensor) -> list[int]:
    return [i for i, v in enumerate(logits.tolist()) if v != -math.inf]


def test_top_k_keeps_the_k_likeliest_and_top_p_the_smallest_set_reaching_p():
    assert kept(filter_logits(LOGITS, 1.0, 2, 1.0)) == [0, 1]
    assert kept(filter_logits(LOGITS, 1.0, 10, 1.0)) == [0, 1, 2, 3]  # k beyond the vocabulary keeps all
    assert kept(filter_logits(LOGITS, 1.0, None, 0.5)) == [0]  # the first alone reaches 0.5
    assert kept(filter_logits(LOGITS, 1.0, None, 0.7)) == [0, 1]
    assert kept(filter_logits(LOGITS, 1.0, None, 0.76)) == [0, 1, 2]
    assert kept(filter_logits(LOGITS, 1.0, None, 0.01)) == [0]  # the likeliest always stays
    assert kept(filter_logits(LOGITS, 1.0, 3, 0.7)) == [0, 1]  # both rules at once
    scaled = filter_logits(LOGITS, 2.0, None, 1.0)
    torch.testing.assert_close(scaled, LOGITS / 2.0)  # temperature divides before anything is cut


def test_sampling_draws_only_from_the_kept_tokens_and_repeats_with_the_seed():
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=30)).eval()
    draws = list(stream_ids(model, [1], SamplingParams(max_new_tokens=40, temperature=1.0, top_k=1, seed=1)))
    greedy = list(stream_ids(model, [1], SamplingParams(max_new_tokens=40, temperature=0)))
    assert draws == greedy  # top_k 1 is greedy, whatever the seed
    params = SamplingParams(max_new_tokens=40, temperature=1.5, top_p=0.9, seed=7)
    assert list(stream_ids(model, [1], params)) == list(stream_ids(model, [1], params))


def reference(text: str, stop: list[str]) -> tuple[str, int]:
    """What a stream of `text` may send, by the definition: the text up to the first stop string whole (the one
    that ends first, the longest of those), else all but an unfinished character (U+FFFD) at the end and the
    longest beginning of a stop string before it."""
    final = len(text.rstrip("\ufffd"))
    read = text[:final]
    ends = [(i + len(s), -len(s), i) for s in stop if s for i in range(final) if read.startswith(s, i)]
    if ends:
        return "stop", min(ends)[2]
    return "held", final - max((k for s in stop for k in range(1, len(s)) if read.endswith(s[:k])), default=0)


ALPHABET = "ab\ufffd"
CHARS = train_tokenizer("char", [ALPHABET * 2], [ALPHABET])


@settings(max_examples=300, deadline=None)
@given(text=st.text(ALPHABET, max_size=30), stop=st.lists(st.text("ab", max_size=6), max_size=4))
@pytest.mark.slow
def test_a_stream_sends_what_no_stop_string_or_unfinished_character_may_still_change(text, stop):
    stream, sent = Detokenizer(CHARS, stop), ""
    for n in range(1, len(text) + 1):
        sent += stream.feed(CHARS.encode(text[n - 1])[0])
        verdict, at = reference(text[:n], stop)
        assert sent == text[:at], (text[:n], stop, verdict)
        if verdict == "stop":
            assert stream.finish_reason == "stop"
            return
    assert stream.finish_reason is None and sent + stream.flush() == text


def test_stop_strings_are_read_once_however_long():
    # "aaa...ab" against a text of a's: the longest partial match at every character, where a hold-back that
    # rescanned would be quadratic in the stop string per token. Counted, not timed: each character is read once.
    stop = StopStrings(["a" * 999 + "b", "c" * 1000])
    text = ""
    for _ in range(2000):
        text += "a"
        assert stop.advance(text, len(text)) is None
    assert stop.partial == 999 and stop.read == 2000
    assert stop.advance(text + "b", len(text) + 1) == len(text) - 999


def test_streamed_text_ends_before_a_stop_string_and_says_why():
    texts = ["to be or not to be that is the question"] * 3
    tokenizer = train_tokenizer("char", texts, texts)
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=64,
                                    vocab_size=tokenizer.vocab_size)).eval()
    prompt = tokenizer.encode("to be")
    whole = TextStream(model, tokenizer, prompt, SamplingParams(max_new_tokens=30, temperature=0))
    text = whole.text()
    assert whole.finish_reason == "length" and whole.tokens == 30 and len(text) == 30
    stop = text[10:12]
    cut = TextStream(model, tokenizer, prompt, SamplingParams(max_new_tokens=30, temperature=0, stop=(stop,)))
    pieces = list(cut)
    assert "".join(pieces) == text[:text.find(stop)] and cut.finish_reason == "stop"
    assert all(stop not in piece for piece in pieces)


@pytest.mark.parametrize("field, value, rule", [
    ("max_new_tokens", 0, "at least 1"), ("max_new_tokens", -5, "at least 1"),
    ("temperature", -1.0, "a number >= 0"), ("temperature", math.nan, "a number >= 0"),
    ("temperature", math.inf, "a number >= 0"), ("top_k", 0, "at least 1"), ("top_k", -3, "at least 1"),
    ("top_p", 0.0, r"in \(0, 1\]"), ("top_p", 1.5, r"in \(0, 1\]"), ("top_p", math.nan, r"in \(0, 1\]"),
    ("seed", -1, "between 0 and"), ("seed", 10**23, "between 0 and"),
    ("stop", ("x" * 1001,), "strings of at most 1,000 characters"),
])
def test_sampling_params_refuse_what_cannot_be_sampled(field, value, rule):
    with pytest.raises(UserError, match=f"{field} is .*; it must be {rule}"):
        SamplingParams(**{field: value})


@pytest.mark.slow
def test_sample_prints_tokens_as_they_are_generated(tmp_path, trained):
    run = copy_run(trained, tmp_path)
    proc = spawn("sample", run, "--max-new-tokens", "1000000", "--prompt", "ROMEO:", cwd=tmp_path)
    try:
        seen, deadline = "", time.monotonic() + 120
        while len(seen) < len("ROMEO:") + 20:  # a million tokens take far longer than this loop may wait
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"nothing printed yet: {seen!r}"
            seen += os.read(proc.stdout.fileno(), 100).decode()
        assert seen.startswith("ROMEO:") and proc.poll() is None
    finally:
        proc.kill()
        proc.communicate()
    assert not (run / "samples.txt").exists()  # interrupted: no half sample recorded


def test_sample_says_the_tokens_it_generated_and_their_rate_on_stderr(tmp_path, tiny_run, capsys):
    """stdout is the text; stderr ends on the tokens generated and their rate, counted by the decoder: a sample's
    max_new_tokens (past end-of-text), each of --num-samples', a chat's reply up to its end."""
    run = copy_run(tiny_run, tmp_path)
    for args, tokens in ((["--prompt", "ROMEO:", "--max-new-tokens", "7"], "7"),
                         (["--max-new-tokens", "5", "--num-samples", "3"], "15"),
                         (["--chat", "Hi", "--max-new-tokens", "6"], r"[1-6]")):
        code, out, err = run_cli(capsys, "sample", run, *args, "--device", "cpu")
        assert code == 0 and out.strip(), err
        assert re.fullmatch(rf"generated {tokens} tokens in \d+\.\d\d s \(the prompt read first\): [\d,]+\.\d tok/s",
                            err.strip().splitlines()[-1]), err


LEGACY = Path(__file__).parent / "data" / "legacy"


def test_n_samples_drawn_in_one_batch_are_the_samples_seeded_one_by_one():
    run = RunDir(LEGACY / "trained").load("best", "cpu")
    params = SamplingParams(max_new_tokens=40, temperature=1.0, top_k=20, seed=11)
    batched = ["ROMEO:" + c.text.text for c in continue_all(run, continuing(run, "ROMEO:", 4), seeded(params, 4), 4)]
    alone = [sample(run, "ROMEO:", SamplingParams(max_new_tokens=40, temperature=1.0, top_k=20, seed=11 + i))
             for i in range(4)]
    assert batched == alone and len(set(batched)) > 1


def test_answers_decoded_in_a_batch_are_the_answers_asked_alone():
    run = RunDir(LEGACY / "finetuned").load("best", "cpu")
    asks = [(r["instruction"], r.get("input", "")) for r in json.loads(ALPACA_TINY.read_text())[:5]]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    done = []
    batched = [c.text.text for c in continue_all(run, instructing(run, asks), [params] * len(asks), 3,
                                                 progress=lambda n, total: done.append((n, total)))]
    assert batched == [text_stream(run, instructing(run, [ask]), params).text() for ask in asks]
    assert done[-1] == (5, 5)


@pytest.mark.slow
def test_sample_num_samples_prints_and_records_each_with_its_seed(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "trained", run)
    code, out, err = run_cli(capsys, "sample", run, "--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", "4",
                             "--num-samples", "3", "--device", "cpu")
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith("--- sample")] == \
        [f"--- sample {i + 1} of 3 (seed {4 + i})" for i in range(3)]
    headers = [line for line in (run / "samples.txt").read_text().splitlines() if line.startswith("--- checkpoint")]
    assert [h.split(", ")[1] for h in headers] == ["seed 4", "seed 5", "seed 6"]
    for bad in ("0", "-2"):
        code, _, err = run_cli(capsys, "sample", run, "--num-samples", bad, "--device", "cpu")
        assert code == 2 and f"argument --num-samples: '{bad}' is not a whole number from 1" in err
        assert "Traceback" not in err
    code, _, err = run_cli(capsys, "answer", run, "--data", ALPACA_TINY, "--out", tmp_path / "a.jsonl", "--batch-size",
                           "0", "--device", "cpu")
    assert code == 2 and "argument --batch-size: '0' is not a whole number from 1" in err
    assert not (tmp_path / "a.jsonl").exists()
