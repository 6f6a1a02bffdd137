"""lmlab's decoding beside Hugging Face transformers' `generate` (static cache, compiled) on the same weights.

    python -m benchmarks.hf_decode_speed [--tokens 500] [--batches 1 8] [--device auto] [--tiny]
                                          (from the repository root, with the test extras installed)

For each shape, a random transformers model is imported into lmlab (import-hf) and lmlab's export-hf of that run is
what transformers loads, so both decode the same weights: GPT-2 small (12 layers, 768 wide, 50,257 tokens) and the
demo's size (4 layers, 256 wide, a Qwen3-style block: rope, RMSNorm, SwiGLU, QK-norm; 65 characters), both with a
context of 1,024 so that 500 tokens need no window restart on either side. Each row decodes `--tokens` greedy
tokens from one token per sequence at each batch size, timed from the first step to the last (building is timed
apart: "build s"); the rows of a shape alternate and each figure is the best of `--repeats`. lmlab's rows: eager;
the step `lmlab.inference.steps` chooses (CUDA graphs on a GPU, AOTInductor on a CPU with --compile); on a GPU also
torch.compile mode="reduce-overhead" per bucket, the alternative the choice would take if it measured faster (on
a CPU instead the graph step's twin, which replays the eager step: the dry run of that path).
transformers' row: `generate(cache_implementation="static")`, which compiles its forward (reduce-overhead) on a GPU
by itself; on a CPU it does not, and the row says so. `--tiny` (2 layers, 64 wide) is the dry run for a CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import tokenizers
import torch
from rich.table import Table
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter, busy_warning
from lmlab.core.config import SamplingParams
from lmlab.core.device import resolve_device
from lmlab.hf import export_hf, import_hf
from lmlab.inference.decode import Decoder, Sequence
from lmlab.inference.generate import decoding_only
from lmlab.inference.graphs import GraphStep, recorded
from lmlab.inference.steps import StepChoice, build_step, choose_step
from lmlab.run.rundir import RunDir


def shapes(tiny: bool) -> dict[str, object]:
    """transformers models by name, random; `tiny` ones for a dry run."""
    context = dict(n_positions=1024) if not tiny else dict(n_positions=256)
    gpt2 = GPT2Config(**context, **(dict(n_layer=2, n_embd=64, n_head=2, vocab_size=500) if tiny else {}))
    demo = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                intermediate_size=128) if tiny else dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                                         num_key_value_heads=4, head_dim=64, intermediate_size=768)
    qwen = Qwen3Config(vocab_size=65, max_position_embeddings=context["n_positions"], tie_word_embeddings=True, **demo)
    name = "tiny " if tiny else ""
    return {f"{name}GPT-2 small shape": GPT2LMHeadModel(gpt2), f"{name}demo size (Qwen3-style)": Qwen3ForCausalLM(qwen)}


def exported(model, root: Path) -> tuple[Path, Path]:
    """`model` saved with a word tokenizer of its vocabulary, imported as an lmlab run, and that run exported."""
    vocab = model.config.vocab_size
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({**{f"w{i}": i for i in range(vocab - 1)},
                                                              "<|endoftext|>": vocab - 1}, unk_token="<|endoftext|>"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    for config in (model.config, model.generation_config):
        config.bos_token_id = config.eos_token_id = vocab - 1
    model.save_pretrained(root / "source")
    words.save(str(root / "source" / "tokenizer.json"))
    import_hf(root / "source", root / "run")
    export_hf(root / "run", root / "exported")
    return root / "run", root / "exported"


def lmlab_rate(decoder: Decoder, batch: int, tokens: int) -> float:
    """`batch` sequences decoded together by `decoder` (one per path: its step captured over its state)."""
    seqs = [Sequence([i], SamplingParams(max_new_tokens=tokens, temperature=0)) for i in range(batch)]
    sync(decoder.device)
    started = time.perf_counter()
    for seq in seqs:
        decoder.join(seq)
    while decoder.active:
        decoder.step()
        for seq in [s for s in decoder.active if s.exhausted]:
            decoder.leave(seq)
    sync(decoder.device)
    return batch * tokens / (time.perf_counter() - started)


@torch.no_grad()
def hf_rate(model, batch: int, tokens: int) -> float:
    ids = torch.arange(batch, device=model.device)[:, None]
    sync(model.device)
    started = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                         do_sample=False, cache_implementation="static", pad_token_id=model.config.eos_token_id)
    sync(model.device)
    assert out.shape == (batch, tokens + 1), out.shape
    return batch * tokens / (time.perf_counter() - started)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def built(make):
    started = time.perf_counter()
    return make(), time.perf_counter() - started


def rows(run, folder: Path, batches: list[int], tokens: int, compile: bool) -> dict[tuple[str, int], tuple]:
    """Each (path, batch) -> (a run giving its tokens/s, the seconds its step took to build)."""
    dtype = decoding_only(run, compiled=False)
    choice = choose_step(run.model, run.device, compile)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(run.device).eval()
    hf_name = "transformers generate, static cache" + (", compiled" if run.device.type == "cuda" else " (eager on cpu)")
    paths = {}
    for batch in batches:
        (step, used), seconds = built(lambda b=batch: build_step(choice, run.model, dtype, b))
        console.print(f"batch {batch}: lmlab's step is {used.describe()}", highlight=False)
        steps = {"lmlab eager": (None, None), **({f"lmlab {used.kind}": (step, seconds)} if step else {})}
        if run.device.type == "cuda":  # the alternative to the captured graphs, timed beside them
            (overhead, used), seconds = built(lambda b=batch: build_step(
                StepChoice("torch.compile reduce-overhead", "measured"), run.model, dtype, b))
            steps[f"lmlab {used.kind}"] = (overhead, seconds)
        else:  # the graphs' code path, through its twin: a dry run of what a GPU times
            steps["lmlab graph step, its CPU twin"] = (GraphStep(run.model, dtype, lambda: recorded), None)
        for name, (each, seconds) in steps.items():
            decoder = Decoder(run.model, batch, dtype, each)
            paths[(name, batch)] = (lambda d=decoder, b=batch: lmlab_rate(d, b, tokens), seconds)
        paths[(hf_name, batch)] = (lambda b=batch: hf_rate(hf, b, tokens), None)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="on a CPU, lmlab's AOTInductor step (minutes to build)")
    parser.add_argument("--tiny", action="store_true", help="2-layer models: the dry run on a CPU")
    args = parser.parse_args()
    device = resolve_device(args.device)
    table = Table(title=f"Greedy decoding, {args.tokens} new tokens a sequence, on {device} "
                        f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch "
                        f"{torch.__version__}): tokens/s, all sequences together")
    for column in ("model", "path", "batch", "tokens/s", "build s"):
        table.add_column(column, justify="left" if column in ("model", "path") else "right")
    warnings = []
    for shape, source in shapes(args.tiny).items():
        with tempfile.TemporaryDirectory() as folder:
            torch.manual_seed(0)
            run_dir, hf_dir = exported(source, Path(folder))
            run = RunDir(run_dir).load("best", str(device))
            paths = rows(run, hf_dir, args.batches, args.tokens, args.compile)
            best = {key: 0.0 for key in paths}
            for repeat in range(args.repeats + 1):  # round 0 warms (captures, compiles): not kept
                console.print(f"{shape}: round {repeat} of {args.repeats}", highlight=False)
                with LoadMeter() as meter:
                    for key, (rate, _) in paths.items():
                        figure = rate()
                        best[key] = max(best[key], figure) if repeat else 0.0
                warnings.append(busy_warning(f"{shape}, round {repeat}", meter.load, "its tokens/s read low"))
            for (path, batch), rate in best.items():
                seconds = paths[(path, batch)][1]
                table.add_row(shape, path, str(batch), f"{rate:,.0f}", "-" if seconds is None else f"{seconds:.2f}")
    console.print(table)
    for warning in filter(None, warnings):
        console.print(warning, style="yellow", markup=False)


if __name__ == "__main__":
    main()
