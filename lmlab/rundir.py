"""The run folder: the one module that writes a run directory, and the one way to load a run back.

```
runs/NAME/
  config.toml     the resolved RunConfig ([finetune] too in a fine-tuned run)
  metrics.jsonl   one JSON event per line, appended and flushed: `start` first (`RunDir.begin`), then train,
                  eval, checkpoint, skip/spike/rollback, and `end` when the run finishes or stops
  tokenizer.json  the run's tokenizer, and dataset.json the meta.json of its dataset (tokenizer spec, bytes per
                  token), so the run samples and evaluates after its dataset is gone
  prompt.json     a fine-tuned run's prompt format (`lmlab.prompt`)
  chat_template.json  an imported instruct model's chat template (`lmlab.chat`)
  samples.txt     what `lmlab sample` drew, each under a header line
  evaluations.json  full-split evaluations (`lmlab eval`, `lmlab report`), by weights, split and dtype
  loss.png        train and val loss, redrawn at every evaluation
  checkpoints/    step_NNNNNN/ folders and the latest/best pointers (`lmlab.checkpoint`); every state.json
                  holds the STATE keys, `training` being what its writer needs to continue
```

One process writes a run at a time: training, resuming, fine-tuning and importing hold its lock
(`../.NAME.lock` beside the folder, `lmlab.fileio.WriterLock`), and every writing method here checks that it is
held. `samples.txt` is the exception: `lmlab sample` appends to it while the run trains, each entry whole,
under a lock of the file itself.

A run is one of KINDS. Folders written before this module (no `kind` in the start event, no `format` in
state.json) still load: `kind()` and `_upgrade` read them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import lmlab
from lmlab import checkpoint as ckpt
from lmlab.chat import ChatTemplate
from lmlab.config import BUILT_IN_KINDS, RunConfig, UnknownKind, load_config, to_toml
from lmlab.data.tokenizers import Tokenizer
from lmlab.device import autocast_dtype, configure, machine, resolve_device
from lmlab.errors import UserError
from lmlab.fileio import WriterLock, append_whole, atomic_write_bytes, atomic_write_text
from lmlab.model import LanguageModel, build_model
from lmlab.model.plugins import provider
from lmlab.prompt import PromptFormat

KINDS = ("trained", "fine-tuned", "imported")
STATE_FORMAT = 2  # state.json: format, kind, lmlab_version, model_config, training (+ step, optimizer, files)

Loader = Callable[[Path, torch.nn.Module, Any], dict[str, Any]]


class RunDir:
    """A run folder by path; nothing is read or written until asked."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.loss_plot = self.path / "loss.png"
        self._metrics = self.path / "metrics.jsonl"
        self._lock = WriterLock(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    def config(self, overrides: list[str] = ()) -> RunConfig:
        """The run's resolved config, with `--set` overrides applied."""
        path = self.path / "config.toml"
        if not path.exists():
            raise UserError(f"{self.path} is not an lmlab run (no config.toml); pass a directory made by "
                            "`lmlab train`, `lmlab finetune` or `lmlab import-hf`.")
        try:
            return load_config(path, overrides)
        except UnknownKind as err:
            source = (self.events(limit=1) or [{}])[0].get("plugin") or {}
            if not source.get("package"):
                raise
            raise UserError(f"{self.path} is a model of kind {err.kind!r}, which the package {source['package']} "
                            f"{source.get('version') or ''} provides, and it is not installed here; install it "
                            f"(e.g. pip install {source['package']}) to use this run.")

    def kind(self) -> str:
        """trained, fine-tuned or imported: from the start event, or for an older folder from what it holds."""
        head = self.events(limit=2)
        if head and head[0].get("kind") in KINDS:
            return head[0]["kind"]
        if (self.path / "prompt.json").exists():
            return "fine-tuned"
        return "imported" if len(head) > 1 and head[1].get("event") == "import" else "trained"

    # -- writing a run ---------------------------------------------------------------------------------------

    def lock(self) -> None:
        """Become the run's one writer, before reading what a write depends on; a second writer is refused in one
        sentence. The kernel releases the lock if this process dies, so a crash never leaves the run stuck."""
        self._lock.acquire(f"{self.path} is being written by another process ({{holder}}); wait for it to finish, "
                           "or choose another --run.")

    def unlock(self) -> None:
        self._lock.release()

    @contextmanager
    def locked(self) -> Iterator[RunDir]:
        self.lock()
        try:
            yield self
        finally:
            self.unlock()

    def _check_writer(self) -> None:
        assert self._lock.held_here, f"{self.path} written without its lock: call RunDir.lock() first"

    def check_new(self) -> None:
        """Refuse to start a run where one already has checkpoints: nothing of it is overwritten."""
        if self.checkpoints.exists() and any(self.checkpoints.iterdir()):
            raise UserError(f"{self.path} already has checkpoints; pick a new --run, or continue a training run "
                            f"with `lmlab train --resume {self.path}`.")

    def write_setup(self, cfg: RunConfig, tokenizer: Tokenizer | Path | None, dataset: dict[str, Any],
                    prompt: PromptFormat | None = None, chat: ChatTemplate | None = None) -> None:
        """config.toml, tokenizer.json (a Tokenizer, or a tokenizer.json to copy), dataset.json, prompt.json,
        chat_template.json."""
        self.write_config(cfg)
        if isinstance(tokenizer, Tokenizer):
            atomic_write_text(self.path / "tokenizer.json", tokenizer.backend.to_str(pretty=True))
        elif tokenizer is not None:
            atomic_write_bytes(self.path / "tokenizer.json", Path(tokenizer).read_bytes())
        atomic_write_text(self.path / "dataset.json", json.dumps(dataset, indent=2))
        if prompt is not None:
            atomic_write_text(self.path / "prompt.json", json.dumps(dataclasses.asdict(prompt), indent=2))
        if chat is not None:
            atomic_write_text(self.path / "chat_template.json", chat.to_json())

    def write_config(self, cfg: RunConfig) -> None:
        """config.toml: the resolved config (rewritten when a budgeted run fixes its max_iters)."""
        self._check_writer()
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.toml", to_toml(cfg))

    def begin(self, kind: str, model: LanguageModel, cfg: RunConfig, dataset: dict[str, Any], *,
              init_from: str | None = None, device: torch.device | None = None, dtype: torch.dtype | None = None,
              world_size: int = 1, parallel: str = "none", peak: tuple[float, str] | None = None,
              origin: dict[str, Any] | None = None) -> None:
        """Start a fresh metrics.jsonl with the start event, whose keys are the same for every kind (None where a
        kind has no value); `origin` is where a fine-tuned or imported run came from."""
        assert kind in KINDS, kind
        self._check_writer()
        self.check_new()
        self.path.mkdir(parents=True, exist_ok=True)
        self._metrics.unlink(missing_ok=True)
        self.log({
            "event": "start", "step": 0, "kind": kind, "lmlab_version": lmlab.__version__,
            "model": model.describe(), "params": model.num_params(),
            "params_non_embedding": model.num_params(embeddings=False), "flops_per_token": model.flops_per_token(),
            "dataset": cfg.data.dataset or None, "tokenizer": dataset.get("tokenizer"), "init_from": init_from,
            "device": str(device) if device else None, "dtype": str(dtype).removeprefix("torch.") if dtype else None,
            "world_size": world_size, "parallel": parallel, "peak_flops": peak[0] if peak else None,
            "peak_source": peak[1] if peak else None, "origin": origin, "machine": machine(device),
            "plugin": None if cfg.model.kind in BUILT_IN_KINDS else provider(cfg.model.kind),
        })

    def resumed(self, step: int, checkpoint: str, device: torch.device, dtype: torch.dtype, world_size: int) -> None:
        """Log that training continues from a checkpoint, and on what: a resume may move to another machine."""
        self.log({"event": "resume", "step": step, "checkpoint": checkpoint, "device": str(device),
                  "dtype": str(dtype).removeprefix("torch."), "world_size": world_size, "machine": machine(device)})

    def log(self, event: dict[str, Any]) -> None:
        """Append one event in one write: a crash or a full disk loses at most that line, never half of it."""
        self._check_writer()
        append_whole(self._metrics, json.dumps(event) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop events logged after the checkpoint (and the end of a stopped run), so the log reads as
        one uninterrupted run."""
        self._check_writer()
        kept = [e for e in self.events() if e.get("step", 0) <= step and e.get("event") != "end"]
        atomic_write_text(self._metrics, "".join(json.dumps(e) + "\n" for e in kept))

    def add_sample(self, text: str, checkpoint_name: str, step: int, settings: str) -> None:
        """Append a sample to samples.txt under a header naming its checkpoint and how it was drawn. It needs no
        run lock (a run is sampled while it trains): each entry is appended whole, under a lock of the file."""
        append_whole(self.path / "samples.txt", f"--- checkpoint {checkpoint_name} (step {step}), {settings}\n"
                                                f"{text}\n\n")

    def save_checkpoint(self, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                        training: dict[str, Any] | None, best: bool, keep: int) -> Path:
        """A step folder holding the weights, the optimizer and `training` (what the writer needs to continue,
        None for an import); then only the newest `keep` step folders, best and latest remain."""
        self._check_writer()
        state = {"format": STATE_FORMAT, "kind": self.kind(), "lmlab_version": lmlab.__version__,
                 "model_config": dataclasses.asdict(self.config().model), "training": training}
        folder = ckpt.save_checkpoint(self.checkpoints, step, weights, optimizer_state, state, best)
        ckpt.prune_checkpoints(self.checkpoints, keep)
        return folder

    # -- reading a run ---------------------------------------------------------------------------------------

    def events(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The metrics events (the first `limit` of them), skipping a line cut short by a crash."""
        if not self._metrics.exists():
            return []
        events = []
        with open(self._metrics, encoding="utf-8") as f:
            for line in f:
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
                if limit is not None and len(events) >= limit:
                    break
        return events

    def evaluations(self) -> list[dict[str, Any]]:
        """The full-split evaluations kept in evaluations.json (by `lmlab eval` and `lmlab report`), oldest first."""
        try:
            return json.loads((self.path / "evaluations.json").read_text(encoding="utf-8"))["results"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return []

    def save_evaluation(self, result: dict[str, Any]) -> None:
        """Keep an evaluation, in place of an older one of the same weights on the same split in the same dtype."""
        same = ("weights_sha256", "val_sha256", "dtype")
        kept = [r for r in self.evaluations() if any(r.get(k) != result[k] for k in same)]
        atomic_write_text(self.path / "evaluations.json", json.dumps({"results": [*kept, result]}, indent=1))

    def running(self) -> bool:
        """Whether a process holds the run's lock: it is training, fine-tuning or importing it now."""
        return self._lock.held()

    def writer_pid(self) -> int | None:
        """The process that holds the run's lock, if one does."""
        return self._lock.holder_pid() if self.running() else None

    def dataset(self) -> dict[str, Any]:
        """The run's dataset.json ({} when it has none)."""
        try:
            return json.loads((self.path / "dataset.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}

    def tokenizer(self) -> Tokenizer:
        facts = self.dataset()
        if not facts.get("tokenizer") or not (self.path / "tokenizer.json").exists():
            raise UserError(f"{self.path} has no tokenizer (tokenizer.json and its spec in dataset.json); import the "
                            "model again with `lmlab import-hf DIR --tokenizer DIR_OR_FILE --out NEW_RUN`.")
        return Tokenizer.load(self.path / "tokenizer.json", facts["tokenizer"], facts.get("eot_id"))

    def prompt_format(self) -> PromptFormat | None:
        """The format a fine-tuned run was taught with; None for other runs."""
        path = self.path / "prompt.json"
        if not path.exists():
            return None
        try:
            return PromptFormat(**json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError):
            raise UserError(f"{path} is not a prompt format written by `lmlab finetune`; restore or delete it.")

    def chat_template(self) -> ChatTemplate | None:
        """An imported instruct model's chat template; None for other runs (a fine-tuned one keeps its format)."""
        path = self.path / "chat_template.json"
        return ChatTemplate.from_json(path) if path.exists() else None

    def checkpoint(self, which: str = "latest") -> Path:
        """The step folder `best` or `latest` points to. Without a usable `latest` pointer (deleted, damaged, or
        naming no step folder of this run) it is the newest step folder, which `latest` would name."""
        folder = ckpt.pointer(self.checkpoints, which)
        if folder is None and which == "latest" and self.step_folders():
            folder = self.step_folders()[-1]
        if folder is None:
            raise UserError(f"{self.path} has no {which} checkpoint; train it first "
                            f"(`lmlab train CONFIG --run {self.path}`).")
        return folder

    def step_folders(self) -> list[Path]:
        return ckpt.step_folders(self.checkpoints)

    def remove_partial_checkpoints(self) -> None:
        self._check_writer()
        ckpt.remove_partial(self.checkpoints)

    def read_checkpoint(self, folder: Path, model: torch.nn.Module, optimizer: Any = None,
                        load: Loader = ckpt.load_checkpoint) -> dict[str, Any]:
        """Load a step folder into `model` (and `optimizer`) with `load` (a sharded model brings its own) and
        return its state.json in the current format."""
        return _upgrade(load(folder, model, optimizer), self)

    def load(self, which: str = "best", device: str = "auto", need_tokenizer: bool = True) -> LoadedRun:
        """The run's model at its `best` or `latest` checkpoint, in eval mode, with what using it takes; without
        `need_tokenizer`, a run that has no tokenizer loads with None in its place. A run never evaluated (stopped
        before its first eval) has no `best`: it loads `latest`, and `LoadedRun.checkpoint` says so."""
        if which not in ("best", "latest"):
            raise UserError(f"--checkpoint {which} is unknown; use best or latest.")
        if which == "best" and ckpt.pointer(self.checkpoints, "best") is None:
            which = "latest"
        cfg = self.config()
        tokenizer = self.tokenizer() if need_tokenizer or (self.path / "tokenizer.json").exists() else None
        torch_device = resolve_device(device)
        configure(torch_device)  # TF32 for an fp32 run's inference on CUDA, as in its training
        model = build_model(cfg.model).to(torch_device)
        for attempt in range(3):  # a run in training prunes old step folders: one may go while it is read
            folder = self.checkpoint(which)
            try:
                state = self.read_checkpoint(folder, model)
                break
            except UserError:
                if folder.exists() or attempt == 2:
                    raise
        return LoadedRun(self, self.kind(), cfg, model.eval(), tokenizer, torch_device,
                         autocast_dtype(torch_device, cfg.train.dtype), self.prompt_format(), which, state["step"],
                         (state.get("files") or {}).get("model.safetensors"), self.chat_template())


def _upgrade(state: dict[str, Any], run: RunDir) -> dict[str, Any]:
    """state.json in the current format. Before it, each writer kept its own keys at the top level: those become
    `training` (a trained run's progress, an epoch of fine-tuning), or nothing for an import."""
    if state.get("format") == STATE_FORMAT:
        return state
    envelope = ("step", "optimizer", "files", "model_config", "lmlab_version")
    own = {k: v for k, v in state.items() if k not in envelope and k != "imported_from"}
    return {**{k: state.get(k) for k in envelope}, "format": STATE_FORMAT, "kind": run.kind(),
            "training": own or None}


@dataclass
class LoadedRun:
    """A run's model at one checkpoint, ready for inference (eval mode, on its device), with what using it takes."""

    run: RunDir
    kind: str
    config: RunConfig
    model: LanguageModel
    tokenizer: Tokenizer | None  # None only when loaded without need_tokenizer
    device: torch.device
    dtype: torch.dtype  # the autocast dtype the run's config resolves to on this device
    prompt_format: PromptFormat | None  # a fine-tuned run's; None for the others
    checkpoint: str  # best or latest: the one loaded (latest when best was asked of a run never evaluated)
    step: int
    weights_sha256: str | None = None  # of the loaded model.safetensors: what an evaluation is of
    chat_template: ChatTemplate | None = None  # an imported instruct model's; None for the others
