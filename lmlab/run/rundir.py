"""The run folder: the one module that writes a run directory (docs/ARCHITECTURE.md lists its files), under its
lock, and the one way to load a run back. Older folders (no kind in the start event, no state.json format) load."""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmlab.core.config import RunConfig, checkpoint_name
from lmlab.core.config_toml import load_config, to_dict, to_toml
from lmlab.core.errors import UserError
from lmlab.core.fileio import append_whole, atomic_write_bytes, atomic_write_text, read_text, sha256_file
from lmlab.core.jsontext import parse_json
from lmlab.core.locks import WriterLock
from lmlab.core.plugin_kinds import BUILT_IN_KINDS, UnknownKind
from lmlab.core.version import __version__
from lmlab.data.tokenizers import Tokenizer, json_object
from lmlab.run import checkpoint as ckpt
from lmlab.run import evaluations
from lmlab.run.chat import ChatTemplate
from lmlab.run.events import as_json, peak_fields, read_events
from lmlab.run.prompt import PromptFormat

if TYPE_CHECKING:  # torch is imported where a run is begun or loaded: reading one (`lmlab runs`, `log`) needs none
    import torch

    from lmlab.core.peak import Peak
    from lmlab.model import LanguageModel

    Loader = Callable[[Path, torch.nn.Module, Any], dict[str, Any]]

RUN_KINDS = ("trained", "fine-tuned", "imported")
STATE_FORMAT = 2  # state.json: format, kind, lmlab_version, model_config, training (+ step, optimizer, files)


class RunDir:
    """A run folder by path: nothing is read or written until asked."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.loss_plot = self.path / "loss.png"
        self._metrics = self.path / "metrics.jsonl"
        self._lock = WriterLock(self.path)
        self._resume_points: set[str] | None = None  # read from the events when a checkpoint is first saved

    @property
    def name(self) -> str:
        return self.path.name

    def config(self, overrides: Sequence[str] = ()) -> RunConfig:
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
        """One of RUN_KINDS: from the start event, or for an older folder from what it holds."""
        head = self.events(limit=2)
        if head and head[0].get("kind") in RUN_KINDS:
            return head[0]["kind"]
        if (self.path / "prompt.json").exists():
            return "fine-tuned"
        return "imported" if len(head) > 1 and head[1].get("event") == "import" else "trained"

    def weights_dtype(self) -> str | None:
        """The dtype the weights were born in, which inference must respect: bfloat16 when any training of the run
        or its base ran in it, else the last one's; an import's published dtype; None where nothing says."""
        start = (self.events(limit=1) or [{}])[0]
        origin = start.get("origin") or {}
        if self.kind() == "imported":
            family = str(origin.get("format", "")).removeprefix("huggingface ")
            return origin.get("dtype") or ("float32" if family == "gpt2" else "bfloat16" if family else None)
        trained = [e.get("dtype") for e in self.events() if e.get("event") in ("start", "resume") and e.get("dtype")]
        base = origin.get("base") and Path(origin["base"]) != self.path and RunDir(Path(origin["base"]))
        if "bfloat16" in trained or (base and base.path.is_dir() and base.weights_dtype() == "bfloat16"):
            return "bfloat16"
        return trained[-1] if trained else None

    @contextmanager
    def locked(self) -> Iterator[RunDir]:
        """The run's one writer while inside (entered before reading what a write depends on); a second
        writer is refused."""
        self._lock.acquire(f"{self.path} is being written by another process ({{holder}}); wait for it to finish, "
                           "or choose another --run.")
        try:
            yield self
        finally:
            self._lock.release()

    def _check_writer(self) -> None:
        assert self._lock.held_here, f"{self.path} written without its lock: write inside RunDir.locked()"

    def check_new(self) -> None:
        """Refuse to start a run where one already has checkpoints."""
        if self.checkpoints.exists() and any(self.checkpoints.iterdir()):
            what = "a training run" if self.kind() != "fine-tuned" else "this fine-tune" if self.unfinished() else ""
            go_on = (f"pick a new --run, or continue {what} with `{self.resume_command()}`" if what else
                     f"pick a new --run: this fine-tune is finished (to tune it further, pass it as the base: "
                     f"`lmlab finetune {self.path} --data FILE --run NEW`)")
            raise UserError(f"{self.path} already has checkpoints; {go_on}.")

    def resume_command(self) -> str:
        """The command that continues this run: `lmlab train --resume RUN`, or a fine-tune's own command again."""
        if self.kind() != "fine-tuned":
            return f"lmlab train --resume {shlex.quote(str(self.path))}"
        start = (self.events(limit=1) or [{}])[0]
        ft = self.config().finetune
        assert ft is not None, "a fine-tuned run's config has its finetune section"
        base, data = start.get("init_from") or "BASE_RUN", (start.get("origin") or {}).get("data") or ft.data
        settings = [arg for f in dataclasses.fields(ft) if f.name != "data" and getattr(ft, f.name) != f.default
                    for arg in ("--set", f"finetune.{f.name}={getattr(ft, f.name)}")]
        return shlex.join(["lmlab", "finetune", base, "--data", data, "--out", str(self.path), *settings])

    def unfinished(self) -> str | None:
        """How a fine-tune that has not reached its end stands (running, stopped, killed), or a training run being
        trained now; else None."""
        kind = self.kind()
        if kind == "trained" and self.running():
            folders = self.step_folders()
            return f"a training run being trained now ({folders[-1].name if folders else 'no checkpoint'} its newest)"
        if kind != "fine-tuned":
            return None
        events = self.events()
        if events and events[-1].get("event") == "end" and not events[-1].get("stopped_by"):
            return None
        steps = [e["step"] for e in events if e.get("event") == "checkpoint"]
        how = ("being fine-tuned now" if self.running() else f"stopped by {events[-1]['stopped_by']}"
               if events and events[-1].get("event") == "end" else "killed or crashed")
        done = f"its newest checkpoint is step {max(steps)} of {self.config().train.max_iters}" if steps else \
            "no checkpoint yet"
        return f"an unfinished fine-tune ({how}; {done})"

    def write_setup(self, cfg: RunConfig, tokenizer: Tokenizer | Path | None, dataset: dict[str, Any],
                    prompt: PromptFormat | None = None, chat: ChatTemplate | None = None) -> None:
        """config.toml, tokenizer.json (a Tokenizer, or a file to copy), dataset.json, prompt and chat template."""
        self._check_writer()
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.toml", to_toml(cfg))
        if isinstance(tokenizer, Tokenizer):
            atomic_write_text(self.path / "tokenizer.json", tokenizer.backend.to_str(pretty=True))
        elif tokenizer is not None:
            atomic_write_bytes(self.path / "tokenizer.json", Path(tokenizer).read_bytes())
        if tokenizer is not None:  # what `tokenizer()` checks the file against (a dataset's meta has it already)
            dataset = {**dataset, "tokenizer_sha256": sha256_file(self.path / "tokenizer.json")}
        atomic_write_text(self.path / "dataset.json", json.dumps(dataset, indent=2))
        if prompt is not None:
            atomic_write_text(self.path / "prompt.json", json.dumps(dataclasses.asdict(prompt), indent=2))
        if chat is not None:
            atomic_write_text(self.path / "chat_template.json", chat.to_json())

    def begin(self, kind: str, model: LanguageModel, cfg: RunConfig, dataset: dict[str, Any], *,
              init_from: str | None = None, device: torch.device | None = None, dtype: torch.dtype | None = None,
              world_size: int = 1, parallel: str = "none", peak: Peak | None = None,
              origin: dict[str, Any] | None = None, dtype_reason: str | None = None) -> None:
        """Start a fresh metrics.jsonl with the start event, of the same keys for every kind; `peak`: one device's."""
        from lmlab.core.device import machine
        from lmlab.model.plugins import provider

        assert kind in RUN_KINDS, kind
        self._check_writer()
        self.check_new()
        self.path.mkdir(parents=True, exist_ok=True)
        self._metrics.unlink(missing_ok=True)
        self.log({
            "event": "start", "step": 0, "kind": kind, "lmlab_version": __version__,
            "model": model.describe(), "architecture": model.architecture(), "params": model.num_params(),
            "params_non_embedding": model.num_params(embeddings=False), "params_padding": model.padding_params(),
            "flops_per_token": model.flops_per_token(),
            "dataset": cfg.data.dataset or None, "tokenizer": dataset.get("tokenizer"), "init_from": init_from,
            "device": str(device) if device else None, "dtype": str(dtype).removeprefix("torch.") if dtype else None,
            "dtype_reason": dtype_reason, "world_size": world_size, "parallel": parallel,
            **peak_fields(peak, world_size),
            # what passes over the data count; a fine-tune trains on records, an import not at all
            "train_tokens": (dataset.get("train") or {}).get("tokens") if kind == "trained" else None,
            "origin": origin, "machine": machine(device),
            "plugin": None if cfg.model.kind in BUILT_IN_KINDS else provider(cfg.model.kind),
        })

    def resumed(self, step: int, checkpoint: str, device: torch.device, dtype: torch.dtype, world_size: int,
                peak: Peak | None = None, changed: dict[str, list[Any]] | None = None) -> None:
        """Log that training continues from a checkpoint, on what machine, with the peak MFU divides by, and the
        settings it changed (`changed`: {"train.batch_size": [old, new]}), in force from `step`."""
        from lmlab.core.device import machine

        self.log({"event": "resume", "step": step, "checkpoint": checkpoint, "device": str(device),
                  "dtype": str(dtype).removeprefix("torch."), "world_size": world_size, "machine": machine(device),
                  **peak_fields(peak, world_size), **({"changed": changed} if changed else {})})
        self._resume_points = None

    def log(self, event: dict[str, Any]) -> None:
        """Append one event in one write: a crash or a full disk loses at most that line, never half of it."""
        self._check_writer()
        append_whole(self._metrics, as_json(event) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume from the checkpoint of `step`, the log as it stood when that checkpoint was written: what came
        after its event (the steps past it, and a final score or an end at its own step) is dropped, so a run killed
        anywhere and resumed logs what a run never killed does."""
        self._check_writer()
        events = self.events()
        saved = [i for i, e in enumerate(events) if e.get("event") == "checkpoint" and e.get("step") == step]
        # A checkpoint with no event of its own (an imported model's first) keeps the events of its step and before.
        kept = events[:saved[-1] + 1] if saved else \
            [e for e in events if e.get("step", 0) <= step and e.get("event") != "end"]
        atomic_write_text(self._metrics, "".join(as_json(e) + "\n" for e in kept))

    def add_sample(self, text: str, checkpoint_name: str, step: int, settings: str) -> None:
        """Append a sample to samples.txt, whole, without the run lock: a run is sampled while it trains."""
        append_whole(self.path / "samples.txt", f"--- checkpoint {checkpoint_name} (step {step}), {settings}\n"
                                                f"{text}\n\n")

    def save_checkpoint(self, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                        training: dict[str, Any] | None, best: bool, keep: int,
                        whole: Callable[[], None] = lambda: None) -> Path:
        """A step folder of the weights, the optimizer and `training`; then only the newest `keep` step folders,
        best, latest and the resume points remain."""
        self._check_writer()
        cfg = to_dict(self.config())  # the settings in force: config.toml is rewritten as a resume begins
        state = {"format": STATE_FORMAT, "kind": self.kind(), "lmlab_version": __version__,
                 "model_config": cfg["model"], "settings": {section: cfg[section] for section in ("data", "train")},
                 "training": training}
        folder = ckpt.save_checkpoint(self.checkpoints, step, weights, optimizer_state, state, best, whole)
        ckpt.prune_checkpoints(self.checkpoints, keep, self.resume_points())
        return folder

    def to_prune(self, keep: int, coming: tuple[int, ...]) -> list[Path]:
        """The step folders retention deletes once checkpoints of the steps `coming` are written."""
        return ckpt.to_prune(self.checkpoints, keep, self.resume_points(), coming)

    def resume_points(self) -> set[str]:
        """The step folders the run was resumed from: retention keeps them, to compare with what came after."""
        if self._resume_points is None:
            self._resume_points = {e["checkpoint"] for e in self.events()
                                   if e.get("event") == "resume" and isinstance(e.get("checkpoint"), str)}
        return self._resume_points

    def events(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The metrics events (the first `limit` of them): `lmlab.run.events.read_events`."""
        return read_events(self._metrics, limit)

    def kept(self, section: str) -> list[dict[str, Any]]:
        """The results of a section of evaluations.json, oldest first: val-split evaluations ("results", a subset's
        with `max_tokens`), task scores ("tasks") or judgements ("judgements")."""
        return evaluations.kept(self.path, section)

    def keep(self, section: str, result: dict[str, Any]) -> None:
        """Keep a result in its section of evaluations.json in place of an older one of the same key (the same
        weights, split, subset and dtype for a val-split evaluation; `lmlab.run.evaluations.KEYS`)."""
        evaluations.keep(self.path, section, result)

    def running(self) -> bool:
        """Whether a process holds the run's lock: it is being trained, fine-tuned or imported now."""
        return self._lock.held()

    def dataset(self) -> dict[str, Any]:
        return json_object(self.path / "dataset.json")

    def tokenizer(self) -> Tokenizer:
        """The run's tokenizer, its file checked against the checksum dataset.json records (where it has one)."""
        facts, path = self.dataset(), self.path / "tokenizer.json"
        if not facts.get("tokenizer") or not path.exists():
            raise UserError(f"{self.path} has no tokenizer (tokenizer.json and its spec in dataset.json); import the "
                            "model again with `lmlab import-hf DIR --tokenizer DIR_OR_FILE --out NEW_RUN`.")
        expected = facts.get("tokenizer_sha256")
        if expected and sha256_file(path) != expected:
            source = Path(self.config().data.dataset or "-") / "tokenizer.json"
            intact = source.is_file() and sha256_file(source) == expected
            fix = f"copy it back from {source}, which is intact" if intact else "restore it from a copy of the run"
            raise UserError(f"{path} does not match the checksum {self.path}/dataset.json records for it (it was "
                            f"edited or damaged, so token ids would mean other text); {fix}.")
        return Tokenizer.load(path, facts["tokenizer"], facts.get("eot_id"))

    def prompt_format(self) -> PromptFormat | None:
        path = self.path / "prompt.json"
        if not path.exists():
            return None
        try:
            return PromptFormat(**parse_json(read_text(path)))
        except (ValueError, TypeError):  # ValueError: not UTF-8, or not JSON
            raise UserError(f"{path} is not a prompt format written by `lmlab finetune`; restore or delete it.")

    def chat_template(self) -> ChatTemplate | None:
        path = self.path / "chat_template.json"
        return ChatTemplate.from_json(path) if path.exists() else None

    def checkpoint(self, which: str = "latest") -> Path:
        """The step folder a checkpoint spec names; without a usable pointer, `latest` is the newest step folder."""
        which = checkpoint_name(which)
        if which.startswith("step_"):
            folder = self.checkpoints / which
            if not folder.is_dir():
                raise UserError(f"{self.path} has no checkpoint at step {int(which.removeprefix('step_'))}; "
                                f"{self.available_steps()}")
            return folder
        pointed = ckpt.pointer(self.checkpoints, which)
        if pointed is None and which == "latest" and self.step_folders():
            pointed = self.step_folders()[-1]
        if pointed is None:
            raise UserError(f"{self.path} has no {which} checkpoint; train it first "
                            f"(`lmlab train CONFIG --run {self.path}`).")
        return pointed

    def available_steps(self) -> str:
        """The checkpoints a run has (steps, best and latest), as the sentence that ends a refusal."""
        steps = [int(f.name.removeprefix("step_")) for f in self.step_folders()]
        if not steps:
            return f"it has no checkpoints yet; train it first (`lmlab train CONFIG --run {self.path}`)."
        named = [f"{which} {int(folder.name.removeprefix('step_'))}"
                 for which in ("best", "latest") if (folder := ckpt.pointer(self.checkpoints, which))]
        pointers = f" ({', '.join(named)})" if named else ""
        return (f"it has step{'s' * (len(steps) > 1)} {', '.join(map(str, steps))}{pointers}; pass --checkpoint with "
                "one of them, best or latest.")

    def weights_sha256(self, which: str = "best") -> str | None:
        """A checkpoint's model.safetensors sha256 from its state.json (None if missing): what evaluations key."""
        return self._state_field(which, "files", "model.safetensors")

    def trained_by(self) -> dict[str, Any] | None:
        """The [data] and [train] settings the newest checkpoint trained by (its state.json's `settings`): config.toml
        holds those of a resume that may not have got as far as a checkpoint. None where it keeps none (written before
        lmlab kept them) or cannot be read."""
        return self._state_field("latest", "settings")

    def _state_field(self, which: str, *keys: str) -> Any:
        """A field of a checkpoint's state.json (`keys` the path to it; `best` of a run never evaluated its `latest`);
        None where it is missing or cannot be read."""
        try:
            value = parse_json(read_text(self.checkpoint(self._best_or_latest(which)) / "state.json"))
            for key in keys:
                value = value[key]
            return value
        except (UserError, OSError, ValueError, KeyError, TypeError):
            return None

    def _best_or_latest(self, which: str) -> str:
        """`best`, of a run never evaluated, is its `latest`."""
        return "latest" if which == "best" and ckpt.pointer(self.checkpoints, "best") is None else which

    def step_folders(self) -> list[Path]:
        return ckpt.step_folders(self.checkpoints)

    def saved_through(self) -> int | None:
        """The newest checkpoint's step when no process writes the run (events past it a resume drops), else None."""
        folders = self.step_folders()
        return None if not folders or self.running() else int(folders[-1].name.removeprefix("step_"))

    def remove_partial_checkpoints(self) -> None:
        self._check_writer()
        ckpt.remove_partial(self.checkpoints)

    def read_checkpoint(self, folder: Path, model: torch.nn.Module, optimizer: Any = None,
                        load: Loader = ckpt.load_checkpoint) -> dict[str, Any]:
        """Load a step folder into `model` (and `optimizer`) with `load`; its state.json in the current format."""
        return _upgrade(load(folder, model, optimizer), self)

    def load(self, which: str = "best", device: str = "auto", need_tokenizer: bool = True) -> LoadedRun:
        """The run's model at a checkpoint, in eval mode, with what using it takes; a run never evaluated has no
        `best`: it loads `latest`, and says so."""
        from lmlab.core.device import configure, resolve_device
        from lmlab.core.peak import choose_dtype
        from lmlab.model import build_model
        from lmlab.model.plugins import check_forward

        which = self._best_or_latest(checkpoint_name(which))
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
        check_forward(model)  # a plugin's, with these weights: NaN logits are one sentence, not NaN text
        born = self.weights_dtype() if torch_device.type == "cuda" else None  # what a GPU without bf16 must heed
        dtype, why = choose_dtype(torch_device, cfg.train.dtype, born)
        notes = (f"note: {self.path} computes in {why}.",) if dtype != choose_dtype(torch_device, cfg.train.dtype)[0] \
            else ()
        return LoadedRun(self, self.kind(), cfg, model.eval(), tokenizer, torch_device, dtype, self.prompt_format(),
                         which, state["step"], (state.get("files") or {}).get("model.safetensors"),
                         self.chat_template(), notes)


def check_steps(paths: Sequence[Path | str], which: str) -> None:
    """Refuse, before anything is read or written, a checkpoint step one of the runs does not have."""
    if checkpoint_name(which).startswith("step_"):
        for path in paths:
            RunDir(path).checkpoint(which)


def _upgrade(state: dict[str, Any], run: RunDir) -> dict[str, Any]:
    """state.json in the current format: an older one's own top-level keys become `training`."""
    if state.get("format") == STATE_FORMAT:
        return state
    envelope = ("step", "optimizer", "files", "model_config", "lmlab_version")
    own = {k: v for k, v in state.items() if k not in envelope and k != "imported_from"}
    return {**{k: state.get(k) for k in envelope}, "format": STATE_FORMAT, "kind": run.kind(),
            "training": own or None}


@dataclass
class LoadedRun:
    """A run's model at one checkpoint, ready for inference, with what using it takes."""

    run: RunDir
    kind: str
    config: RunConfig
    model: LanguageModel
    tokenizer_or_none: Tokenizer | None  # None only when loaded without need_tokenizer (`tokenizer` is for the others)
    device: torch.device
    dtype: torch.dtype  # the autocast dtype the run's config resolves to on this device
    prompt_format: PromptFormat | None  # a fine-tuned run's; None for the others
    checkpoint: str  # best, latest or step_NNNNNN: the one loaded (latest when best was asked of a run never evaluated)
    step: int
    weights_sha256: str | None = None  # of the loaded model.safetensors: what an evaluation is of
    chat_template: ChatTemplate | None = None  # an imported instruct model's; None for the others
    notes: tuple[str, ...] = ()  # what loading it chose that a command should say (fp32 over fp16, and why)

    @property
    def tokenizer(self) -> Tokenizer:
        assert self.tokenizer_or_none is not None, "a run loaded without need_tokenizer has no tokenizer to use"
        return self.tokenizer_or_none
