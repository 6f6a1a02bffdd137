"""The same model in lmlab and in llama.cpp: batch-1 prompt and decode speed, one table.

    python -m benchmarks.llama_cpp_side_by_side [--shapes gpt2,demo] [--threads 1,all] [--tokens 256]
        [--prompt 128] [--repeats 3] [--kernel-prompt] [--no-repack]
                                                    (from the repository root, with the test extras installed)

Two shapes with random weights (speed does not depend on them), each written as a run folder and exported with
`lmlab export-gguf` at f32, f16 and q8_0: GPT-2 small's (12 layers, 768 wide, context 1024, a byte-level BPE of
50,257 tokens) and the demo model (configs/shakespeare-char-modern-cpu.toml: 4 layers, 256 wide, rope, rmsnorm,
swiglu, qk-norm, context 128, 65 characters). lmlab decodes with the compiled step `lmlab serve --compile` and
`lmlab sample --compile` use (compiling is not timed), from float32 weights and from int8 ones as `--quantize int8`
holds them (lmlab.inference.quantize: keys and values cached as bfloat16), llama.cpp through llama-cpp-python with
its own defaults (keys and values cached in float16). At 1 thread and at all of this machine's cores: "prompt tok/s"
is a prompt of `--prompt` tokens read in one pass; "decode tok/s" is `--tokens` greedy tokens after it, one at a time.
The rows of a shape and thread count alternate, each figure the best of `--repeats` rounds; rounds the machine
was busy in are named below the table.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import llama_cpp
import torch
from llama_cpp import Llama
from rich.table import Table

from benchmarks.serve_throughput import CHARS, write_run  # the same random run folder
from lmlab.commands.common import console
from lmlab.core.busy import LoadMeter, busy_warning
from lmlab.core.config import ModelConfig, SamplingParams
from lmlab.core.progress import ItemProgress
from lmlab.data.tokenizers import Tokenizer, train_tokenizer
from lmlab.gguf import export_gguf
from lmlab.inference import int8_matmul
from lmlab.inference.compiled import compile_step
from lmlab.inference.decode import Decoder, Sequence
from lmlab.inference.int8_matmul import DENSE_ROWS
from lmlab.inference.quantize import quantize
from lmlab.run.rundir import RunDir

SHAPES = {
    "gpt2": (ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50_257), "bpe:50257"),
    "demo": (ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=128, vocab_size=65, bias=False, pos_emb="rope",
                         norm="rmsnorm", mlp="swiglu", qk_norm=True), "char"),
}
GGUF_TYPES = ("f32", "f16", "q8_0")


def tokenizer(spec: str) -> Tokenizer:
    """The shape's tokenizer: Shakespeare's characters, or a byte-level BPE learned on made-up words until it has
    GPT-2's 50,257 tokens."""
    if spec == "char":
        return train_tokenizer(spec, [CHARS], [CHARS])
    rng = random.Random(0)
    words = " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                     for _ in range(300_000))
    return train_tokenizer(spec, [words[i:i + 100_000] for i in range(0, len(words), 100_000)], [])


def prompt_ids(vocab_size: int, length: int) -> list[int]:
    return [random.Random(1).randrange(vocab_size) for _ in range(length)]


class Lmlab:
    """lmlab's decoder with its compiled step at the thread count it was compiled for, from weights quantized as
    `quantized` says."""

    def __init__(self, run: Path, threads: int, quantized: str = "none", dense_rows: int = DENSE_ROWS):
        torch.set_num_threads(threads)
        self.model, self.threads = quantize(RunDir(run).load("best", "cpu").model, quantized), threads
        self.step, self.dense_rows = compile_step(self.model, 1, torch.float32), dense_rows

    def measure(self, prompt: list[int], tokens: int) -> tuple[float, float]:
        torch.set_num_threads(self.threads)
        decoder = Decoder(self.model, 1, torch.float32, self.step)
        seq = Sequence(list(prompt), SamplingParams(max_new_tokens=tokens, temperature=0))
        started = time.perf_counter()
        with mock.patch.object(int8_matmul, "DENSE_ROWS", self.dense_rows):
            decoder.join(seq)
        read = time.perf_counter()
        while not seq.exhausted:
            decoder.step()
        return len(prompt) / (read - started), tokens / (time.perf_counter() - read)


class LlamaCpp:
    """llama.cpp on an exported file, its defaults but the threads; without `repack`, its weights are not repacked
    into its extra buffer types (its AMX and repacked kernels)."""

    def __init__(self, path: Path, threads: int, context: int, repack: bool = True):
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def unrepacked() -> Any:
            params = defaults()
            params.use_extra_bufts = False
            return params

        with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", defaults if repack else unrepacked):
            self.model = Llama(str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads, n_batch=context,
                               verbose=False)

    def measure(self, prompt: list[int], tokens: int) -> tuple[float, float]:
        self.model.reset()
        started = time.perf_counter()
        self.model.eval(prompt)
        read = time.perf_counter()
        for _ in range(tokens):
            self.model.eval([int(self.model.scores[self.model.n_tokens - 1].argmax())])
        return len(prompt) / (read - started), tokens / (time.perf_counter() - read)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="gpt2,demo")
    parser.add_argument("--threads", default="1,all", help="thread counts; all: this process's cores")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernel-prompt", action="store_true",
                        help="also lmlab's int8 with its prompt through the int8 kernel, not densely (DENSE_ROWS)")
    parser.add_argument("--no-repack", action="store_true",
                        help="llama.cpp without its repacked weights (its AMX kernels crashed on one AMX host)")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    threads = sorted({cores if t == "all" else int(t) for t in args.threads.split(",")})
    shapes = args.shapes.split(",")
    table = Table("model", "threads", "engine", "prompt tok/s", "decode tok/s",
                  title=f"Batch-1 speed: a prompt of {args.prompt} tokens (half the context at most), then up to "
                        f"{args.tokens} decoded ({cores} cores, torch {torch.__version__}"
                        f"{', llama.cpp not repacking' if args.no_repack else ''})")
    progress, warnings = ItemProgress(console, len(shapes) * len(threads) * (1 + args.repeats)), []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            config, spec = SHAPES[shape]
            run = write_run(Path(tmp) / shape, config, spec, tokenizer(spec))
            files = {kind: Path(export_gguf(run, Path(tmp) / f"{shape}-{kind}.gguf", kind=kind)["out"])
                     for kind in GGUF_TYPES}
            prompt, context = prompt_ids(config.vocab_size, min(args.prompt, config.block_size // 2)), config.block_size
            tokens = min(args.tokens, context - len(prompt) - 1)
            for count in threads:
                progress.start(f"{shape}, {count} threads: compiling lmlab's step, loading llama.cpp")
                engines = {"lmlab compiled (f32)": Lmlab(run, count),
                           "lmlab compiled (int8)": Lmlab(run, count, "int8"),
                           **({"lmlab compiled (int8), kernel prompt": Lmlab(run, count, "int8", sys.maxsize)}
                              if args.kernel_prompt else {}),
                           **{f"llama.cpp {kind}": LlamaCpp(path, count, context, not args.no_repack)
                              for kind, path in files.items()}}
                best = {name: (0.0, 0.0) for name in engines}
                for repeat in range(args.repeats):  # alternating, so that a slow moment hits every engine
                    progress.start(f"{shape}, {count} threads: round {repeat + 1} of {args.repeats}")
                    with LoadMeter() as meter:
                        for name, engine in engines.items():
                            rates = engine.measure(prompt, tokens)
                            best[name] = tuple(max(a, b) for a, b in zip(best[name], rates))
                    warnings.append(busy_warning(f"{shape}, {count} threads, round {repeat + 1}", meter.load,
                                                 "its rates read low (the best round is kept)"))
                for name, (read, decode) in best.items():
                    table.add_row(shape, str(count), name, f"{read:,.0f}", f"{decode:,.1f}")
    console.print(table)
    for warning in filter(None, warnings):
        console.print(warning, style="yellow", markup=False)


if __name__ == "__main__":
    main()
