"""Listing and summarising run folders for `lmlab runs`, `compare`, `scaling` and `plan`: read without trusting
them, so a half-written, old or foreign folder gets a status instead of a crash."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.analysis.scaling import unique_tokens
from lmlab.core.errors import UserError
from lmlab.core.fileio import ReadError
from lmlab.core.humanize import format_duration
from lmlab.run.rundir import RunDir


@dataclass
class RunSummary:
    """What `lmlab runs` and `lmlab compare` show about one run directory; None where it is unknown."""

    path: Path
    # finished | stopped early | stopped (SIGTERM) | running | crashed | half-written | not a run | unreadable
    status: str
    params: int | None = None  # of the real vocabulary
    padding: int = 0
    dataset: str | None = None
    tokenizer: str | None = None
    model: str | None = None  # e.g. "gpt 4L/256 rope"
    architecture: str | None = None
    shape: str | None = None
    flops_per_token: float | None = None
    device: str | None = None
    steps: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    best_val_loss: float | None = None
    best_step: int | None = None
    best_bpb: float | None = None
    final_val_loss: float | None = None  # the run's final score: its last checkpoint on the val split, or a sample
    final_stderr: float | None = None  # of it (the standard error; 0 on the whole split)
    gap: float | None = None  # val - train (eval) loss: the same number of fixed batches, eval mode, at the best eval
    split_tokens: int | None = None  # the train split's tokens (its unique tokens), of a trained run
    token_bytes: dict[str, float] = field(default_factory=dict)  # UTF-8 bytes per token of each split: bits per byte
    data_sha256: str | None = None  # of the val split: runs with the same one were scored on the same text
    kind: str | None = None
    scored_on: str | None = None  # what its val loss is of: the val split (its sha256), a fine-tune's held-out records
    text: str | None = None  # what its val split holds whatever the tokenizer (`_text`), a fine-tune's its scored_on
    # The kept whole-split `lmlab eval` of the checkpoint's weights on the run's own val split (an import, which has
    # none, on the text it was scored on last), and the newest on each text it was scored on, its own first.
    evaluation: dict[str, Any] | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    # The steps the run is measured against: a budgeted run's by its budget's newest plan (decided at its last step,
    # whatever train.max_iters says), with the budget and what it planned before the first step; else max_iters.
    planned_steps: int | None = None
    budget_seconds: float | None = None
    first_plan: int | None = None
    still_falling: bool | None = None
    predicted_val: float | None = None
    tokens_per_sec: float | None = None
    mfu: float | None = None
    checkpoint: str = "best"  # the checkpoint whose kept task and judge scores `tasks` and `judge` are
    val_from: str = "training"  # where best_val_loss is from: the run's evaluations as it trained, or `lmlab eval`
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # kept results of `eval --task`
    judge: dict[str, Any] | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)
    trains: list[dict[str, Any]] = field(default_factory=list)
    problem: str | None = None  # why an unreadable folder cannot be read, and the fix (`listed`)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def flops(self) -> float | None:
        return self.flops_per_token * self.tokens if self.flops_per_token else None

    @property
    def reached(self) -> float | None:
        """The val loss the run reached: its final score where it has one, else the least its evaluations read."""
        return self.best_val_loss if self.final_val_loss is None else self.final_val_loss

    @property
    def predicted_error(self) -> float | None:
        """How far the val `--size auto` predicted was from the val reached, as a fraction of it."""
        reached = self.reached
        return self.predicted_val / reached - 1 if self.predicted_val is not None and reached else None

    @property
    def epochs(self) -> float | None:
        return self.tokens / self.split_tokens if self.split_tokens else None

    @property
    def epoch_seconds(self) -> float | None:
        """Wall seconds per pass over the train split, evaluations included."""
        return self.elapsed / self.epochs if self.epochs and self.elapsed else None

    @property
    def unique_tokens(self) -> int:
        return unique_tokens(self.tokens, self.split_tokens)

    def bits_per_byte(self, loss: float, split: str = "val") -> float | None:
        """A loss (nats per token) of one split in bits per UTF-8 byte of its text."""
        per_token = self.token_bytes.get(split)
        return loss / math.log(2) / per_token if per_token else None

    def figures(self) -> dict[str, Any]:
        """Everything but the event lists, as plain JSON values (`lmlab runs --json`)."""
        skip = ("evals", "trains", "token_bytes")
        return {"name": self.name, **{k: str(v) if isinstance(v, Path) else v for k, v in vars(self).items()
                                      if k not in skip}, "flops": self.flops, "epochs": self.epochs,
                "unique_tokens": self.unique_tokens, "predicted_error": self.predicted_error}


def _status(run: RunDir, events: list[dict[str, Any]]) -> str:
    if not events or events[0].get("event") != "start":
        return "half-written"
    last = events[-1]
    if last.get("event") == "end":
        if last.get("stopped_by"):
            return f"stopped ({last['stopped_by']})"
        return "stopped early" if last.get("stopped_early") else "finished"
    return "running" if run.running() else "crashed"


# What a run's start event says of it, under RunSummary's names (an older run's lacks some: `_describe`).
START_FIGURES = ("params", "dataset", "tokenizer", "model", "architecture", "flops_per_token", "device", "kind")


def _describe(run: RunDir, start: dict[str, Any], summary: RunSummary) -> None:
    """The shape of the run's model; for an older run, whose start event lacks them, its architecture, padding, model
    and FLOPs per token, from its model built on no memory."""
    try:
        config = run.config().model
        summary.shape = f"{config.n_layer}L/{config.n_embd}"
        if summary.architecture is not None:  # the start event says it all: no model to build, no torch to import
            return
        import torch

        from lmlab.model import build_model

        with torch.device("meta"):  # an older run's start event: its model, built on no memory, says the rest
            model = build_model(config)
    except ReadError:  # no file to read: the run cannot be summarized
        raise
    except (UserError, AssertionError):  # a config from another version, hand-edited, or without a vocab
        return
    summary.architecture = model.architecture()
    summary.padding = model.padding_params()
    if summary.params and "params_padding" not in start:  # recorded before params left the padding out
        summary.params -= summary.padding
    summary.model = summary.model or model.describe()
    summary.flops_per_token = summary.flops_per_token or model.flops_per_token()


def summarize(run_dir: Path, checkpoint: str = "best") -> RunSummary:
    """Read a run dir without trusting it: a half-written, old or foreign dir gets a status, not a crash. Task and judge
    scores are those kept for the weights of `checkpoint`."""
    run = RunDir(run_dir)
    if not (run.path / "config.toml").exists() and not (run.path / "metrics.jsonl").exists():
        return RunSummary(run.path, "not a run")
    events = run.events()
    start = events[0] if events and events[0].get("event") == "start" else {}
    summary = RunSummary(run.path, _status(run, events), padding=start.get("params_padding", 0), checkpoint=checkpoint,
                         **{key: start[key] for key in START_FIGURES if key in start})
    summary.tasks, summary.judge, whole = kept_results(run, checkpoint)
    _describe(run, start, summary)
    _length(run, events, summary)
    _data(run, start, summary)
    # Each text's figures are shown under its name: the run's own split's are its evaluation, whatever was scored last.
    summary.evaluations = sorted({r.get("val_sha256"): r for r in whole}.values(),
                                 key=lambda r: r.get("val_sha256") != summary.data_sha256)
    own = [r for r in whole if r.get("val_sha256") == summary.data_sha256] if summary.data_sha256 else whole
    summary.evaluation = own[-1] if own else None
    # A figure that was not finite is null in metrics.jsonl (`events.as_json`): such lines draw and count nothing.
    summary.evals = [e for e in events if e.get("event") == "eval" and e["val_loss"] is not None]
    summary.trains = [e for e in events if e.get("event") == "train" and e["loss"] is not None]
    summary.tokens_per_sec = _median([e.get("tokens_per_sec") for e in summary.trains])
    sized = [e.get("predicted_val") for e in events if e.get("event") == "sizing"]
    summary.predicted_val = sized[0] if sized else None  # a number or null: the sizing event's schema
    logged = _mfus(events)
    # Above 100% the run's peak was wrong (an emulated kernel's, before lmlab checked): none of its MFU stands.
    summary.mfu = None if any(m is not None and m > 1 for m in logged) else _median(logged)
    progress = [e for e in events if "step" in e and "tokens" in e]
    if progress:
        summary.steps, summary.tokens = progress[-1]["step"], progress[-1]["tokens"]
        summary.elapsed = max(e.get("elapsed", 0.0) for e in progress)
    finals = [e for e in events if e.get("event") == "final" and isinstance(e.get("val_loss"), (int, float))]
    if finals:
        summary.final_val_loss, summary.final_stderr = finals[-1]["val_loss"], finals[-1].get("stderr")
    saved = run.saved_through()  # an evaluation past the newest checkpoint is none the run holds
    held = [e for e in summary.evals if saved is None or e["step"] <= saved]
    if held:
        best = min(held, key=lambda e: e["val_loss"])
        summary.best_val_loss, summary.best_step = best["val_loss"], best["step"]
        if best.get("train_eval_loss") is not None:
            summary.gap = best["val_loss"] - best["train_eval_loss"]
        summary.still_falling = summary.evals[-1] is best
        summary.best_bpb = summary.bits_per_byte(best["val_loss"])
    elif (evaluation := summary.evaluation) is not None:
        # A run that evaluated nothing as it trained (an import) compares on its checkpoint's kept `lmlab eval` of a
        # whole val split.
        summary.best_val_loss, summary.best_step = evaluation["loss"], evaluation.get("step")
        summary.best_bpb = evaluation.get("bits_per_byte")
        summary.scored_on = evaluation.get("val_sha256") or summary.scored_on
        summary.val_from = "lmlab eval"
    return summary


def _length(run: RunDir, events: list[dict[str, Any]], summary: RunSummary) -> None:
    """The steps the run is measured against and its budget (`RunSummary.planned_steps`), from its `budget` events."""
    try:
        train = run.config().train
    except UserError:
        return
    plans = [e["max_iters"] for e in events if e.get("event") == "budget" and isinstance(e.get("max_iters"), int)]
    summary.planned_steps = plans[-1] if train.budget_seconds and plans else train.max_iters
    if train.budget_seconds and plans:
        summary.budget_seconds, summary.first_plan = train.budget_seconds, plans[0]


def steps_of(s: RunSummary) -> str:
    """The steps a run trained of those it is measured against: `937 of 1,000`; a budgeted run's, of its budget's
    plan: `937 of 937 in a 70 s budget (864 planned before its first step)`."""
    if s.planned_steps is None:
        return f"{s.steps:,}"
    if not s.budget_seconds:
        return f"{s.steps:,} of {s.planned_steps:,}"
    first = f" ({s.first_plan:,} planned before its first step)" if s.first_plan != s.planned_steps else ""
    return f"{s.steps:,} of {s.planned_steps:,} in a {format_duration(s.budget_seconds)} budget{first}"


def listed(run_dir: Path) -> RunSummary:
    """`summarize` for a listing of folders: one that cannot be read (a file of it is no file, or unreadable) is a
    row of status "unreadable" whose `problem` says why, so one bad folder does not end the listing of the others."""
    try:
        return summarize(run_dir)
    except UserError as err:
        return RunSummary(Path(run_dir), "unreadable", problem=str(err))


Kept = tuple[dict[str, dict[str, Any]], dict[str, Any] | None, list[dict[str, Any]]]


def kept_results(run: RunDir, checkpoint: str) -> Kept:
    """What a run keeps for the weights of one checkpoint: per task the result over the most items (the newest of
    those), the newest judgement, and its whole-split val evaluations (`lmlab eval`) of every text, oldest first."""
    weights = run.weights_sha256(checkpoint)
    if not weights:
        return {}, None, []
    kept = [r for r in run.kept("tasks") if r.get("weights_sha256") == weights
            and isinstance(r.get("items"), int) and isinstance(r.get("task"), str)]
    # sorted is stable: of results over as many items, the newest comes last and stays
    tasks = {r["task"]: r for r in sorted(kept, key=lambda r: r["items"])}
    judged = [j for j in run.kept("judgements") if j.get("weights_sha256") == weights]
    whole = [r for r in run.kept("results") if r.get("weights_sha256") == weights
             and r.get("max_tokens") is None and isinstance(r.get("perplexity"), float)]
    return tasks, judged[-1] if judged else None, whole


def _data(run: RunDir, start: dict[str, Any], summary: RunSummary) -> None:
    """The train split's tokens, bytes per token of each split and the val split's checksum, from the dataset's facts;
    and the text the val loss is of (a fine-tune's: its held-out records)."""
    meta = run.dataset()
    splits = {split: facts for split in ("train", "val") if isinstance(facts := meta.get(split), dict)}
    recorded = start.get("train_tokens")
    older = (splits.get("train") or {}).get("tokens") if start and run.kind() == "trained" else None
    summary.split_tokens = recorded if isinstance(recorded, int) and recorded > 0 else older
    for split, facts in splits.items():
        if facts.get("tokens") and facts.get("bytes"):
            summary.token_bytes[split] = facts["bytes"] / facts["tokens"]
    summary.data_sha256 = (splits.get("val") or {}).get("sha256")
    origin = start.get("origin") or {}  # an object or null: the start event's schema
    summary.scored_on = (f"held-out records {origin.get('data_sha256')}" if summary.kind == "fine-tuned" else
                         summary.data_sha256 or summary.dataset)
    summary.text = summary.scored_on if summary.kind == "fine-tuned" else _text(meta)


def _text(meta: dict[str, Any]) -> str | None:
    """What a dataset's val split holds, the same under any tokenizer: its corpus, normalisation and split rule, and the
    tokenizer where the split was sized in tokens or cut to rows (other text under another); None: not recorded."""
    if not meta.get("input_sha256"):
        return None
    split = meta["split"] if isinstance(meta.get("split"), dict) else {}
    by_tokens = split.get("val_tokens") or meta.get("rows")
    return json.dumps([meta["input_sha256"], meta.get("normalize"), *(split.get(key) for key in (
        "rule", "val_fraction", "cut_at_char", "val_documents")), meta.get("tokenizer") if by_tokens else None])


def _mfus(events: list[dict[str, Any]]) -> list[float | None]:
    """The MFU of each train line logged against a quiet peak: a run from before lmlab gave none against a busy one
    logged it, reading high (the peak in force is its start's, then its newest resume's)."""
    quiet, logged = True, []
    for e in events:
        if e.get("event") in ("start", "resume"):
            quiet = e.get("peak_quiet") is not False
        elif e.get("event") == "train" and e.get("loss") is not None and quiet:
            logged.append(e.get("mfu"))
    return logged


def _median(values: list[float | None]) -> float | None:
    """The median of the known values: typical of a run, unmoved by a slow first interval or an eval's pause."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def find_runs(root: Path) -> list[Path]:
    """Every directory under root that looks like a run, plus the direct children that do not (to list them)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; pass the folder that holds your runs (default: runs).")
    runs = {p.parent for p in root.rglob("config.toml")} | {p.parent for p in root.rglob("metrics.jsonl")}
    runs |= {p for p in root.iterdir() if p.is_dir() and not any(r.is_relative_to(p) for r in runs)}
    return sorted(runs)
