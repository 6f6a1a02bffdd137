"""`lmlab.Run`: a run folder from Python, as the commands read it (the commands call these methods)."""

from __future__ import annotations

import html
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from lmlab.analysis.history import FIELDS, evaluations
from lmlab.analysis.plots import grad_norm_figure, loss_figure
from lmlab.api.checks import checked, pandas_for, sampling_params
from lmlab.api.loading import ThreadNotes, decode_step, note_checkpoint, pick_threads, print_note
from lmlab.core.config import RunConfig, checkpoint_name, seeded
from lmlab.core.errors import UserError
from lmlab.core.fileio import WriteError
from lmlab.core.notebook import console_here
from lmlab.core.progress import ticking
from lmlab.data.tokenizers import Tokenizer
from lmlab.run import checkpoint as ckpt
from lmlab.run.rundir import LoadedRun, RunDir

if TYPE_CHECKING:  # what decodes imports torch, at the first call that decodes: reading a run's files needs none
    import matplotlib.figure
    import pandas

    from lmlab.core.threads import ThreadChooser
    from lmlab.inference.generate import Asked, TextStream
    from lmlab.model import LanguageModel
    from lmlab.train.reports import TrainResult

PLOTS = {"loss": loss_figure, "grad_norm": grad_norm_figure}  # what Run.plot draws
# The kinds of the arguments every method that decodes takes (`checked`).
DECODING = {"checkpoint": "checkpoint", "device": "name", "compile": "flag", "keep": "flag", "quantize": "quantize"}


@dataclass(frozen=True)
class Checkpoint:
    """One step folder of a run."""

    name: str  # the folder's name, step_NNNNNN: what `checkpoint=` takes, as do best and latest
    step: int  # the optimizer steps its weights had taken
    path: Path  # the step folder: model.safetensors, optimizer.safetensors, state.json
    best: bool  # the run's `best` pointer names it (the lowest val loss)
    latest: bool  # the run's `latest` pointer names it (what a resume continues from)


class Run:
    """A run folder (made by `lmlab.train`, `lmlab train`, `finetune` or `import-hf`), read from Python; a folder that
    is no run is refused at once. `model`, `sample` and `eval` load a checkpoint the first time and keep it until its
    weights change on disk. `console` is where progress and messages go. `result`, on a Run that `lmlab.train` returned,
    is how that training ended (`steps`, `best_val_loss`, `best_step`, `stopped_by`, `stopped_early`, `budget_spent`,
    `final`: its final score, the `final` event), else None. `decoded` is (tokens, seconds) of the newest text that
    `sample`, `samples`, `chat` or `instruct` generated, its prompt's reading included."""

    @checked(path="path", console="console?")
    def __init__(self, path: str | Path, console: Console | None = None):
        self.path = Path(path)
        self._dir = RunDir(self.path)
        self._dir.config()  # a folder that is no run is refused as every command refuses it
        self.console = console or console_here()
        self.result: TrainResult | None = None  # what `lmlab.train` returned it with: steps, best, how it stopped
        self._loaded: dict[tuple[str, str, str], LoadedRun] = {}
        self._choosers: dict[tuple[str, str, str], ThreadChooser] = {}  # the threads of each loaded run's work
        self.decoded: tuple[int, float] | None = None  # what `lmlab sample` says its speed by (the step's build not)

    @staticmethod
    @checked(folders="paths", console="console?")
    def newest(folders: str | Path | Sequence[str | Path] = "runs", console: Console | None = None) -> Run:
        """The run written to last (its metrics.jsonl) in `folders` or any folder below them."""
        roots = [Path(folders)] if isinstance(folders, (str, os.PathLike)) else [Path(f) for f in folders]
        logs = [log for root in roots if root.is_dir() for log in root.rglob("metrics.jsonl")]
        if not logs:
            raise UserError(f"no run in {' or '.join(map(str, roots))}; train one (`make demo`, `lmlab train CONFIG`), "
                            "or name a run folder: lmlab.Run(\"runs/NAME\").")
        return Run(max(logs, key=lambda log: log.stat().st_mtime).parent, console)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def _repr_html_(self) -> str:
        best = [c for c in self.checkpoints if c.best]
        history = self.history
        last = f", val loss {history[-1]['val_loss']:.4f} at step {history[-1]['step']:,}" if history else ""
        at = f", best {best[0].name}" if best else ""
        return (f"<code>lmlab.Run({html.escape(str(self.path))!r})</code>: {html.escape(self.kind)}, "
                f"{len(history)} evaluation(s){html.escape(last)}{html.escape(at)}")

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> RunConfig:
        """The run's resolved config (config.toml) as the typed dataclasses."""
        return self._dir.config()

    @property
    def kind(self) -> str:
        """trained, fine-tuned or imported."""
        return self._dir.kind()

    @property
    def tokenizer(self) -> Tokenizer:
        """The run's tokenizer (`encode(text)`, `decode(ids)`), checked against the checksum the run keeps."""
        return self._dir.tokenizer()

    @property
    def events(self) -> list[dict[str, Any]]:
        """metrics.jsonl: every event the run logged (start, train, eval, checkpoint, end, ...), in order."""
        return self._dir.events()

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every evaluation, in order, as records: step, epoch, tokens, elapsed, train_loss (the mean of the steps since
        the one before), train_eval_loss (the train split scored as val is), val_loss, best_val_loss, is_best,
        perplexity and accuracy (the share of next tokens guessed right), both of the batches val_loss is of (a run
        whose evaluations logged no accuracy: of a whole-split `lmlab eval` of that step's checkpoint on the same
        split, else None), grad_norm and grad_norm_max (`lmlab log`'s rows)."""
        return evaluations(self._dir)

    @checked()
    def history_frame(self) -> pandas.DataFrame:
        """`history` as a pandas DataFrame, one row per evaluation indexed by step (pandas must be installed)."""
        pandas = pandas_for("history_frame", "Run.history", "evaluations")
        return pandas.DataFrame(self.history, columns=list(FIELDS)).set_index("step")

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """The run's step folders, oldest first."""
        pointed = {which: ckpt.pointer(self._dir.checkpoints, which) for which in ("best", "latest")}
        return [Checkpoint(folder.name, int(folder.name.removeprefix("step_")), folder, folder == pointed["best"],
                           folder == pointed["latest"]) for folder in self._dir.step_folders()]

    @checked(what="text")
    def plot(self, what: str = "loss") -> matplotlib.figure.Figure:
        """Train and val loss against step (what loss.png shows), or with `what="grad_norm"` the gradient norm of each
        logged step with the LR, as a matplotlib Figure."""
        if what not in PLOTS:
            raise UserError(f"what is {what!r}; use one of {', '.join(PLOTS)}.")
        return PLOTS[what](self._dir)

    @checked(checkpoint="checkpoint", device="name")
    def model(self, checkpoint: str = "best", device: str = "auto") -> LanguageModel:
        """The model at `checkpoint` (best, latest, step_N or N; a run never evaluated has no best: its latest) as a
        torch module in eval mode on `device` (auto, cpu, cuda, mps), the same module while its weights are unchanged on
        disk."""
        return self.load(checkpoint, device).model

    @checked(checkpoint="checkpoint", device="name")
    def load(self, checkpoint: str = "best", device: str = "auto") -> LoadedRun:
        """The model at `checkpoint` with what using it takes: `.model`, `.tokenizer`, `.device`, `.dtype` (the
        autocast dtype of the run's config here), `.checkpoint` and `.step` (those loaded), `.config`."""
        return self._use(checkpoint, device, "")[0]

    def _use(self, checkpoint: str, device: str, doing: str, quantize: str = "none") -> tuple[LoadedRun, ThreadNotes]:
        """The loaded checkpoint (kept apart where its weights are to be quantized: they are, in place), and the notes
        on the threads what it is `doing` (nothing: "") computes with: the start's, to print once the caller's input
        passed its checks when other processes' load lowered them, and the rule that hears a load mid-decode."""
        from lmlab.core.threads import ThreadChooser

        key = (checkpoint_name(checkpoint), device, quantize)
        kept, sha = self._loaded.get(key), self._dir.weights_sha256(key[0])
        fresh = kept is None or sha is None or kept.weights_sha256 != sha
        # Made before the load (see ThreadChooser); for a run kept by a call that computed nothing (`load`), now.
        chooser = ThreadChooser(0, "OMP_NUM_THREADS") if doing and (fresh or key not in self._choosers) else None
        if fresh:
            kept = self._loaded[key] = self._dir.load(checkpoint, device)
            note_checkpoint(str(self.path), checkpoint, kept.checkpoint, kept.step)
            for note in kept.notes:
                print_note(note)
        assert kept is not None, "loaded"
        if chooser is None:
            return kept, ThreadNotes(self._choosers.get(key), None, doing)
        self._choosers[key] = chooser
        return kept, ThreadNotes(chooser, pick_threads(chooser, kept, doing), doing)

    @checked(checkpoint="checkpoint", dataset="path?", max_tokens="count?", batch_size="count", device="name")
    def eval(self, checkpoint: str = "best", *, dataset: str | Path | None = None, max_tokens: int | None = None,
             batch_size: int = 32, device: str = "auto") -> dict[str, Any]:
        """Val loss, perplexity, accuracy and bits per byte of `checkpoint` on the val split of the run's dataset (or of
        `dataset`, which must share the run's tokenizer), or on about `max_tokens` of it in whole windows spread over
        it; kept in the run's evaluations.json. Returns the record (loss, perplexity, accuracy, bits_per_byte, tokens,
        windows, checkpoint, step, dataset)."""
        from lmlab.evals.evaluate import evaluate_run

        run, notes = self._use(checkpoint, device, "evaluated")
        subset = f" (about {max_tokens:,} tokens of it: --max-tokens)" if max_tokens else ""
        with ticking(self.console, "window", f"Evaluating the val split{subset}") as tick:
            result = evaluate_run(run, Path(dataset) if dataset else None, batch_size, tick, max_tokens=max_tokens)
        notes.flush()  # after the work, so that a refusal of its input stays one line
        not_kept = result.pop("not_kept", None)
        if not_kept:
            print(f"note: the result is not kept in the run: {not_kept}", file=sys.stderr)
        return result

    @checked(prompt="text", stream="flag", **DECODING)
    def sample(self, prompt: str = "", *, checkpoint: str = "best", device: str = "auto", stream: bool = False,
               compile: bool = False, keep: bool = True, quantize: str = "none",
               **settings: Any) -> str | Iterator[str]:
        """The prompt and its continuation (an empty prompt starts a new document), as `lmlab sample` draws it;
        `settings` are max_new_tokens, temperature (0: greedy), top_k, top_p and seed. With `stream`, an iterator of the
        pieces (the prompt first); with `compile`, decoded by a compiled step on a CPU (worth it for thousands of
        tokens; on a GPU the step replays as CUDA graphs either way); with `quantize="int8"`, from 8-bit weights on the
        CPU (lmlab.inference.quantize). Kept in samples.txt unless not `keep`."""
        from lmlab.inference.generate import continuing

        return self._text(lambda run: continuing(run, prompt), len(prompt), settings, f"prompt {prompt!r}",
                          checkpoint, device, stream, compile, keep, quantize)

    @checked(prompt="text", num_samples="count", **DECODING)
    def samples(self, prompt: str = "", num_samples: int = 2, *, checkpoint: str = "best", device: str = "auto",
                compile: bool = False, keep: bool = True, quantize: str = "none", **settings: Any) -> list[str]:
        """`num_samples` continuations of the prompt drawn in one batch, the i-th with seed `seed` + i (settings as
        `sample`'s), each kept in samples.txt unless not `keep`."""
        from lmlab.inference.generate import continue_all, continuing

        params = sampling_params(settings)
        run, notes = self._use(checkpoint, device, "decoding", quantize)
        step = decode_step(run, num_samples, "--num-samples", params, compile, self.console, quantize,
                           len(prompt))
        began = time.perf_counter()
        drawn = seeded(params, num_samples)
        done = continue_all(run, continuing(run, prompt, num_samples), drawn, num_samples, step,
                            setting="--num-samples", threads=notes.heard())
        texts = [prompt + c.text.text for c in done]
        # Past end-of-text and without stop strings, each continuation is its max_new_tokens.
        self.decoded = (num_samples * params.max_new_tokens, time.perf_counter() - began)
        notes.flush()
        if keep:
            for text, each in zip(texts, drawn):
                _keep(run, text, f"{each.describe()}, prompt {prompt!r}")
        return texts

    @checked(message="text", system="text?", stream="flag", **DECODING)
    def chat(self, message: str, *, system: str | None = None, checkpoint: str = "best", device: str = "auto",
             stream: bool = False, compile: bool = False, keep: bool = True, quantize: str = "none",
             **settings: Any) -> str | Iterator[str]:
        """The reply to a user's `message` (after `system`'s), through the run's chat template, prompt format or a role:
        content transcript; settings as `sample`'s."""
        from lmlab.inference.generate import chatting

        turns = [("system", system)] if system is not None else []
        turns.append(("user", message))
        return self._text(lambda run: chatting(run, turns), 0, settings, f"chat {message!r}, system {system!r}",
                          checkpoint, device, stream, compile, keep, quantize)

    @checked(instruction="text", input="text", stream="flag", **DECODING)
    def instruct(self, instruction: str, input: str = "", *, checkpoint: str = "best", device: str = "auto",
                 stream: bool = False, compile: bool = False, keep: bool = True, quantize: str = "none",
                 **settings: Any) -> str | Iterator[str]:
        """The answer to an instruction (and its input) asked in the run's own format; settings as `sample`'s."""
        from lmlab.inference.generate import instructing

        return self._text(lambda run: instructing(run, [(instruction, input)]), 0, settings,
                          f"instruction {instruction!r}, input {input!r}", checkpoint, device, stream, compile, keep,
                          quantize)

    def _text(self, asking: Callable[[LoadedRun], Asked], prompt_length: int, settings: dict[str, Any], asked: str,
              checkpoint: str, device: str, stream: bool, compile: bool, keep: bool,
              quantize: str) -> str | Iterator[str]:
        """The text of the prompt `asking` puts to the loaded run, with the sampling `settings` (its prompt checked
        at once), whole or streamed."""
        from lmlab.inference.generate import text_stream

        params = sampling_params(settings)
        run, notes = self._use(checkpoint, device, "decoding", quantize)
        step = decode_step(run, 1, "--num-samples", params, compile, self.console, quantize, prompt_length)
        pieces = text_stream(run, asking(run), params, step, notes.heard())
        notes.flush()  # once the prompt passed its checks
        flowing = self._flow(run, pieces, f"{params.describe()}, {asked}" if keep else None)
        return flowing if stream else "".join(flowing)

    def _flow(self, run: LoadedRun, pieces: TextStream, settings: str | None) -> Iterator[str]:
        """The pieces as they come, the tokens and seconds they took in `decoded` at the end, and the whole text kept
        in samples.txt (unless `settings` is None)."""
        text, began = [], time.perf_counter()
        for piece in pieces:
            text.append(piece)
            yield piece
        self.decoded = (pieces.tokens, time.perf_counter() - began)
        if settings is not None:
            _keep(run, "".join(text), settings)


def used_run(path: str, checkpoint: str, device: str, doing: str) -> tuple[LoadedRun, ThreadNotes]:
    """A run loaded to compute (`doing` it: "scored", "decoding") as `lmlab.Run` loads it, for a command that
    computes with it once: with notes on stderr on what the load chose (the latest checkpoint when the run has
    no best one, fp32 over fp16 for bf16-born weights: `LoadedRun.notes`), and the notes on its threads, which
    the machine's rule chooses from the load over the loading (`pick_threads`)."""
    return Run(path)._use(checkpoint, device, doing)


def _keep(run: LoadedRun, text: str, settings: str) -> None:
    """Append a sample to samples.txt; one that cannot be written is only noted: the sample was returned."""
    try:
        run.run.add_sample(text, run.checkpoint, run.step, settings)
    except WriteError as err:
        print(f"note: the sample is not kept in the run: {err.not_kept()}", file=sys.stderr)
