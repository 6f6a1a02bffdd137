"""Multiple-choice tasks in pieces: both layouts read as lm-evaluation-harness reads them (its own HellaSwag
preparation is the reference), every bad task line refused in one sentence, (context, continuation) pairs encoded
as lm-eval encodes them, batched scoring equal to scoring one choice at a time for every model kind, what cannot
be scored counted, checkpoint specs, and evaluations.json kept whole under concurrent writers."""

from __future__ import annotations

import json
import multiprocessing
import random
import shutil
from pathlib import Path

import pytest
import torch

from lmlab.commands import main
from lmlab.core.config import ModelConfig, checkpoint_name
from lmlab.core.errors import UserError
from lmlab.data.tokenizers import Tokenizer
from lmlab.evals.tasks import encode_pair, encode_task, load_task
from lmlab.inference.scoring import Choice, loglikelihoods
from lmlab.model import LanguageModel, build_model
from lmlab.run.rundir import RunDir

LEGACY = Path(__file__).parent / "data" / "legacy"


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


HELLASWAG = {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow "
             "covering the window of a car, and a woman wearing winter clothes smiles.",
             "ctx_b": "then, the man continues removing the snow on his car.", "ctx": "unused when ctx_a is there",
             "endings": [", the man adds wax to the windshield and cuts it.", " [title] Gently scrape  the ice. "
                         "[step] Use a plastic scraper.", ", the man puts on a christmas coat, knitted with netting.",
                         "the man continues removing the snow on his car."], "label": "3", "split": "val"}


def test_hellaswag_lines_are_prepared_as_lm_evaluation_harness_prepares_them(tmp_path):
    utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")  # the reference's own preparation
    only_ctx = {**{k: v for k, v in HELLASWAG.items() if k not in ("ctx_a", "ctx_b")}, "ctx": "A [header] ctx  here",
                "label": 0}
    task = load_task(str(write_lines(tmp_path / "hellaswag_val.jsonl", [HELLASWAG, only_ctx])))
    assert (task.name, task.layout, len(task.items)) == ("hellaswag_val", "hellaswag", 2)
    first = task.items[0]
    ctx = HELLASWAG["ctx_a"] + " " + HELLASWAG["ctx_b"].capitalize()
    assert first.context == utils.preprocess(HELLASWAG["activity_label"] + ": " + ctx)
    assert first.choices == tuple(utils.preprocess(e) for e in HELLASWAG["endings"]) and first.answer == 3
    assert "[" not in first.choices[1] and "Gently scrape the ice. Use" in first.choices[1]
    assert task.items[1].context == utils.preprocess("Removing ice from car: A [header] ctx  here")
    assert task.chance == 0.25 and len(task.sha256) == 64


def test_the_generic_layout_and_the_limit(tmp_path):
    rows = [{"context": f"Question {i}?", "choices": ["yes", "no", "maybe"][: 2 + i % 2], "answer": i % 2}
            for i in range(5)]
    path = write_lines(tmp_path / "mine.jsonl", [rows[0], "", *rows[1:]])  # a blank line is skipped
    task = load_task(str(path), limit=3)
    assert [(i.context, i.answer, i.line) for i in task.items] == [("Question 0?", 0, 1), ("Question 1?", 1, 3),
                                                                   ("Question 2?", 0, 4)]
    assert task.chance == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert load_task(str(path)).sha256 == task.sha256  # the file's hash, whatever the limit


GOOD = {"context": "c", "choices": ["a", "b"], "answer": 1}
BAD_LINES = [
    ({k: v for k, v in GOOD.items() if k != "answer"}, r"line 1, has no `answer`"),
    ({**GOOD, "answer": 2}, r"line 1, `answer` is 2, out of range for 2 choices \(0 to 1\)"),
    ({**GOOD, "answer": -1}, r"`answer` is -1, out of range"),
    ({**GOOD, "answer": "b"}, r"`answer` is 'b'; it must be the index of the right choice"),
    ({**GOOD, "answer": True}, r"`answer` is True"),
    ({**GOOD, "choices": ["a", " "]}, r"choice 1 of `choices` is empty"),
    ({**GOOD, "choices": ["only one"]}, r"`choices` must be a list of at least two texts"),
    ({**GOOD, "choices": "a b"}, r"`choices` must be a list"),
    ({**GOOD, "context": 7}, r"`context` is 7; it must be text"),
    ({"question": "q", "options": ["a", "b"]}, r"line 1, is neither layout"),
    ({**HELLASWAG, "label": ""}, r"`label` is ''.*HellaSwag test split has no labels"),
    ({k: v for k, v in HELLASWAG.items() if k not in ("ctx", "ctx_b")}, r"has no `ctx`"),
    ({**HELLASWAG, "endings": ["a", "[title]"]}, r"choice 1 of `endings` is empty"),
    ({**HELLASWAG, "activity_label": 7}, r"has a context field that is not text"),
    ({**HELLASWAG, "ctx_b": None}, r"has a context field that is not text"),
    ("{not json", r"line 1, is not a JSON object; each line is one item"),
    ('[{"context": "c"}]', r"a JSON list: write one object per line"),
    ("7", r"line 1, is not a JSON object; each line"),
    ('{"context": "\\ud800x", "choices": ["a", "b"], "answer": 0}', r"holds '\\ud800', half of a UTF-16 pair"),
]


@pytest.mark.parametrize("line, message", BAD_LINES, ids=[m.split(",")[-1][:30] for _, m in BAD_LINES])
def test_a_bad_task_line_is_refused_in_one_sentence_naming_file_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "task.jsonl", [line])
    with pytest.raises(UserError, match=message) as caught:
        load_task(str(path))
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_unreadable_and_empty_task_files(tmp_path):
    with pytest.raises(UserError, match="cannot be read"):
        load_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="holds no items"):
        load_task(str(write_lines(tmp_path / "empty.jsonl", ["", "  "])))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"context": "caf\xe9"}\n')
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_task(str(tmp_path / "latin1.jsonl"))


def test_a_bad_task_file_stops_eval_with_one_line_and_status_2(tmp_path, capsys):
    path = write_lines(tmp_path / "task.jsonl", [GOOD, {**GOOD, "answer": 9}])
    assert main(["eval", str(LEGACY / "trained"), "--task", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2, `answer` is 9, out of range for 2 choices" in err[0]
    assert not (LEGACY / "trained" / "evaluations.json").exists()


def test_pairs_are_encoded_as_lm_eval_encodes_them(imported_gpt2):
    tokenizer = RunDir(imported_gpt2).tokenizer()
    pair = encode_pair(tokenizer, "JULIET: o sweet ", " love")  # the context's trailing space moves on
    assert pair.context == tuple(tokenizer.encode("JULIET: o sweet"))
    assert pair.context + pair.continuation == tuple(tokenizer.encode("JULIET: o sweet  love"))
    empty = encode_pair(tokenizer, "", " love")
    assert empty == Choice((tokenizer.eot_id,), tuple(tokenizer.encode(" love")))


MODELS = {
    "gpt-2": ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=50),
    "modern-gqa": ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=24, vocab_size=50, pos_emb="rope",
                              norm="rmsnorm", mlp="swiglu", qk_norm=True, n_kv_head=2),
    "gru": ModelConfig(kind="recurrent", n_layer=2, n_embd=32, block_size=24, vocab_size=50),
    "lstm": ModelConfig(kind="recurrent", n_layer=1, n_embd=32, block_size=24, vocab_size=50, rnn_cell="lstm"),
}


def reference(model, choice: Choice) -> float:
    """One choice scored alone, as lm-eval's hf backend does: the last block_size + 1 tokens but the last."""
    window = (choice.context + choice.continuation)[-(model.config.block_size + 1):]
    logits = model(torch.tensor([window[:-1]]))[0][0]
    logprobs = torch.log_softmax(logits.double(), -1)
    n = len(choice.continuation)
    return sum(logprobs[len(window) - 1 - n + k, t].item() for k, t in enumerate(choice.continuation))


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.slow
def test_batched_scoring_equals_scoring_each_choice_alone(kind):
    torch.manual_seed(0)
    model = build_model(MODELS[kind]).eval()
    for p in model.parameters():
        p.data.mul_(4)  # far from uniform, so log-likelihoods differ a lot
    rng, choices = random.Random(0), []
    for length in (1, 2, 5, 12, 20, 23, 30):  # one-token contexts, contexts that fill or pass the window
        context = tuple(rng.randrange(50) for _ in range(length))
        choices += [Choice(context, tuple(rng.randrange(50) for _ in range(rng.randint(1, 9)))) for _ in range(4)]
    expected = [reference(model, c) for c in choices]
    for options in ({}, {"share": False}, {"max_rows": 3, "max_tokens": 30}):
        got = loglikelihoods(model, choices, **options)
        assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4, options


class Stateless(LanguageModel):  # the least a model plugin writes: no decode state (new_cache gives None)
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = torch.nn.Embedding(config.vocab_size, config.n_embd)
        self.mix = torch.nn.Linear(2 * config.n_embd, config.vocab_size)

    def forward(self, idx, targets=None, cache=None):
        x = self.wte(idx)
        return self.mix(torch.cat([x, torch.nn.functional.pad(x, (0, 0, 1, 0))[:, :-1]], -1)), None


def test_choices_sharing_a_context_are_scored_alone_by_a_model_without_a_decode_state():
    torch.manual_seed(0)
    model = Stateless(MODELS["gpt-2"]).eval()
    context = (3, 1, 4, 1, 5)
    choices = [Choice(context, (9, 2)), Choice(context, (6,)), Choice(context, (5, 3, 5)), Choice((2, 7), (1,))]
    expected = [reference(model, c) for c in choices]
    for options in ({}, {"share": False}):  # sharing a context's forward needs a decode state to carry it
        got = loglikelihoods(model, choices, **options)
        assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4, options


def char_tokenizer(text: str) -> Tokenizer:
    from lmlab.data.tokenizers import train_tokenizer

    return train_tokenizer("char", [text], [text])


def test_what_cannot_be_scored_is_counted_and_what_is_too_long_is_cut_from_the_left(tmp_path):
    tokenizer = char_tokenizer("abcdefgh xyz:?")
    rows = [{"context": "abc:", "choices": ["def", "gh"], "answer": 0},
            {"context": "café?", "choices": ["a", "b"], "answer": 1},  # é never seen
            {"context": "ab", "choices": ["ñ", "b"], "answer": 1},  # ñ neither
            {"context": "x" * 30, "choices": ["abc", "de"], "answer": 0},  # context + choice beyond the window
            {"context": "a", "choices": ["b" * 17, "c"], "answer": 0}]  # a choice longer than the window
    task = load_task(str(write_lines(tmp_path / "t.jsonl", rows)))
    encoded = encode_task(task, tokenizer, block_size=16)
    assert (encoded.skipped_unseen, encoded.unseen, encoded.skipped_long, encoded.truncated) == (2, "éñ", 1, 1)
    assert [i.line for i in encoded.items] == [1, 4] and len(encoded.choices) == 4
    assert encoded.choices[2].truncated(16) and encoded.choices[2].window(16)[-4:] == \
        tuple(tokenizer.encode("x abc"))[:-1][-4:]


def test_checkpoint_specs_and_the_refusal_of_a_missing_step(tmp_path):
    assert [checkpoint_name(s) for s in ("best", "latest", "10", "step_10", "step_000010", " 7 ")] == \
        ["best", "latest", "step_000010", "step_000010", "step_000010", "step_000007"]
    for bad in ("-1", "newest", "1e3", "step_", "nan", str(10**30)):
        with pytest.raises(UserError, match="is unknown; use best, latest, or a step"):
            checkpoint_name(bad)
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "trained", run)
    assert RunDir(run).checkpoint("10") == RunDir(run).checkpoint("best") == run / "checkpoints" / "step_000010"
    assert RunDir(run).load("step_10", "cpu").checkpoint == "step_000010"
    with pytest.raises(UserError, match=r"has no checkpoint at step 20; it has step 10 \(best 10, latest 10\); pass "
                                        r"--checkpoint with one of them"):
        RunDir(run).load("20", "cpu")


def _keep_many(path: str, first: int) -> None:
    for i in range(first, first + 15):
        RunDir(path).keep("tasks", {"weights_sha256": "w", "task_sha256": str(i), "limit": None, "acc": i})


def test_results_kept_by_concurrent_evaluations_are_all_kept(tmp_path):
    run = RunDir(tmp_path)
    run.keep("results", {"weights_sha256": "w", "val_sha256": "v", "dtype": "float32", "max_tokens": None, "loss": 1})
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.starmap(_keep_many, [(str(tmp_path), 0), (str(tmp_path), 100)])
    assert sorted(r["acc"] for r in run.kept("tasks")) == [*range(15), *range(100, 115)]
    run.keep("tasks", {"weights_sha256": "w", "task_sha256": "3", "limit": None, "acc": -1})  # replaces its key
    run.keep("tasks", {"weights_sha256": "w", "task_sha256": "3", "limit": 5, "acc": -5})  # a limit of its own
    assert [r["acc"] for r in run.kept("tasks") if r["task_sha256"] == "3"] == [-1, -5]
    assert [r["loss"] for r in run.kept("results")] == [1]  # the other sections untouched
