"""How exactly models cross between lmlab and transformers, family by family and tokenizer by tokenizer.

    python -m benchmarks.hf_parity        (from the repository root, with the test extras installed)

The models are the reference tests' (tests/hf_reference.py): tiny random transformers models of every family
imported into lmlab, and tiny lmlab runs trained 20 steps and exported. For each: the largest absolute logit
difference on 2 x 30 random tokens (lmlab against the transformers model it came from, and transformers against
the lmlab run it came from), and whether 20 greedy tokens are the same. For each tokenizer kind: whether
transformers' AutoTokenizer, loading the exported folder, gives the run's ids for every test text and decodes
them to the same text, and whether pipeline("text-generation") continues a prompt as lmlab does. For each chat
template style of tests/test_chat.py (Qwen2.5, Llama 3, Gemma): whether lmlab renders and tokenizes each
conversation as apply_chat_template does (or refuses it in the template's words where transformers raises).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import transformers
from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.errors import UserError
from lmlab.data.prepare import prepare
from lmlab.data.tokenizers import load_pretrained, train_tokenizer
from lmlab.hf import export_hf, import_hf
from lmlab.run.chat import read_chat_template
from lmlab.run.rundir import RunDir
from tests.helpers import write_config, write_corpus, write_tiny_gpt2
from tests.hf_reference import (
    CONVERSATIONS,
    EXPORTS,
    IMPORTS,
    KINDS,
    STYLES,
    chat_folder,
    hf_greedy,
    hf_logits,
    kind_run,
    lmlab_greedy,
    lmlab_logits,
    max_diff,
    pipeline_text,
    random_ids,
    sampler_text,
    tiny_hf,
    tokenizer_ids,
    train_run,
)


def imports(root: Path, corpus: Path) -> dict[str, tuple[float, bool]]:
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    bpe = train_tokenizer("bpe:300", texts, texts)
    ids, prompt, rows = random_ids(bpe.vocab_size), bpe.encode("ROMEO:\nSweet"), {}
    for case in IMPORTS:
        console.print(f"import-hf: {case}", highlight=False)
        source = tiny_hf(root / case, case, bpe, vocab_size=bpe.vocab_size + (7 if "untied" in case else 0))
        import_hf(source, root / f"{case}-run")
        rows[case] = (max_diff(lmlab_logits(root / f"{case}-run", ids), hf_logits(source, ids)),
                      lmlab_greedy(root / f"{case}-run", prompt) == hf_greedy(source, prompt))
    return rows


def exports(root: Path, dataset: Path) -> dict[str, tuple[str, float, bool]]:
    rows = {}
    for case, (_, options) in EXPORTS.items():
        console.print(f"export-hf: {case} (a short training first)", highlight=False)
        run = train_run(root / case, write_config(root / f"{case}.toml", dataset), options)
        family = export_hf(run, root / f"{case}-hf")["family"]
        ids = random_ids(RunDir(run).config().model.vocab_size)
        prompt = RunDir(run).tokenizer().encode("ROMEO:\n")
        rows[case] = (family, max_diff(hf_logits(root / f"{case}-hf", ids), lmlab_logits(run, ids)),
                      hf_greedy(root / f"{case}-hf", prompt) == lmlab_greedy(run, prompt))
    return rows


def tokenizers(root: Path, corpus: Path, gpt2_dir: Path) -> dict[str, tuple[int, int, int, bool]]:
    play = (corpus / "play0.txt").read_text()
    texts = [play[i:i + 300] for i in range(0, 3000, 300)] + [" love night", "ROMEO:"]
    rows = {}
    for kind in KINDS:
        console.print(f"tokenizer: {KINDS[kind]}", highlight=False)
        run = kind_run(root, kind, corpus, gpt2_dir)
        folder = root / f"{kind}-hf"
        theirs, ours = tokenizer_ids(folder, run, texts)
        hf_tokenizer, tokenizer = transformers.AutoTokenizer.from_pretrained(folder), RunDir(run).tokenizer()
        decoded = sum(hf_tokenizer.decode(ids) == tokenizer.decode(ids) for ids in ours)
        agrees = pipeline_text(folder, "ROMEO:") == sampler_text(run, "ROMEO:")
        rows[kind] = (len(texts), sum(a == b for a, b in zip(theirs, ours)), decoded, agrees)
    return rows


def chat_templates(root: Path, corpus: Path) -> dict[str, tuple[int, int, int]]:
    """Per style: renderings compared (conversations x with and without the generation prompt), texts equal, ids
    equal (a conversation both refuse counts as equal)."""
    rows = {}
    for style in STYLES:
        folder = chat_folder(root / style, style, corpus)
        tokenizer = load_pretrained(folder)
        ours, theirs = read_chat_template(folder, tokenizer), transformers.AutoTokenizer.from_pretrained(folder)
        same_text, same_ids, cases = 0, 0, 0
        for messages in CONVERSATIONS:
            for generation in (True, False):
                cases += 1
                try:
                    text = ours.render(messages, generation)
                except UserError:
                    text = None
                try:
                    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
                    ids = theirs.apply_chat_template(messages, add_generation_prompt=generation, return_dict=False)
                except Exception:  # the template's raise_exception: a TemplateError
                    expected = ids = None
                same_text += text == expected
                same_ids += (text is None and ids is None) or (text is not None and
                                                               tokenizer.encode(text, special=False) == ids)
        rows[style] = (cases, same_text, same_ids)
    return rows


def main() -> None:
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = write_corpus(root / "corpus")
        dataset, _, _ = prepare([str(corpus)], "char", out_dir=root / "data")
        for folder in ("imports", "exports", "kinds", "chat"):
            (root / folder).mkdir()
        imported = imports(root / "imports", corpus)
        exported = exports(root / "exports", dataset)
        kinds = tokenizers(root / "kinds", corpus, write_tiny_gpt2(root / "gpt2", corpus))
        chats = chat_templates(root / "chat", corpus)
    table = Table(title="models across lmlab <-> transformers (max |logit difference|, 20 greedy tokens)")
    for column in ("case", "family", "import: max diff", "import: greedy equal", "export: max diff",
                   "export: greedy equal"):
        table.add_column(column, justify="left" if column in ("case", "family") else "right")
    for case in IMPORTS:
        family, diff, same = exported[case] if case in exported else ("", None, None)
        table.add_row(case, family or case.split()[0], f"{imported[case][0]:.1e}", str(imported[case][1]),
                      "-" if diff is None else f"{diff:.1e}", "-" if same is None else str(same))
    for case in EXPORTS.keys() - IMPORTS.keys():
        family, diff, same = exported[case]
        table.add_row(case, family, "-", "-", f"{diff:.1e}", str(same))
    console.print(table)
    table = Table(title="tokenizers: the exported folder in AutoTokenizer and pipeline")
    for column in ("kind", "texts", "ids equal", "decode equal", "pipeline = lmlab greedy"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for kind, (n, same_ids, same_text, agrees) in kinds.items():
        table.add_row(KINDS[kind], str(n), str(same_ids), str(same_text), str(agrees))
    console.print(table)
    table = Table(title="chat templates: lmlab's rendering against apply_chat_template")
    for column in ("style", "renderings", "text equal", "ids equal"):
        table.add_column(column, justify="left" if column == "style" else "right")
    for style, (cases, same_text, same_ids) in chats.items():
        table.add_row(style, str(cases), str(same_text), str(same_ids))
    console.print(table)
    console.print(f"transformers {transformers.__version__}, {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
