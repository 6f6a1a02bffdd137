"""Plain helpers the tests share (no fixtures: those are in conftest.py): the CLI run as a user runs it or in this
process, tiny configs and corpora, processes to start, wait for and kill, servers on 127.0.0.1, and the docs' blocks
as a reader runs them."""

from __future__ import annotations

import base64
import copy
import ctypes
import gzip
import json
import os
import queue
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from safetensors.torch import load_file

from lmlab.commands import main
from lmlab.core import peak
from lmlab.core.config import SamplingParams
from lmlab.core.locks import WriterLock
from lmlab.core.machine import Machine
from lmlab.core.threads import ThreadChooser
from lmlab.data.loader import open_tokens
from lmlab.inference.decode import Decoder, Sequence
from lmlab.inference.int8_matmul import DENSE_ROWS
from lmlab.inference.quantize import LOGIT_TOLERANCE, quantize, readable
from lmlab.run.rundir import RunDir
from tests.cpu_kind.sitecustomize import KIND_VARIABLE, answering

LMLAB = str(Path(sys.executable).with_name("lmlab"))  # the installed command, run as a user runs it


def waits_for_lock(pid: int, path: Path) -> bool:
    """Whether process `pid` is blocked waiting for an `flock` on `path` (a `->` line of /proc/locks)."""
    inode = f":{path.stat().st_ino} "
    return any(line.split()[1:2] == ["->"] and f" {pid} " in line and inode in line
               for line in Path("/proc/locks").read_text().splitlines())


DRIVER = """
import json, sys
from lmlab.commands import main
results = []
for args in json.loads(sys.argv[1]):
    print("<<<", flush=True)
    sys.stderr.write("<<<\\n")
    results.append(main(args))
    sys.stdout.flush()
sys.stderr.write("<<<\\n" + json.dumps(results))
"""


def in_one_process(commands: list[list], cwd: Path, under: list = (), timeout: float = 300,
                   **run) -> list[tuple[int, str, str]]:
    """Each command through main() in turn in one fresh process (one start-up for them all), `under` the command
    line it is run by (unshare ...) with subprocess.run's `run` (preexec_fn, env): (status, stdout, stderr) of each.
    The whole is bounded by `timeout`: a command that would hang fails the test, never holds it."""
    done = subprocess.run([*map(str, under), sys.executable, "-c", DRIVER, json.dumps([[str(a) for a in c]
                                                                                      for c in commands])],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, **run)
    assert done.returncode == 0, done.stderr
    *said, results = done.stderr.split("<<<\n")[1:]
    return list(zip(json.loads(results), done.stdout.split("<<<\n")[1:], said))


def lmlab(*args, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    """Run `lmlab ARGS` in `cwd` and check that it succeeded (or, with ok=False, that it failed)."""
    done = subprocess.run([LMLAB, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == ok, done.stdout + done.stderr
    return done


SPEAKERS = ["ROMEO", "JULIET", "NURSE", "FRIAR", "TYBALT", "MERCUTIO"]


WORDS = ("love night day sweet death fair heaven soul heart light dark moon sun star blood sword "
         "thou thee thy art hath doth shall will not the a of and to my your me his her").split()


def phrase(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def hellaswag_items(rng: random.Random, count: int) -> list[dict]:
    """HellaSwag lines as distributed (activity_label, ctx_a, ctx_b, endings, label) in the corpus's words, one
    ending with WikiHow's bracketed markup."""
    return [{"activity_label": rng.choice(SPEAKERS).capitalize(), "ctx_a": phrase(rng, 2, 3).capitalize() + ".",
             "ctx_b": phrase(rng, 1, 2), "ctx": "unused", "label": str(rng.randrange(3)),
             "endings": [phrase(rng, 1, 3), f"[title] {phrase(rng, 1, 2)} [step] {phrase(rng, 1, 2)}",
                         phrase(rng, 2, 4) + "."]} for _ in range(count)]


LOAD_NOTE = re.compile(r"note: \w+ on \d+ of \d+ threads: other processes used ")


def besides_load_notes(err: str) -> str:
    """`err` without lmlab's notes that other processes' load lowered a command's threads: what a busy machine
    rightly adds to a command's stderr."""
    return "".join(line for line in err.splitlines(keepends=True) if not LOAD_NOTE.match(line))


def write_corpus(folder: Path, n_docs: int = 6, speeches: int = 60, seed: int = 0) -> Path:
    """Play-like documents: `SPEAKER:` lines and short verse lines from a small vocabulary."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        lines = []
        for _ in range(speeches):
            lines.append(rng.choice(SPEAKERS) + ":")
            for _ in range(rng.randint(1, 3)):
                lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 8))).capitalize() + ",")
            lines.append("")
        (folder / f"play{d}.txt").write_text("\n".join(lines), encoding="utf-8")
    return folder


TINY_CONFIG = """
[data]
dataset = "{dataset}"

[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32

[train]
batch_size = 8
max_iters = {max_iters}
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 5
eval_interval = 10
eval_iters = 4
log_interval = 5
checkpoint_interval = 10
dtype = "float32"
threads = 1
attention = "fused"
"""


def write_config(path: Path, dataset: Path, max_iters: int = 40) -> Path:
    """The tiny model's config. On one thread and the fused attention: results differ in their last bits between
    thread counts and attention paths, and the count and (with `auto`) the path chosen follow the load, so runs
    compared bitwise must be on the same ones (a tiny model is no faster on more threads); a test of a choice sets
    train.threads=0 or train.attention="auto"."""
    path.write_text(TINY_CONFIG.format(dataset=dataset, max_iters=max_iters), encoding="utf-8")
    return path


def roomier(seconds: float, refusal: str) -> float:
    """A budget for another try where this machine's start, slow or busy, left a test's budget too little: what the
    refusal said it needs, with room for the steps the test wants. A budget test's limit is derived from the
    machine's measured speed; its verdicts are on what the run did with it."""
    found = re.search(r"give a budget of at least (\d+) s", refusal)
    return max(2 * seconds, 3 * float(found[1])) if found else 2 * seconds


def write_fit(preset: Path, dataset: Path, largest: int) -> None:
    """A fit beside `preset` (lmlab.experiments.family) whose runs reach `largest` parameters, its val falling with
    size alone (B = 0): the largest depth it predicts (EXTRAPOLATION x `largest`) that trains a step is the best
    for --size auto, whatever the machine's speed."""
    from lmlab.analysis.scaling import LossSurface
    from lmlab.data.shards import read_meta
    from lmlab.experiments.family import LrRule, SizeFit, fit_path, preset_sha256

    meta = read_meta(dataset)
    fit = SizeFit(str(preset), preset_sha256(preset), {"path": str(dataset), "tokenizer": meta["tokenizer"],
                  "train_sha256": meta["train"]["sha256"]}, LossSurface(1.0, 40.0, 0.3, 0.0, 0.3, 0.0),
                  LrRule(1.5, 0.5),
                  [{"depth": 1, "params": largest // 4, "tokens": 10_000, "learning_rate": 3e-3, "val": 2.5,
                    "run": "a"},
                   {"depth": 2, "params": largest, "tokens": 20_000, "learning_rate": 3e-3, "val": 2.2, "run": "b"}])
    fit_path(preset).write_text(json.dumps(fit.to_json()))


def write_tiny_gpt2(folder: Path, corpus: Path | None, vocab_size: int = 400, n_positions: int = 512) -> Path:
    """A random GPT-2 (2 layers, 32 wide) saved by transformers, with a byte-level BPE trained on `corpus` and
    saved in OpenAI's vocab.json + merges.txt format (none when corpus is None)."""
    import tokenizers
    import torch
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    if corpus is not None:
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train([str(p) for p in sorted(corpus.glob("*.txt"))], trainer)
        backend.model.save(str(folder))
        vocab_size = backend.get_vocab_size()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def install_plugin(site: Path, kind: str, package: str, source: str, target: str = "Tiny") -> Path:
    """A model plugin as pip leaves it on a path Python searches: its module, and a dist-info folder whose
    entry_points.txt registers `kind` in the lmlab.models group."""
    module = package.replace("-", "_")
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{module}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[lmlab.models]\n{kind} = {module}:{target}\n")
    return info


def tiny_tiktoken(folder: Path) -> dict[bytes, int]:
    """A small encoding in tiktoken's file format: every byte, then a few merges."""
    ranks = {bytes([i]): i for i in range(256)}
    for token in (b"th", b"the", b" t", b" the", b"er", b" a", b"an", b"and", b" and", b"<|", b"|>", b"end"):
        ranks[token] = len(ranks)
    folder.mkdir(exist_ok=True)
    (folder / "tiny.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


ALPACA_TINY = Path(__file__).parent / "data" / "alpaca_tiny.json"


SYLLABLES = "ka ro mi te la vor an del sil qua bre no fen tor is gal mar ul ven dra os ith el bo".split()


KINDS = {  # a WikiText-2-like article kind: its noun and the facts its sentences state
    "river": ["The {name} River is a river in {place} .", "It flows for {n} kilometres into the {other} River .",
              "The {name} River was first mapped in {year} by {person} .", "Its basin covers {n} square kilometres ."],
    "town": ["{name} is a town in {place} , with a population of {n} .", "{name} was founded in {year} by {person} .",
             "The town lies on the {other} River .", "In {year} , {name} became the seat of {place} ."],
    "battle": ["The Battle of {name} was fought in {year} near the {other} River .",
               "{person} led an army of {n} men at {name} .", "The battle of {name} ended the war in {place} .",
               "About {n} soldiers died at {name} ."],
}


SECTIONS = ["History", "Geography", "Legacy", "Description"]


def write_wikitext(folder: Path, articles: int = 40, seed: int = 0) -> Path:
    """A WikiText-2 stand-in: Wikipedia-style articles (` = Title = ` headings, ` = = Section = = `, tokens spaced
    as WikiText's are), each about one invented river, town or battle whose name, place, person and years come back
    in its sentences: a long-range dependency a model of the context can learn. One .txt file per article."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def word() -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()

    for a in range(articles):
        kind = rng.choice(sorted(KINDS))
        facts = {"name": word(), "place": word(), "other": word(), "person": f"{word()} {word()}",
                 "n": rng.randint(2, 900) * 10, "year": rng.randint(1500, 1990)}
        lines = [f" = {facts['name']}{'' if kind == 'town' else ' ' + kind.capitalize()} = ", ""]
        for section in rng.sample(SECTIONS, 3):
            lines += [f" = = {section} = = ", ""]
            sentences = [rng.choice(KINDS[kind]).format(**facts) for _ in range(rng.randint(3, 6))]
            lines += [" " + " ".join(sentences) + " ", ""]
        (folder / f"article{a:04d}.txt").write_text("\n".join(lines), encoding="utf-8")
    return folder


# Fields of metrics.jsonl that depend on wall time, the machine's load or the run's location, not on what it learned.
CHOSEN = ("threads", "machine")  # the events of what a run's machine chose, by its rules or by the load
VOLATILE = {"elapsed", "seconds", "tokens_per_sec", "ms_per_step", "mfu", "peak_flops", "peak_source", "peak_quiet",
            "dtype_reason", "budget_spent", "path"}


def cut_at_first_checkpoint(run: Path, copy: Path) -> Path:
    """A copy of the ended `run` as if killed right after its first checkpoint: the later step folders and events
    gone."""
    shutil.copytree(run, copy)
    for folder in RunDir(copy).step_folders()[1:]:
        shutil.rmtree(folder)
    lines = (copy / "metrics.jsonl").read_text().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if '"checkpoint"' in line) + 1
    (copy / "metrics.jsonl").write_text("".join(lines[:cut]))
    return copy


def as_budgeted(run: Path, copy: Path, seconds: float, first: int) -> Path:
    """A copy of the ended `run` as if a budget of `seconds` had trained it, its config.toml's max_iters the 5,000 a
    budget ignores: its `budget` events, the plan before its first step (`first` steps) and the last step decided."""
    shutil.copytree(run, copy)
    config = re.sub(r"(?m)^max_iters = \d+$", "max_iters = 5000", (copy / "config.toml").read_text())
    (copy / "config.toml").write_text(re.sub(r"(?m)^budget_seconds = .*$", f"budget_seconds = {seconds}", config))
    start, *events, end = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    planned, last = ({"event": "budget", "seconds": seconds, "max_iters": steps, "step": step, "reason": reason}
                     for steps, step, reason in ((first, 0, "planned"), (end["step"], end["step"] - 1, "last")))
    lines = [start, planned, *events, last, {**end, "budget_seconds": seconds}]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    return copy


def stable_events(run: Path) -> list[dict]:
    """metrics.jsonl without the VOLATILE fields and without the resume, threads, compile and attention events: the
    history of how the run was trained (how often it resumed; the threads the load at each start made lmlab choose;
    whether a compiled step or an attention path measured faster), not what it learned."""
    return [{k: v for k, v in e.items() if k not in VOLATILE} for e in RunDir(run).events()
            if e["event"] not in ("resume", *CHOSEN)]


# --- the docs' blocks, as a reader runs them (tests/test_docs.py runs the guides, tests/test_demo.py the README's tour)

ROOT = Path(__file__).resolve().parent.parent


FENCE = re.compile(r"^(`{3,})\s*([\w-]*)\s*$")


DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(skip|background|replace|append|on)\b:?\s*(.*?)\s*-->\s*$")


PAIR = re.compile(r"""(["'])(.*?)\1\s+(["'])(.*?)\3""")  # "OLD" "NEW", or in single quotes where one holds a "


RUN = {"bash", "python"}  # the fences a guide's reader runs; ```text is what they see, ```toml a file shown


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip: str = ""
    background: str = ""
    hosts: str = ""  # the test hosts (tests/hosts.py: node0, node1) a recipe's block runs on, at once
    replaces: list[tuple[str, str]] = field(default_factory=list)
    appends: list[tuple[str, str]] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def to_run(self, port: int | str) -> str:
        """The block as the test runs it: each `replace` made (`{port}` in it as `port`), each `append` added to the
        commands it names."""
        text = self.text
        for old, new in self.replaces:
            text = text.replace(old, new.replace("{port}", str(port)))
        commands = text.replace("\\\n", " ").splitlines()
        for prefix, args in self.appends:
            commands = [append_to(command, prefix, args) for command in commands]
        return "\n".join(commands)


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, each with the directives in force where it stands."""
    found, pending, replaces, appends = [], {}, [], []
    lines = page.read_text(encoding="utf-8").splitlines()
    number = 0
    while number < len(lines):
        line = lines[number]
        number += 1
        if directive := DIRECTIVE.match(line.strip()):
            kind, rest = directive.groups()
            if kind in ("skip", "background", "on"):
                pending[kind] = rest or kind
            else:
                pair = PAIR.match(rest)  # what follows the two texts is the reason, for the reader
                assert pair, f"{page.name}:{number}: docs-test {kind} takes two quoted texts, got {rest!r}"
                (replaces if kind == "replace" else appends).append((pair[2], pair[4]))
            continue
        if not (fence := FENCE.match(line)):
            if line.strip():
                pending = {}  # a directive about a block stands on the line just before it
            continue
        start, body = number, []
        while number < len(lines) and lines[number].strip() != fence.group(1):
            body.append(lines[number])
            number += 1
        number += 1
        found.append(Block(page, start, fence.group(2), "\n".join(body) + "\n", pending.get("skip", ""),
                           pending.get("background", ""), pending.get("on", ""), list(replaces), list(appends)))
        pending = {}
    return found


def append_to(command: str, prefix: str, args: str) -> str:
    """`command` with `args` added at the end of its `prefix` part, before any pipe, redirection, `&&` or comment."""
    at = command.find(prefix)
    if at < 0 or command[:at].strip():
        return command
    end = re.search(r"\s(\||&&|;|>|>>|2>|&|#)(\s|$)", command[at:])
    cut = at + end.start() if end else len(command)
    return f"{command[:cut].rstrip()} {args}{command[cut:]}"


SERVING_AT = re.compile(r"\bat\s+http://\S+?:(\d+)/v1")  # the address `lmlab serve` says in its first line


def serve_process(argv: list, env: dict | None = None, timeout: float = 120) -> tuple[subprocess.Popen, int, list[str]]:
    """`argv` (an `lmlab serve` command line) started with `--port 0`: the process, the port the system gave it (as
    its first line says), and its stderr lines, collected as they come. No port is chosen in advance, where another
    process could take it meanwhile. A server that exits before saying its address fails at once, with what it
    said."""
    proc = subprocess.Popen([*map(str, argv), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    log: list[str] = []
    errors = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
    errors.start()
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put(None)], daemon=True).start()
    said, deadline = "", time.monotonic() + timeout
    while not (found := SERVING_AT.search(said)):
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            raise AssertionError(f"lmlab serve said no address within {timeout} s: {said}{''.join(log)}") from None
        if line is None:
            proc.wait(timeout=30)
            errors.join(timeout=5)
            raise AssertionError(f"lmlab serve exited {proc.returncode} before saying its address: {said}"
                                 f"{''.join(log)}")
        said += line
    return proc, int(found[1]), log


@contextmanager
def refusing_port() -> Iterator[int]:
    """A port bound and not listening while the block runs: a connection to it is refused, and no other process can
    take it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


WAIT_FOR = """import re, sys, time, urllib.request
log, pid, url = sys.argv[1:]


def ended() -> bool:  # the background command's process is gone (or a zombie)
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


port, deadline = "", time.monotonic() + 120
while time.monotonic() < deadline:
    said = open(log, encoding="utf-8", errors="replace").read()
    if not port and (found := re.search(r"\\bat\\s+http://\\S+?:(\\d+)/v1", said)):
        port = found[1]
    if port or "{port}" not in url:
        try:
            urllib.request.urlopen(url.replace("{port}", port), timeout=2)
            print(port)
            sys.exit(0)
        except Exception:
            pass
    if ended():
        sys.exit(f"docs-test: the background command ended before {url} answered:\\n{said}")
    time.sleep(0.25)
sys.exit(f"docs-test: {url} did not answer in 120 s:\\n{open(log).read()}")
"""


def script(guide: Path, folder: Path) -> str:
    """One bash script running the guide's blocks in order, as a reader's terminal would. A background block's
    `{port}` is 0: the server takes a free port from the system and says which, and the blocks after it are given
    that port as they run (`PORT`), so no port is chosen in advance, where another process could take it."""
    lines = ["set -euo pipefail", "BACKGROUND=()", "PORT=0",
             'trap \'for p in "${BACKGROUND[@]}"; do kill -TERM "$p" 2>/dev/null; wait "$p" 2>/dev/null; done\' EXIT']
    (folder / ".wait_for.py").write_text(WAIT_FOR, encoding="utf-8")
    for n, block in enumerate(blocks(guide)):
        if block.lang not in RUN or block.skip:
            continue
        lines.append(f"echo '>>> docs-test: {block.where}' >&2")
        if block.background:
            url = shlex.quote(block.background)
            lines += [f"( {block.to_run(0).strip()}\n) > .background{n}.log 2>&1 &", 'BACKGROUND+=("$!")',
                      f'PORT=$(python .wait_for.py .background{n}.log "${{BACKGROUND[-1]}}" {url}) || exit 1']
            continue
        text, name = block.to_run("{port}"), f".block{n}.{'py' if block.lang == 'python' else 'sh'}"
        if "{port}" in text:  # the port the server said, put in as the block runs
            (folder / name).write_text(text, encoding="utf-8")
            text = f'sed "s/{{port}}/$PORT/g" {name}' + (f" > {name}.run\npython {name}.run"
                                                      if block.lang == "python" else "")
            lines.append(text if block.lang == "python" else f'eval "$({text})"')
        elif block.lang == "python":
            (folder / name).write_text(text, encoding="utf-8")
            lines.append(f"python {name}")
        else:
            lines.append(text)
    return "\n".join(lines) + "\n"


def closure(requirements: list[str]) -> set[str]:
    """The distributions `requirements` install, with their own dependencies, transitively (extras left out)."""
    names: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in names or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        names.add(name)
        try:
            todo += [Requirement(r) for r in distribution(req.name).requires or []]
        except PackageNotFoundError:  # an optional dependency of a dependency, on a platform that has none
            names.discard(name)
    return names


class Server:
    """`lmlab serve RUN OPTIONS` on the port the system gives it, its stderr (one line per request) collected."""

    def __init__(self, run: Path, *options: str):
        self.proc, self.port, self.log = serve_process([LMLAB, "serve", run, "--device", "cpu", "--no-compile",
                                                        *options])
        self.root, self.url = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.root}/health", timeout=2)
                break
            except OSError:  # refused, reset, or timed out while the server imports torch
                assert self.proc.poll() is None, "".join(self.log)
                assert time.monotonic() < deadline, "the server did not start within 120 s"
                time.sleep(0.3)

    def health(self) -> dict:
        return json.loads(urllib.request.urlopen(f"{self.root}/health", timeout=10).read())

    def logged(self, predicate, count: int = 1, timeout: float = 60) -> list[str]:
        """The log lines `predicate` accepts, once there are `count` of them (a line is written as its request
        ends, and read here by a thread of its own)."""
        deadline = time.monotonic() + timeout
        while len(found := [line for line in self.log if predicate(line)]) < count:
            assert time.monotonic() < deadline, f"not logged within {timeout} s: {self.log[-5:]}"
            time.sleep(0.05)
        return found

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def post(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def sent(server: Server, address: str, path: str, body: bytes) -> socket.socket:
    """A POST from `address` (another of the loopback network's, 127.0.0.2, ..., standing for another machine), sent
    whole, its answer left unread."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30, source_address=(address, 0))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), len(body), body))
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the answer on `sock` (the server closes nothing: read to its length)."""
    with sock:
        got = b""
        while b"\r\n\r\n" not in got:
            got += sock.recv(65536)
        head, _, rest = got.partition(b"\r\n\r\n")
        fields = dict(line.lower().split(b":", 1) for line in head.split(b"\r\n")[1:])
        length = int(fields[b"content-length"])
        while len(rest) < length:
            rest += sock.recv(65536)
    return int(head.split()[1]), json.loads(rest)


def weights(run: Path, which: str = "latest") -> dict[str, torch.Tensor]:
    return load_file(str(RunDir(run).checkpoint(which) / "model.safetensors"))


def same_weights(run: Path, *others: Path) -> None:
    """Each of `others` ends with bitwise `run`'s latest weights. Where one does not, the failure names the tensors
    that differ and what each run chose by timing or by the load (its threads, attention path and compile verdict:
    a choice left to the load is the usual cause), not the bytes."""
    mine = weights(run)
    for other in others:
        theirs = weights(other)
        differ = sorted(n for n in mine.keys() | theirs.keys()
                        if n not in mine or n not in theirs or not torch.equal(mine[n], theirs[n]))
        assert not differ, (f"{other} differs from {run} in {len(differ)} of {len(mine)} tensors ({differ[0]}, ...); "
                            f"what each chose: {_chosen(other)} against {_chosen(run)}")


def _chosen(run: Path) -> list[dict]:
    events = RunDir(run).events()
    return [{"torch_threads": events[0]["machine"].get("torch_threads")}, *(e for e in events if e["event"] in CHOSEN)]


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def kill_and_resume(command: list, run: Path, kill_after_lines: tuple[int, ...]) -> None:
    """Run `command` (an `lmlab train` of `run`), kill -9 it once the run's metrics have each number of lines in
    turn (resuming it in between), then resume it to the end."""
    for lines in kill_after_lines:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda lines=lines, proc=proc: len(RunDir(run).events()) >= lines or proc.poll() is not None)
        proc.kill()
        proc.wait()
        command = [LMLAB, "train", "--resume", run]
    subprocess.run(command, check=True, capture_output=True, timeout=300)


TOLERANCE = 1e-5  # fp32; the ranks only change the order of a few sums


def losses(run: Path) -> dict[int, float]:
    train = [e for e in RunDir(run).events() if e["event"] == "train"]
    assert len({e["step"] for e in train}) == len(train), "a step logged twice (by two ranks?)"
    return {e["step"]: e["loss"] for e in train}


def val_losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["val_loss"] for e in RunDir(run).events() if e["event"] == "eval"}


def assert_same(got: dict[int, float], want: dict[int, float], steps: range) -> None:
    assert sorted(got) == list(steps)
    assert max(abs(got[s] - want[s]) for s in steps) < TOLERANCE


# No module of lmlab's that FSDP wraps (a kind's root, a GPT's blocks, its matmul layers under bf16) returns a view
# (pyproject.toml's filterwarnings): FSDP's warning of one is an error in every torchrun job's ranks too. A plugin's
# modules are its own: FSDP warns its author.
FSDP_VIEW_IS_AN_ERROR = ",".join(f"error:FSDP2-wrapped module (FSDP{name}:UserWarning"
                                 for name in ("GPT)", "RecurrentLM)", "Block)", "Linear"))


def torchrun(args: list[str], *extra: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *extra,
               "-m", "--", "lmlab", "train", *args, "--device", "cpu"]
    env = dict(os.environ if env is None else env)
    env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"), FSDP_VIEW_IS_AN_ERROR]))
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kw)


def output(job: subprocess.Popen, timeout: float = 120) -> str:
    """The job's output once it ends; a job still running after `timeout` is stopped, workers included."""
    try:
        return job.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        job.terminate()  # torchrun passes it on to the workers (each in its own session) and waits for them
        job.communicate(timeout=60)
        raise


def finish(job: subprocess.Popen) -> str:
    out = output(job)
    assert job.returncode == 0, out
    return out


# The CPU kind every test answers as, in its own process and in the commands it starts (conftest.py), whatever the
# host: no verdict then depends on the kind CI's machine is that day. The kind whose paths CI had run longest; a test
# marked `host_cpu` sees the host as it is.
SUITE_CPU = "avx2"
HOST_CPU = getattr(peak, "host_cpu_native", peak.cpu_native)  # the host's own answers, in a faked process too
CPU_KIND_HOOK = ROOT / "tests" / "cpu_kind"  # on a command's PYTHONPATH, it answers as KIND_VARIABLE's kind


def fake_cpu(monkeypatch, kind: str | None) -> None:
    """This process, and the commands it starts (tests/cpu_kind/sitecustomize.py), answer lmlab's CPU capability
    check (`lmlab.core.peak.cpu_native`) as a CPU of `kind` (`CPU_KINDS`) would, whatever the host is: every path of
    every kind runs on every host. None: as the host does."""
    if kind is None:
        monkeypatch.setattr(peak, "cpu_native", HOST_CPU)
        monkeypatch.delenv(KIND_VARIABLE, raising=False)
        return
    monkeypatch.setattr(peak, "cpu_native", answering(kind))
    monkeypatch.setenv(KIND_VARIABLE, kind)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(CPU_KIND_HOOK) not in paths:
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(CPU_KIND_HOOK), *paths])))


# Skip reasons that name a CPU capability. CI runs on whichever CPU kind the machine has that day, so a test that
# skips for one of these runs nowhere on the others: it must name its faked twin, which runs its path on every host.
HOST_CAPABILITY = re.compile(r"\b(bf16|bfloat16|fp16|float16|avx[\w-]*|amx[\w-]*|native kernel|cores?)\b",
                             re.IGNORECASE)


class HostTwins:
    """A pytest plugin (conftest.py registers it): a test that skips for a host capability (`HOST_CAPABILITY`) fails
    instead unless it is marked `@pytest.mark.twin("test_name")` naming a test of its module (or
    "tests/test_file.py::test_name") that fakes the capability (`fake_cpu`, a faked core list), so the path the host
    lacks still runs on it."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = (yield).get_result()
        if not report.skipped or not (found := HOST_CAPABILITY.search(str(report.longrepr))):
            return
        twin = item.get_closest_marker("twin")
        if twin is None or not _test_exists(item, twin.args[0]):
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid} skipped on this host's CPU ({found[0]}: {report.longrepr[2]}) with no "
                               "faked twin: mark it @pytest.mark.twin(\"test_...\") naming a test of its module that "
                               "runs the path this host lacks with tests.helpers.fake_cpu")


def _test_exists(item, twin: str) -> bool:
    """Whether `twin` names a test: of `item`'s module, or "tests/test_file.py::test_name" of the checkout."""
    path, _, name = twin.rpartition("::")
    if not path:
        return callable(getattr(item.module, name, None))
    source = ROOT / path
    return source.is_file() and f"def {name}(" in source.read_text(encoding="utf-8")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`lmlab ARGV` in this process (no interpreter start-up): status, stdout, stderr."""
    capsys.readouterr()  # what came before is not this command's
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@contextmanager
def hog(processes: int = 2):
    """Other processes that keep every core busy (one spinning interpreter per core), started through a shell that
    exits at once: so they are no one's descendants here (a LoadMeter counts its own process tree as its own)."""
    spin = f'"{sys.executable}" -c "while True: pass" >/dev/null 2>&1'  # the pipe must not wait for them
    started = subprocess.run(["sh", "-c", f"for i in $(seq {processes}); do {spin} & echo $!; done"],
                             capture_output=True, text=True, check=True)
    pids = [int(pid) for pid in started.stdout.split()]
    try:
        while not all(cpu_ticks(pid) for pid in pids):  # each has begun to spin, however long it took to start
            time.sleep(0.01)
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)


def cpu_ticks(pid: int) -> int:
    """The clock ticks process `pid` has run on a CPU (utime + stime in /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def refused(capsys, *args, needles: tuple[str, ...] = ()) -> str:
    """Run the CLI in this process and check the refusal: status 2, one `error:` line naming `needles`."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def refused_process(done: subprocess.CompletedProcess, *needles: str) -> str:
    """The same check for a real process."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stdout + done.stderr
    assert lines and lines[-1].startswith("error: "), done.stderr
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def spawn(*args, cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([LMLAB, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def writer_pid(folder: Path) -> int | None:
    """The process that holds a run's or a dataset's lock, as its lock file names it (`pid N: COMMAND`); None
    where none does."""
    holder = WriterLock(folder).holder() or ""
    return int(holder.split()[1].rstrip(":")) if holder.startswith("pid ") else None


def wait_until(predicate, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended first:\n{proc.communicate()}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


DROP_DAC = [1, 2, 3]  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER: what lets root write anywhere


def drop_root_bypass() -> None:
    """preexec_fn: permission bits apply to the process started, even as root (which keeps its uid, so it can run
    this checkout's Python wherever it lives), by dropping the capabilities that bypass them."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in DROP_DAC:
            if libc.prctl(24, cap, 0, 0, 0):  # PR_CAPBSET_DROP: gone for the program exec'd next
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def documents(n: int, seed: int = 0, words: tuple[int, int] = (5, 120)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) + "." for _ in range(n)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    lines = "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts))
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def split_tokens(dataset: Path, split: str) -> np.ndarray:
    meta = json.loads((dataset / "meta.json").read_text())
    return np.asarray(open_tokens(dataset, split, meta["dtype"])[:])


def digests(*folders: Path) -> dict[Path, bytes]:
    """Every file under the folders, by path: what must come out of a refusal unchanged."""
    return {p: p.read_bytes() for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def copy_run(run: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(run, tmp_path / name))


def events_of(run: Path, kind: str) -> list[dict]:
    return [e for e in RunDir(run).events() if e.get("event") == kind]


def chosen(run: Path, row: str) -> tuple[str, str]:
    """What the run's machine chose for `row` at its start (its `machine` event) and why."""
    [event] = events_of(run, "machine")
    return event["choices"][row]["chosen"], event["choices"][row]["why"]


def a_machine(device: str = "cpu", dtype: torch.dtype = torch.float32) -> Machine:
    """A job's machine on `device` in `dtype`, measuring nothing, on torch's threads now (which it leaves as they
    are): what a test of a rule asks."""
    return Machine(torch.device(device), dtype, ThreadChooser(torch.get_num_threads(), "train.threads"))


def trusted(value: object) -> None:
    """A machine cache reader's check (lmlab.core.cache.recall) that finds nothing wrong: a test reading back what it
    kept itself."""


def forget_choices() -> None:
    """The step timings and calibrations the machine cache keeps (lmlab.core.cache) forgotten, as on a machine that
    never ran the shapes nor saw the data: what comes next measures them again. Its peaks and memory estimates are
    kept."""
    from lmlab.core.cache import cache_path

    path = cache_path()
    if path.exists():
        kept = json.loads(path.read_text())
        kept["entries"] = {k: v for k, v in kept["entries"].items() if v.get("kind") not in ("timing", "calibration")}
        path.write_text(json.dumps(kept))


def meta_reads(monkeypatch) -> list[Path]:  # noqa: ANN001 (pytest's fixture)
    """The datasets whose meta.json is read from now on: read_meta counted wherever lmlab imported it."""
    from lmlab.data.shards import read_meta

    calls: list[Path] = []

    def counted(dataset: Path) -> dict:
        calls.append(dataset)
        return read_meta(dataset)

    for module in [m for name, m in sys.modules.items() if name.startswith("lmlab.")]:
        if getattr(module, "read_meta", None) is read_meta:
            monkeypatch.setattr(module, "read_meta", counted)
    return calls


# The token cycle the int8 tests' models learn, and what must hold of int8 decoding on every CPU kind: shared by
# tests/test_quantize.py and its twins' processes, which import it from here.
CYCLE = torch.randint(0, 50, (23,), generator=torch.Generator().manual_seed(1)).tolist()


def greedy(model: torch.nn.Module, prompts: list[list[int]], step=None) -> tuple[list[list[int]], torch.Tensor]:
    """Each prompt's 40 greedy tokens, decoded together (by `step`, else eagerly), and the logits (steps, rows, vocab)
    of every step."""
    decoder = Decoder(model, len(prompts), step=step)
    seqs = [Sequence(list(p), SamplingParams(max_new_tokens=40, temperature=0)) for p in prompts]
    logits, inner = [], decoder.step_fn
    decoder.step_fn = lambda idx, state: logits.append(inner(idx, state)) or logits[-1]
    for seq in seqs:
        decoder.join(seq)
    while not seqs[0].exhausted:
        decoder.step()
    return [seq.ids for seq in seqs], torch.stack(logits)


def int8_holds(model: torch.nn.Module) -> list[int]:
    """What holds on every CPU kind: from int8 weights, float32's greedy tokens and each step's logits within the
    stated tolerance; every matmul whose inputs the kernel reads (`readable`: a multiple of the CPU's vector width)
    from int8, the others from float32, for that reason alone. Returns the input widths of those left float32."""
    dense = [CYCLE[i % len(CYCLE)] for i in range(DENSE_ROWS + 1)]  # a prompt whose matmuls are dense
    prompts = [CYCLE[:5], CYCLE[7:9], dense]
    want, exact = greedy(model, prompts)
    quantized = quantize(copy.deepcopy(model), "int8")
    got, approx = greedy(quantized, prompts)
    assert got == want
    assert ((approx - exact).abs() / exact.std(-1, keepdim=True)).max() <= LOGIT_TOLERANCE
    left = sorted({m.in_features for m in quantized.modules() if type(m) is torch.nn.Linear})
    assert not [width for width in left if readable(width)], f"{left}: matmuls the kernel reads left float32"
    assert any(type(m).__name__ == "Int8Linear" for m in quantized.modules())
    return left
