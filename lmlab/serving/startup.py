"""The server's start, done in the background while its port already answers: load the run, then decode with the step
asked for. A compiled step kept on disk from an earlier start loads at once; otherwise the server decodes eagerly at
once and builds the compiled step in a process of its own, switching to it when ready. Each phase is one log line with
its duration, and /health names the phase under way."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import torch

from lmlab.core import cache
from lmlab.core.busy import cores
from lmlab.core.errors import UserError
from lmlab.core.threads import Choice, Heard, ThreadChooser
from lmlab.core.workers import python_command
from lmlab.inference.compiled import (
    StepRefused,
    forget_old_steps,
    kept_step,
    load_kept,
    step_key,
    weights_sha256,
)
from lmlab.inference.decode import Step
from lmlab.inference.generate import Batch, decode_dtype, decoding_only, document_start, max_prompt_chars
from lmlab.inference.quantize import state_dtype
from lmlab.inference.steps import CAPTURES, StepChoice, build_step, choose_step
from lmlab.model.memory import check_decoding
from lmlab.run.rundir import LoadedRun, RunDir
from lmlab.serving.batcher import Batcher
from lmlab.serving.edge import ServeOptions
from lmlab.serving.requests import Served
from lmlab.serving.state import State

# How long a drained server waits for its loading thread: a process that exits while that thread is inside torch can
# abort rather than exit 0. A second signal waits for nothing.
STOP_WAIT = 30.0


class Startup:
    """Loads `options.run` for `state` on a thread of its own (`begin`); `stop` ends a compiler still running."""

    def __init__(self, state: State, options: ServeOptions, since: float):
        self.state, self.options, self.since = state, options, since
        self.compiler: subprocess.Popen | None = None
        self.choice = StepChoice("eager", "not loaded yet")
        self.threads: Heard | None = None  # the decode steps' thread rule, once the run is loaded
        self.thread = threading.Thread(target=self._load, name="lmlab-startup", daemon=True)

    def begin(self) -> None:
        self.thread.start()

    def stop(self, wait: bool = True) -> None:
        """Kill the compiler and, with `wait`, wait up to STOP_WAIT for the thread to end."""
        deadline = time.monotonic() + STOP_WAIT * wait
        while True:
            compiler = self.compiler
            if compiler is not None and compiler.poll() is None:
                compiler.kill()
                compiler.wait()
            if not self.thread.is_alive() or time.monotonic() >= deadline:
                return
            self.thread.join(timeout=0.1)

    def _phase(self, name: str) -> float:
        self.state.phase = name
        return time.perf_counter()

    def _log(self, what: str, since: float) -> None:
        self.state.log(f"lmlab serve: {what} in {time.perf_counter() - since:.2f}s")

    def _load(self) -> None:
        state, options = self.state, self.options
        try:
            # As asked (--threads), else chosen from one fewer than the cores this process may use, leaving one to
            # the event loop and HTTP beside the decode step (docs/reference/serving.md says why).
            chooser = ThreadChooser(options.threads, "--threads", most=max(1, len(cores()) - 1))
            started = self._phase("loading the run")
            run = RunDir(options.run).load(options.checkpoint, options.device)
            # Rows that cannot fit in memory are refused before anything is said to be loaded or compiled: the
            # refusal is then the command's one line.
            dtype = decode_dtype(run.device, run.dtype, False)
            check_decoding(run.config.model, options.max_batch, self._row_tokens(run), "--max-batch", run.device,
                           dtype, state_dtype(options.quantize, dtype))
            self._log(f"loaded {options.run} ({run.checkpoint} checkpoint, step {run.step}) on {run.device}", started)
            for note in [*run.notes, *(f"note: {note}" for note in cache.take_notes())]:  # said now: a server runs on
                state.log(f"lmlab serve: {note}")
            state.threads = chooser.start(run.device).threads
            self.threads = Heard(chooser, self._threads_changed)  # a load that comes or goes mid-serve is heard
            folder = run.run.checkpoint(str(run.step))  # the loaded step's, whatever best or latest points to now
            # As sample and answer do; a step compiled from int8 weights (--quantize) is kept as a float one is, and
            # until it is built the server decodes eagerly from the same int8 weights.
            choice = self.choice = choose_step(run.model, run.device, options.compile, options.quantize)
            compiles = choice.compiled
            batch = self._kept(run, folder) if compiles else None
            if batch is None:
                batch = self._uncompiled(run, StepChoice("eager, compiling", "until the compiled step is built in the "
                                                         "background", choice.weights) if compiles else choice)
            assert state.relay is not None, "the server sets the relay up before it starts loading"
            created = int((folder / "state.json").stat().st_mtime)  # when the served checkpoint was written
            state.served = Served(run, Batcher(batch, options.max_queue, state.relay.publish), options, created,
                                  max_prompt_chars(run), document_start(run.tokenizer))
            # Said before /health says it: a log read as the server's readiness never lags the server.
            state.log(f"lmlab serve: ready, {time.perf_counter() - self.since:.2f}s after the command; decoding "
                      f"{state.decode_step} ({state.decode_why}) on {state.threads} thread"
                      f"{'s' * (state.threads > 1)}; chats rendered through {chat_rendering(run)}")
            state.phase = "ready"
        except Exception as err:  # the server stops; the command says why (its one line) and exits 2
            state.failure = str(err) if isinstance(err, UserError) else f"loading failed: {err!r}"
            state.stop()
            return
        if state.decode_step == "eager, compiling" and not state.draining:
            try:
                self._compile(run, folder)
            except Exception as err:  # the server goes on decoding eagerly
                self._eager(f"compiling the decode step failed ({err!r})")

    def _uncompiled(self, run: LoadedRun, choice: StepChoice) -> Batch:
        """A batch decoding with the CUDA-graph step, checked first (or eagerly: at once, from the weights the choice
        quantizes, or when that step fails its check), the step and why said in /health."""
        started = self._phase(f"building the decode step ({choice.kind})") if choice.kind in CAPTURES else 0.0
        dtype = decoding_only(run, compiled=False)
        step, used = build_step(choice, run.model, dtype, self.options.max_batch)
        if choice.kind in CAPTURES:
            self._log(f"built and checked the decode step ({used.describe()})", started)
        self.state.decode_step, self.state.decode_why = used.kind, used.why
        return self._batch(run, dtype, step)

    def _eager(self, why: str) -> None:
        self.state.decode_step, self.state.decode_why = "eager", why
        self.state.log(f"lmlab serve: {why}; decoding eagerly")

    def _row_tokens(self, run: LoadedRun) -> int:
        return run.config.model.block_size + self.options.max_tokens_cap  # a row's prompt fills the context at most

    def _batch(self, run: LoadedRun, dtype: torch.dtype, step: Step | None = None) -> Batch:
        """A batch of --max-batch rows, refused in one sentence (the memory preflight) when they cannot fit."""
        return Batch(run.model, run.tokenizer, self.options.max_batch, dtype, step, setting="--max-batch",
                     tokens_per_row=self._row_tokens(run), threads=self.threads)

    def _most(self) -> int:
        """The most threads the server decodes on: what its compiled step is built for (it follows fewer)."""
        assert self.threads is not None, "the threads are chosen before any step is built"
        return self.threads.chooser.most

    def _threads_changed(self, choice: Choice) -> None:
        """What the load changed mid-serve, in sample's words, and in /health."""
        assert self.threads is not None, "only the rule changes the threads"
        self.state.threads = choice.threads
        self.state.log(f"lmlab serve: decoding on {choice.describe(self.threads.chooser.override)}")

    def _kept(self, run: LoadedRun, folder: Path) -> Batch | None:
        """A batch decoding with the kept compiled step of the served weights, or None when none is kept, it is refused
        (said, and built again) or it fails to load (deleted, and built again)."""
        try:
            path = kept_step(step_key(run.config.model, weights_sha256(folder), self.options.max_batch, run.dtype,
                                      run.device, self.options.quantize, self._most()))
        except StepRefused as err:
            self.state.log(f"lmlab serve: {err}")
            return None
        if path is None:
            return None
        started = self._phase("loading the kept compiled step")
        try:
            step, digest = self._use(path)
        except StepRefused as err:
            self.state.log(f"lmlab serve: {err}; compiling it again")
            return None
        except Exception as err:
            self.state.log(f"lmlab serve: the kept compiled step {path} did not load ({err!r}); compiling it again")
            path.unlink(missing_ok=True)
            return None
        self._log(f"loaded the kept compiled step {path} (sha256 {digest[:16]}...)", started)
        return self._batch(run, run.dtype, step)

    def _use(self, path: Path) -> tuple[Step, str]:
        """The compiled step kept at `path`, and its sha256 (checked as loaded), said in /health."""
        step, digest = load_kept(path)
        self.state.decode_step, self.state.compiled = self.choice.kind, {"file": str(path), "sha256": digest}
        self.state.decode_why = self.choice.why
        return step, digest

    def _compile(self, run: LoadedRun, folder: Path) -> None:
        """Build the compiled step in a process of its own, then switch the batcher to it."""
        state, options = self.state, self.options
        started = time.perf_counter()
        state.log("lmlab serve: compiling the decode step in the background (a minute or more; decoding eagerly "
                  "until then)")
        command = python_command("lmlab.inference.compiled", str(options.run), str(folder), weights_sha256(folder),
                                 str(options.max_batch), str(run.dtype).removeprefix("torch."),
                                 str(self._most()), run.device.type, options.quantize)
        self.compiler = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = self.compiler.communicate()
        if self.compiler.returncode or state.draining:
            code = self.compiler.returncode
            reason = (f"its process was killed by {signal.Signals(-code).name}" if code < 0 else
                      (err.strip().splitlines() or [f"status {code}"])[-1])
            if not state.draining:
                self._eager(f"compiling the decode step failed ({reason})")
            return
        path = Path(out.strip().splitlines()[-1])
        try:
            step, _ = self._use(path)
        except StepRefused as err:
            self._eager(str(err))
            return
        state.loaded.batcher.use(self._batch(run, run.dtype, step))
        forget_old_steps()
        self._log(f"compiled the decode step (kept in {path}: the next start of this checkpoint loads it), "
                  "decoding with it from now on; built", started)


def chat_rendering(run: LoadedRun) -> str:
    """How the server puts a chat to the run (`generate.chat_prompt`), for the log."""
    if run.chat_template is not None:
        return "the model's chat template"
    fmt = run.prompt_format
    return f"the {fmt.name} prompt format" if fmt else "a plain role: content transcript"
