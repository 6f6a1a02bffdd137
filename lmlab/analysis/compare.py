"""Runs compared: each one's figures beside the first's (`comparison`, the rows `compare`, `sweep` and the report
read), and whether their losses per token compare at all (`unfair`): a tokenizer or a text of their own."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmlab.analysis.runs import RunSummary
from lmlab.analysis.scaling import chinchilla_percent


def comparison(runs: list[RunSummary]) -> list[dict[str, Any]]:
    """Each run's figures beside the first run's (ratios to it): numbers for `compare`, `sweep` and the report. When the
    tokenizers or the data differ (`unfair`), the change against the first run is in bits per byte."""
    base, by_bytes = runs[0], bool(unfair(runs))
    return [{
        "run": s.name, "path": str(s.path), "status": s.status, "architecture": s.architecture, "model": s.model,
        "tokenizer": s.tokenizer, "params": s.params, "params_ratio": _ratio(s.params, base.params),
        **_training(s, base), "best_val_loss": s.best_val_loss, "val_from": s.val_from,
        "best_val_loss_change": _change(s.best_val_loss, base.best_val_loss), "bits_per_byte": s.best_bpb,
        "bits_per_byte_change": _change(s.best_bpb, base.best_bpb),
        "by_bytes": by_bytes, "params_padding": s.padding,
        "gap": s.gap, "still_falling": s.still_falling, "checkpoint": s.checkpoint, "tasks": s.tasks,
        "judge": s.judge, "evaluation": s.evaluation, "evaluations": s.evaluations, "predicted_val": s.predicted_val,
        "predicted_error": s.predicted_error,
        "final_val_loss": s.final_val_loss, "final_stderr": s.final_stderr,
    } for s in runs]


def _training(s: RunSummary, base: RunSummary) -> dict[str, Any]:
    """What a run's training here cost and saw, beside the first run's; None for an import, whose training happened
    elsewhere."""
    params, trained = s.params or 0, base.kind != "imported"
    scratch = params and s.kind != "fine-tuned"  # Chinchilla's share is of training from scratch: a fine-tune's base's
    figures = {"tokens": s.tokens, "tokens_ratio": _ratio(s.tokens, base.tokens) if trained else None,
               "flops": s.flops, "flops_ratio": _ratio(s.flops, base.flops) if trained else None,
               "elapsed": s.elapsed, "elapsed_ratio": _ratio(s.elapsed, base.elapsed) if trained else None,
               "epochs": s.epochs, "epoch_seconds": s.epoch_seconds, "unique_tokens": s.unique_tokens,
               "tokens_per_param": _ratio(s.tokens, params),
               "chinchilla_percent": chinchilla_percent(s.unique_tokens, params) if scratch else None,
               "chinchilla_seen_percent": chinchilla_percent(s.tokens, params) if scratch else None}
    return figures if s.kind != "imported" else dict.fromkeys(figures)


def told_apart(a: float, a_stderr: float, b: float, b_stderr: float) -> bool:
    """Whether two independent estimates differ by more than twice the standard error of their difference: what a
    "best" must pass to be told from noise (`sweep`'s best setting, the report's ranking)."""
    return abs(a - b) > 2 * math.hypot(a_stderr, b_stderr)


def unfair(runs: list[RunSummary]) -> str | None:
    """Why the runs' losses per token do not compare, every reason with the runs on each side, or None: different
    tokenizers (a token is another unit), different text (`text_sides`)."""
    tokenizers = _sides(runs, lambda s: str(s.tokenizer), lambda s: str(s.tokenizer))
    reasons = [f"their tokenizers differ ({_listed(tokenizers)})"] if len(tokenizers) > 1 else []
    texts = text_sides(runs)
    if len(texts) > 1:
        reasons.append(f"they were scored on different text ({_listed(texts)})")
    unit = "is per a different unit" if reasons and len(texts) < 2 else "of one is not the other's"
    return f"{' and '.join(reasons)}: a loss per token {unit}" if reasons else None


def text_sides(runs: list[RunSummary]) -> list[tuple[str, list[str]]]:
    """The runs by the text their val losses are of, each side (what it is, its runs' names) in order: one side
    where they share it. Under one tokenizer, by the val split's checksum; across tokenizers, whose splits' tokens
    differ whatever the text, by what each split holds (`RunSummary.text`), among the runs whose dataset says."""
    if len({str(s.tokenizer) for s in runs}) == 1:
        return _sides([s for s in runs if s.scored_on], lambda s: s.scored_on, _scored_on)
    return _sides([s for s in runs if s.text], lambda s: s.text, _scored_on)


def _scored_on(s: RunSummary) -> str:
    if s.kind == "fine-tuned":
        return "held-out instruction records, not a val split"
    dataset = (s.evaluation or {}).get("dataset") if s.val_from == "lmlab eval" else s.dataset
    return f"the val split of {Path(dataset).name}" if dataset else "a val split"


def _sides(runs: list[RunSummary], key: Callable[[RunSummary], Any],
           label: Callable[[RunSummary], str]) -> list[tuple[str, list[str]]]:
    """The runs grouped by `key`, in order, each group as its first run's `label` and its runs' names; two groups
    of one label told apart by the checksum the first run's val loss is of."""
    groups: dict[Any, tuple[RunSummary, list[str]]] = {}
    for s in runs:
        groups.setdefault(key(s), (s, []))[1].append(s.name)
    labels = [label(first) for first, _ in groups.values()]
    return [(text if labels.count(text) == 1 else f"{text}, sha256 {str(first.scored_on).split()[-1][:8]}", names)
            for text, (first, names) in zip(labels, groups.values())]


def _listed(sides: list[tuple[str, list[str]]]) -> str:
    return "; ".join(f"{', '.join(names)}: {what}" for what, names in sides)


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _change(value: float | None, base: float | None) -> float | None:
    """`value` against `base` as a fraction of it (-0.1: 10% less); None where either is unknown."""
    ratio = _ratio(value, base)
    return None if ratio is None else ratio - 1
