"""How exactly `lmlab export-gguf` files run in llama.cpp: one table, run kind by weight type.

    python -m benchmarks.gguf_parity        (from the repository root, with the test extras installed)

The runs are tiny and made here (as tests/test_gguf.py makes them): a char run of GPT-2's shape with the exact GELU
(lmlab's default) and one with OpenAI's tanh GELU, bpe runs of Qwen3's and Llama's shapes (llama.cpp's `llama`,
its rotary pairs interleaved), and imported random Llama and Qwen2 models with a bpe tokenizer. Each is exported at
f32, f16, bf16 and q8_0 and loaded by llama.cpp (llama-cpp-python, one thread):
whether it tokenizes the prompt into lmlab's ids, whether its greedy continuation of 50 tokens (or to the context)
is `lmlab sample --temperature 0`'s, and the largest absolute difference of a logit over the prompt's positions.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.table import Table

from lmlab.commands.common import console
from lmlab.data.prepare import PrepareOptions, prepare
from lmlab.data.tokenizers import train_tokenizer
from lmlab.gguf import export_gguf
from lmlab.hf import import_hf
from lmlab.run.rundir import RunDir
from tests.gguf_reference import parity
from tests.helpers import write_config, write_corpus
from tests.hf_reference import LLAMA_OPTIONS, tiny_hf, train_run

TYPES = ("f32", "f16", "bf16", "q8_0")
TRAIN = ["model.block_size=80", "train.max_iters=60", "train.eval_interval=60", "train.checkpoint_interval=60",
         "train.learning_rate=1e-2"]
QWEN3 = [*LLAMA_OPTIONS, "model.qk_norm=true", "model.n_kv_head=2"]


def runs(root: Path, corpus: Path) -> dict[str, Path]:
    """The runs to export, by their row's name."""
    data = {kind: prepare([str(corpus)], kind, out_dir=root / "data", options=PrepareOptions(workers=1))[0]
            for kind in ("char", "bpe:300")}
    made = {}
    for name, kind, options in (("char, gpt2 (exact GELU)", "char", []),
                                ("char, gpt2 (tanh GELU)", "char", ['model.gelu_approx="tanh"']),
                                ("bpe, qwen3", "bpe:300", QWEN3), ("bpe, llama", "bpe:300", LLAMA_OPTIONS)):
        console.print(f"training: {name}", highlight=False)
        folder = root / name.replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
        made[name] = train_run(folder, write_config(root / f"{folder.name}.toml", data[kind]), [*TRAIN, *options])
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    bpe = train_tokenizer("bpe:300", texts, texts)
    for case in ("llama gqa untied bias", "qwen2"):
        made[f"imported {case}"] = Path(import_hf(tiny_hf(root / case, case, bpe), root / f"{case}-run")["run"])
    return made


def main() -> None:
    table = Table("run, architecture", "type", "tokens equal", "greedy equal (tokens)", "max |logit diff|",
                  title="lmlab export-gguf in llama.cpp (llama-cpp-python, 1 thread)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, run in runs(root, write_corpus(root / "corpus")).items():
            loaded = RunDir(run).load("best", "cpu")
            for kind in TYPES:
                console.print(f"export-gguf: {name}, {kind}", highlight=False)
                out = export_gguf(run, root / "out" / f"{run.name}-{kind}.gguf", kind=kind)
                found = parity(Path(out["out"]), loaded)
                table.add_row(f"{name} ({out['arch']})", kind, "yes" if found.tokens_equal else "NO",
                              f"{'yes' if found.greedy_equal else 'NO'} ({found.greedy_tokens})",
                              f"{found.max_logit_diff:.2e}")
    console.print(table)


if __name__ == "__main__":
    main()
