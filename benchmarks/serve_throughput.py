"""`lmlab serve` under concurrent clients: continuous batching against one request at a time.

    python benchmarks/serve_throughput.py [--shapes demo,gpt2] [--concurrency 1,4,16,64] [--no-compile]
                                          [--device cpu]

For each model shape (random weights: speed does not depend on them) a run folder is written, and two real
servers are started on 127.0.0.1: one batching (--max-batch 64) and one decoding a request at a time
(--max-batch 1); both queue up to 256 requests, so nothing is refused. At each concurrency C, C client threads
send streamed completions (a fixed `max_tokens`, sampled, include_usage) until max(C, 8) requests have been
sent, against each server in turn (alternating, so a slow moment of the machine hits both). Reported: requests/s
and output tokens/s over the wall time, p50/p95 time to first token, and p50/p95 per-token latency (the time
from a request's first token to its last, over the tokens after the first).

"step alone" is what the server's decode step gives without the server: the same run loaded in this process,
its step chosen as that server chooses it (lmlab.inference.steps: CUDA graphs on a GPU; on a CPU compiled for the
same capacity and threads as that server's, or eager, as it decodes), as many rows as
the server decodes at once (C, at most its --max-batch) stepped in a loop with the same sampling settings, each
row from its prompt to `max_tokens`: output tokens/s and ms per step. "of step" is the server's out tok/s over
the step's: what the server's per-token handling (detokenizing, stop checks, the hand-off to the event loop,
SSE framing, HTTP) leaves of the step's speed. The step-alone row of one client is decode_speed.py's batch-1
figure, sampled instead of greedy.

Shapes: "demo" is configs/shakespeare-char-modern-cpu.toml's model (4 layers, 256 wide, context 128, a
65-character vocabulary), 128 tokens per request; "gpt2" is GPT-2 small's (12 layers, 768 wide, context 1024,
50,257 tokens), 32 tokens per request.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table

from lmlab.commands.common import console
from lmlab.core.busy import LoadMeter, busy_warning
from lmlab.core.config import DataConfig, ModelConfig, RunConfig, SamplingParams, TrainConfig
from lmlab.core.progress import ItemProgress
from lmlab.data.tokenizers import Tokenizer, train_tokenizer
from lmlab.inference.decode import Decoder, Sequence
from lmlab.inference.generate import decoding_only
from lmlab.inference.steps import build_step, choose_step
from lmlab.model import build_model
from lmlab.run.checkpoint import model_tensors
from lmlab.run.rundir import RunDir

LMLAB = str(Path(sys.executable).with_name("lmlab"))
WORDS = [f"w{i}" for i in range(50_255)]  # a word tokenizer of GPT-2's vocabulary size: 50,255 words + <unk>, EOT
SHAPES = {
    "demo": (ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=128, vocab_size=65, bias=False, pos_emb="rope",
                         norm="rmsnorm", mlp="swiglu", qk_norm=True), "char", 128),
    "gpt2": (ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50_257), "word:50255", 32),
}
CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # Shakespeare's 65


def write_run(folder: Path, config: ModelConfig, spec: str, tokenizer: Tokenizer | None = None) -> Path:
    """A run folder holding a randomly initialised model of `config` and `tokenizer` (by default one of `spec`
    made to the vocabulary's size: Shakespeare's characters, or WORDS)."""
    if tokenizer is None:
        texts = [CHARS] if spec == "char" else [" ".join(WORDS)]
        tokenizer = train_tokenizer(spec, texts, texts)
    assert tokenizer.vocab_size == config.vocab_size, (tokenizer.vocab_size, config.vocab_size)
    torch.manual_seed(0)
    model = build_model(config)
    cfg = RunConfig(DataConfig(dataset=""), config, TrainConfig())
    facts = {"tokenizer": spec, "vocab_size": config.vocab_size, "eot_id": tokenizer.eot_id}
    with RunDir(folder).locked() as run:
        run.begin("imported", model, cfg, facts, origin={"source": "random weights", "format": "benchmark"})
        run.write_setup(cfg, tokenizer, facts)
        run.save_checkpoint(0, model_tensors(model), torch.optim.AdamW(model.parameters()).state_dict(), None,
                            best=True, keep=1)
    return folder


class Server:
    def __init__(self, run: Path, max_batch: int, compile: bool, device: str):
        self.max_batch = max_batch
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        options = ["--max-batch", str(max_batch), "--max-queue", "256", "--max-tokens-cap", "1024",
                   "--compile" if compile else "--no-compile"]
        # Compiled steps are kept beside the run, not in the user's cache.
        env = {**os.environ, "XDG_CACHE_HOME": str(run.parent / "cache")}
        self.proc = subprocess.Popen([LMLAB, "serve", str(run), "--port", str(self.port), "--device", device,
                                      *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        self.threads = torch.get_num_threads()  # what a server that does not say decodes on

    def wait(self) -> None:
        """Until the server answers /health 200 with its decode step in place (an lmlab that compiles behind
        eager decoding says `eager, compiling` until then)."""
        while True:
            assert self.proc.poll() is None, "the server exited; run it by hand to see why"
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/health")
                answer = connection.getresponse()
                health = json.loads(answer.read()) if answer.status == 200 else {}
                if health and health.get("decode_step") != "eager, compiling":
                    self.threads = health.get("threads", self.threads)
                    return
            except OSError:
                pass
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


@dataclass
class Timing:
    first: float  # seconds from sending to the first token
    total: float  # seconds from sending to the last
    tokens: int


def complete(port: int, prompt: str, max_tokens: int, seed: int) -> Timing:
    """One streamed completion, timed from the request to its first and last text chunk."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": TEMPERATURE, "seed": seed,
                       "stream": True, "stream_options": {"include_usage": True}})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    first = last = None
    tokens = 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0]["text"]:
            last = time.perf_counter()
            first = first or last
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    connection.close()
    return Timing(first - started, last - started, tokens)


def load(port: int, clients: int, requests: int, prompts: list[str], max_tokens: int) -> tuple[float, list[Timing]]:
    """`clients` threads sending completions until `requests` have been sent; the wall time and each timing."""
    timings: list[Timing] = []
    next_one = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(next_one, None)
            if i is None:
                return
            timing = complete(port, prompts[i % len(prompts)], max_tokens, i)
            with lock:
                timings.append(timing)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, timings


TEMPERATURE = 0.8  # what every request samples at, and the step alone too


class StepAlone:
    """The served run's decode step in this process, at a server's capacity, compiled as that server's is."""

    def __init__(self, run: Path, capacity: int, compile: bool, threads: int, device: str):
        self.run = RunDir(run).load("best", device)
        self.capacity, self.threads = capacity, threads
        choice = choose_step(self.run.model, self.run.device, compile)
        self.dtype = decoding_only(self.run, compiled=choice.kind == "compiled")
        with self.threaded():
            self.step, _ = build_step(choice, self.run.model, self.dtype, capacity)

    @contextmanager
    def threaded(self) -> Iterator[None]:
        """On the server's threads (baked into a compiled step's kernels, set for an eager one)."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def measure(self, rows: int, prompts: list[str], max_tokens: int, repeats: int = 2) -> tuple[float, float]:
        """Output tokens/s and ms per step of `rows` sequences decoded together from their prompts to max_tokens;
        the best of `repeats`."""
        best = (0.0, float("inf"))
        for _ in range(repeats):
            with self.threaded():
                best = max(best, self._decode(rows, prompts, max_tokens))
        return best

    def _decode(self, rows: int, prompts: list[str], max_tokens: int) -> tuple[float, float]:
        decoder = Decoder(self.run.model, self.capacity, self.dtype, self.step)
        started = time.perf_counter()
        for i in range(rows):
            ids = self.run.tokenizer.encode(prompts[i % len(prompts)])
            decoder.join(Sequence(ids, SamplingParams(max_tokens, TEMPERATURE, seed=i)))
        steps = 0
        while decoder.active:
            decoder.step()
            steps += 1
            for seq in [s for s in decoder.active if s.exhausted]:
                decoder.leave(seq)
        seconds = time.perf_counter() - started
        return rows * max_tokens / seconds, seconds / steps * 1000


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="demo,gpt2")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compile the servers' decode step, as lmlab serve does by default")
    parser.add_argument("--device", default="cpu", help="where the servers decode (cuda: through CUDA graphs)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers on the way out
    levels = [int(c) for c in args.concurrency.split(",")]
    table = Table(title=f"lmlab serve on {args.device} ({torch.get_num_threads()} threads), "
                        f"{'compiled' if args.compile else 'eager'} decode step on a CPU, sampled, streamed")
    for column in ("model", "C", "server", "requests", "req/s", "out tok/s", "step alone", "of step", "TTFT p50",
                   "TTFT p95", "ms/token p50", "ms/token p95", "step ms"):
        table.add_column(column, justify="left" if column in ("model", "server") else "right")
    with tempfile.TemporaryDirectory() as folder:
        for shape in args.shapes.split(","):
            config, spec, max_tokens = SHAPES[shape]
            run = write_run(Path(folder) / shape, config, spec)
            servers: dict[str, Server] = {}
            try:
                # One compile at a time: Inductor's autotuning times kernels, and a neighbour's compile would
                # skew its choices.
                for name, max_batch in (("batched (max-batch 64)", 64), ("one at a time", 1)):
                    with console.status(f"{shape}: starting {name}{' (compiling)' if args.compile else ''}..."):
                        servers[name] = Server(run, max_batch, args.compile, args.device)
                        servers[name].wait()
                with console.status(f"{shape}: the step alone{' (compiling)' if args.compile else ''}..."):
                    alone = {name: StepAlone(run, server.max_batch, args.compile, server.threads, args.device)
                             for name, server in servers.items()}
                measure(shape, servers, alone, spec, max_tokens, levels, table)
            finally:
                for server in servers.values():
                    server.stop()
    console.print(table)


def measure(shape: str, servers: dict[str, Server], alone: dict[str, StepAlone], spec: str, max_tokens: int,
            levels: list[int], table: Table) -> None:
    prompts = (["ROMEO:", "JULIET:", "NURSE:", "FRIAR:"] if spec == "char"
               else [" ".join(WORDS[6 * i:6 * i + 6]) for i in range(64)])
    for server in servers.values():  # warm up: the first request pays for lazy set-up
        complete(server.port, prompts[0], 4, 0)
    progress = ItemProgress(console, len(levels) * len(servers))
    for clients in levels:
        requests = max(clients, 8)
        for name, server in servers.items():
            progress.start(f"{shape}: {name}, {clients} clients, {requests} requests")
            with LoadMeter() as meter:
                wall, timings = load(server.port, clients, requests, prompts, max_tokens)
            warning = busy_warning(f"{shape}, {name}, {clients} clients", meter.load, "its rates read low")
            if warning:
                console.print(warning, style="yellow", markup=False)
            step_rate, step_ms = alone[name].measure(min(clients, server.max_batch), prompts, max_tokens)
            tokens = sum(t.tokens for t in timings)
            per_token = [(t.total - t.first) / max(1, t.tokens - 1) * 1000 for t in timings]
            firsts = [t.first for t in timings]
            table.add_row(shape, str(clients), name, str(requests), f"{requests / wall:.2f}",
                          f"{tokens / wall:,.0f}", f"{step_rate:,.0f}", f"{tokens / wall / step_rate:.0%}",
                          f"{percentile(firsts, 50):.2f}s", f"{percentile(firsts, 95):.2f}s",
                          f"{percentile(per_token, 50):.1f}", f"{percentile(per_token, 95):.1f}", f"{step_ms:.1f}")


if __name__ == "__main__":
    main()
