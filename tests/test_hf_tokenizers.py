"""Tokenizers across the boundary: every lmlab kind exported so that transformers' AutoTokenizer gives lmlab's ids
and pipeline("text-generation") runs, and read back as the same kind; another model's tokenizer (a Llama's, whose
end-of-text is `</s>`) in import-hf, prepare, sampling and fine-tuning; what import-hf refuses without one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmlab.core.errors import UserError
from lmlab.data.prepare import prepare
from lmlab.data.shards import open_tokens
from lmlab.data.tokenizers import EOT, TOKENIZER_KINDS, Tokenizer, train_tokenizer
from lmlab.hf import import_hf
from lmlab.inference.generate import document_start
from lmlab.run.prompt import alpaca_format
from lmlab.run.rundir import RunDir
from tests.helpers import write_corpus

transformers = pytest.importorskip("transformers")
from tests.hf_reference import (  # noqa: E402
    KINDS,
    hf_logits,
    kind_run,
    lmlab_logits,
    max_diff,
    pipeline_text,
    random_ids,
    sampler_text,
    tiny_hf,
)

EACH_KIND = [pytest.param(k, marks=pytest.mark.slow if k in ("gpt2", "tiktoken") else ()) for k in KINDS]


class KindRuns(dict):
    """A tiny trained run of each tokenizer kind (`kind_run`), made when a test first asks for it."""

    def __init__(self, root: Path, corpus: Path, gpt2_dir: Path):
        super().__init__()
        self.root, self.corpus, self.gpt2_dir = root, corpus, gpt2_dir

    def __missing__(self, kind: str) -> Path:
        self[kind] = kind_run(self.root, kind, self.corpus, self.gpt2_dir)
        return self[kind]


@pytest.fixture(scope="session")
def kind_runs(tmp_path_factory, corpus_dir, hf_gpt2) -> KindRuns:
    return KindRuns(tmp_path_factory.mktemp("kinds"), corpus_dir, hf_gpt2)


def corpus_texts(corpus_dir: Path) -> list[str]:
    play = (corpus_dir / "play0.txt").read_text()
    return [play[:400], play[1000:1100], " love night", "ROMEO:"]


@pytest.mark.parametrize("kind", EACH_KIND)
@pytest.mark.slow
def test_autotokenizer_gives_the_runs_ids_and_text(kind, kind_runs, corpus_dir):
    run, folder = kind_runs[kind], kind_runs[kind].with_name(f"{kind}-hf")
    theirs, ours = transformers.AutoTokenizer.from_pretrained(folder), RunDir(run).tokenizer()
    texts = corpus_texts(corpus_dir) + (["an unseen word: zebra"] if kind != "char" else [])
    for text in texts:
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids
        assert theirs.decode(ids) == ours.decode(ids)
    # A char run has no end-of-text token, so neither eos nor pad: a pad named by the user is any character.
    eot = None if kind == "char" else ours.eot_id
    assert theirs.eos_token_id == theirs.pad_token_id == eot
    if kind == "char":
        theirs.pad_token = ours.decode([0])
    for side in ("right", "left"):  # a padded batch: each text's own ids where the attention mask is 1
        theirs.padding_side = side
        batch = theirs(texts, padding=True)
        assert len({len(ids) for ids in batch["input_ids"]}) == 1
        unpadded = [[i for i, m in zip(ids, mask) if m]
                    for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        assert unpadded == [ours.encode(text) for text in texts]
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    assert settings["lmlab_tokenizer"] == KINDS[kind]


@pytest.mark.parametrize("kind", EACH_KIND)
@pytest.mark.slow
def test_the_exported_model_is_the_runs_distribution_over_its_whole_vocabulary(kind, kind_runs):
    run, folder = kind_runs[kind], kind_runs[kind].with_name(f"{kind}-hf")
    ids = random_ids(RunDir(run).config().model.vocab_size)
    theirs, ours = hf_logits(folder, ids), lmlab_logits(run, ids)
    assert theirs.shape == ours.shape  # not a row more than the model has
    assert max_diff(theirs.log_softmax(-1), ours.log_softmax(-1)) < 1e-4
    # A padded batch gives each text's own next-token logits at its last token.
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.decode([0])
    texts = ["ROMEO:", "JULIET: sweet love"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        padded = model(**batch).logits
    for row, text in enumerate(texts):
        alone = lmlab_logits(run, torch.tensor([RunDir(run).tokenizer().encode(text)]))[0, -1]
        assert max_diff(padded[row, batch["attention_mask"][row].sum() - 1], alone) < 1e-4


@pytest.mark.slow
def test_a_char_export_generates_to_max_new_tokens_as_lmlab_sample_does(kind_runs):
    folder = kind_runs["char"].with_name("char-hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = torch.tensor([RunDir(kind_runs["char"]).tokenizer().encode("ROMEO:")])
    for seed in range(10):  # within the context of 32
        torch.manual_seed(seed)
        out = model.generate(prompt, do_sample=True, max_new_tokens=25)
        assert out.shape[1] == prompt.shape[1] + 25


@pytest.mark.parametrize("kind", EACH_KIND)
@pytest.mark.slow
def test_the_exported_folder_runs_in_a_text_generation_pipeline(kind, kind_runs):
    run, folder = kind_runs[kind], kind_runs[kind].with_name(f"{kind}-hf")
    assert pipeline_text(folder, "ROMEO:") == sampler_text(run, "ROMEO:")


@pytest.mark.parametrize("kind", EACH_KIND)
def test_an_exported_tokenizer_comes_back_as_the_same_kind(kind, kind_runs, tmp_path):
    folder = kind_runs[kind].with_name(f"{kind}-hf")
    import_hf(folder, tmp_path / "back")
    back, original = RunDir(tmp_path / "back").tokenizer(), RunDir(kind_runs[kind]).tokenizer()
    assert (back.spec, back.eot_id, back.identity()) == (original.spec, original.eot_id, original.identity())


def test_prepare_with_a_runs_tokenizer_keeps_its_kind_and_ids(kind_runs, tmp_path):
    corpus = write_corpus(tmp_path / "more", seed=1)
    word_run = kind_runs["word"]
    target, meta, _ = prepare([str(corpus)], str(word_run), name="more", out_dir=tmp_path / "data")
    assert target.name == "more-word200" and meta["tokenizer"] == "word:200"
    assert meta["tokenizer_identity"] == RunDir(word_run).tokenizer().identity()
    assert prepare([str(corpus)], str(word_run), name="more", out_dir=tmp_path / "data")[2] is False  # reused
    # The same spec trained afresh on this corpus is another tokenizer: not mistaken for the dataset above.
    with pytest.raises(UserError, match="already holds a different dataset"):
        prepare([str(corpus)], "word:200", name="more", out_dir=tmp_path / "data")
    (tmp_path / "odd.txt").write_text("ROMEO:\nA zebra in Zürich,\n" * 20)
    with pytest.raises(UserError, match="never saw"):  # a char run's tokenizer knows only its corpus' characters
        prepare([str(tmp_path / "odd.txt")], str(kind_runs["char"]), out_dir=tmp_path / "data")
    with pytest.raises(UserError, match="pretrained:x is how lmlab records a tokenizer read from a folder"):
        prepare([str(corpus)], "pretrained:x", out_dir=tmp_path / "data")


def llama_style_tokenizer(texts: list[str]) -> tokenizers.Tokenizer:
    """A byte-level BPE whose end-of-text is `</s>`, as Llama's and Mistral's are: no `<|endoftext|>` at all."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    return backend


def test_another_models_end_of_text_is_used_in_prepare_sample_and_prompts(tmp_path, corpus_dir):
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]
    tokenizer = Tokenizer("pretrained:Llama-ish", llama_style_tokenizer(texts))
    folder = tiny_hf(tmp_path / "Llama-ish", "llama", None, vocab_size=tokenizer.vocab_size)
    tokenizer.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    import_hf(folder, tmp_path / "run")
    run = RunDir(tmp_path / "run").load("best", "cpu")
    eos = tokenizer.vocab["</s>"]
    assert (run.tokenizer.spec, run.tokenizer.eot_id) == ("pretrained:Llama-ish", eos)
    assert EOT not in run.tokenizer.vocab
    assert alpaca_format(run.tokenizer).end == "</s>" and document_start(run.tokenizer) == [eos]
    target, meta, _ = prepare([str(corpus_dir)], str(folder), name="plays", out_dir=tmp_path / "data")
    assert target.name == "plays-pretrainedLlama-ish" and meta["eot_id"] == eos
    tokens = np.concatenate([np.asarray(open_tokens(target, split, meta["dtype"])) for split in ("train", "val")])
    assert (tokens == eos).sum() == meta["train"]["documents"] + meta["val"]["documents"]  # one after each
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()),
                                                    "eos_token_id": None}))
    os.remove(folder / "generation_config.json")
    with pytest.raises(UserError, match="names no end-of-text token"):
        import_hf(folder, tmp_path / "no-eos")


def test_import_needs_a_tokenizer_that_fits_the_model(tmp_path, corpus_dir, hf_gpt2, monkeypatch):
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]
    bpe = train_tokenizer("bpe:300", texts, texts)
    bare = tiny_hf(tmp_path / "bare", "qwen3", None, vocab_size=bpe.vocab_size)
    with pytest.raises(UserError, match="has no tokenizer files .* pass --tokenizer DIR_OR_FILE naming the model's "
                                        r"tokenizer\.$"):
        import_hf(bare, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="is neither a folder nor a tokenizer.json file"):
        import_hf(bare, tmp_path / "run", tokenizer=tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(UserError, match="is not a tokenizer the tokenizers library reads"):
        import_hf(bare, tmp_path / "run", tokenizer=tmp_path / "tokenizer.json")
    bpe.save(tmp_path / "tokenizer.json")
    import_hf(bare, tmp_path / "run", tokenizer=tmp_path / "tokenizer.json")
    assert RunDir(tmp_path / "run").tokenizer().encode("ROMEO:") == bpe.encode("ROMEO:")
    small = tiny_hf(tmp_path / "small", "llama", None, vocab_size=bpe.vocab_size - 1)
    with pytest.raises(UserError, match=f"has {bpe.vocab_size} tokens but the model only {bpe.vocab_size - 1} "
                                        "embedding rows"):
        import_hf(small, tmp_path / "small-run", tokenizer=tmp_path / "tokenizer.json")
    # A GPT-2 without tokenizer files takes GPT-2's from $LMLAB_GPT2_DIR, as `prepare --tokenizer gpt2` does.
    gpt2 = tiny_hf(tmp_path / "gpt2", "gpt2", None, vocab_size=400)
    monkeypatch.delenv("LMLAB_GPT2_DIR", raising=False)
    with pytest.raises(UserError, match=r"\(or set \$LMLAB_GPT2_DIR\)"):
        import_hf(gpt2, tmp_path / "gpt2-run")
    monkeypatch.setenv("LMLAB_GPT2_DIR", str(hf_gpt2))
    assert import_hf(gpt2, tmp_path / "gpt2-run")["tokenizer"] == "gpt2"


@pytest.mark.parametrize("kind", EACH_KIND)
def test_llama_cpp_tokenizes_every_exported_kind_as_lmlab_does(kind, kind_runs, corpus_dir, tmp_path):
    """export-gguf's vocabulary for each tokenizer kind, read by llama.cpp itself. Refused: a kind whose entry
    exports to no GGUF tokenizer, and the tests' tiny tiktoken table, whose ` and` its merges never make (` a` comes
    first), which tiktoken takes whole and llama.cpp's BPE cannot."""
    pytest.importorskip("llama_cpp")
    from lmlab.gguf import export_gguf
    from tests.gguf_reference import llama, llama_tokens

    run, out = kind_runs[kind], tmp_path / f"{kind}.gguf"
    refusals = {"tiktoken": "has tokens its merges never make, such as ' and'"}
    if kind in refusals or TOKENIZER_KINDS[kind].gguf is None:
        with pytest.raises(UserError, match=refusals.get(kind, "export-gguf takes")):
            export_gguf(run, out)
        assert not out.exists()
        return
    export_gguf(run, out)
    ours = RunDir(run).tokenizer()
    texts = corpus_texts(corpus_dir) + (["an unseen word: zebra, 42 times!"] if kind != "char" else [])
    with llama(out, RunDir(run).config().model.block_size) as model:
        for text in texts:
            assert llama_tokens(model, text) == ours.encode(text), text
            assert model.detokenize(ours.encode(text)).decode() == ours.decode(ours.encode(text))
