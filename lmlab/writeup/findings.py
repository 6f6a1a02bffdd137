"""What a report says in words: one run described in a paragraph, or several read against each other (which
settings differ, which run won and by how much, at what cost, whether the ranking can still change)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.analysis.compare import text_sides, told_apart
from lmlab.analysis.runs import RunSummary
from lmlab.analysis.scaling import chinchilla_percent, repeat_warning
from lmlab.core.config import RunConfig
from lmlab.core.config_toml import to_dict
from lmlab.core.humanize import count, format_duration
from lmlab.run.rundir import RunDir
from lmlab.writeup.document import code, plain

NOT_RECORDED = "not recorded"  # a fact an older run's folder does not hold
MAX_KEYS = 10  # differing settings named one by one
GAP = 0.05  # a val - train loss gap worth a word (nats per token)
ESTIMATE = " (fixed-batch estimate at the evals)"  # a ranking's measure where no full-split evaluation is shared


@dataclass
class RunFacts:
    """What a report says about one run, read once: its folder, summary, events, config, the full-split
    evaluation of its best checkpoint and a sample (each None with the reason when it could not be had, in Markdown)."""

    run: RunDir
    summary: RunSummary
    events: list[dict[str, Any]]
    config: RunConfig
    evaluation: dict[str, Any] | None = None
    not_evaluated: str = ""
    sample: str | None = None
    not_sampled: str = ""
    checkpoint: str = "best"  # the one evaluated and sampled
    fell_back: bool = False  # best was asked for and latest used: a run never evaluated during training has no best

    @property
    def which(self) -> str:
        """The checkpoint evaluated and sampled, as a reader should read it."""
        if self.fell_back:
            return "latest checkpoint (never evaluated, so no best)"
        name = self.checkpoint
        return f"step {int(name[5:]):,} checkpoint" if name.startswith("step_") else f"{name} checkpoint"
    cells: list[Any] = field(default_factory=list)  # with report --prompts: the run's cells of the prompt grid

    @property
    def eval_batches(self) -> int:
        """The batches a split its evaluations scored: a budget's plan fits them to it, else train.eval_iters."""
        planned = [e["eval_iters"] for e in self.events if e["event"] == "budget" and e.get("eval_iters")]
        return planned[0] if planned else self.config.train.eval_iters

    @property
    def name(self) -> str:
        return self.run.path.resolve().name  # "." names the folder it is

    @property
    def start(self) -> dict[str, Any]:
        return self.events[0] if self.events and self.events[0].get("event") == "start" else {}

    @property
    def machine(self) -> dict[str, Any]:
        return self.start.get("machine") or {}

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]


def describe_run(f: RunFacts) -> str:
    """One paragraph: what was trained (or imported, or fine-tuned from what), how long and on what, how good it is,
    and whether it was still learning."""
    s, m = f.summary, f.machine  # what the run's files say, plain text
    where = plain(f.start.get("device") or "an unrecorded device")
    if m:
        where += plain(f" ({m.get('gpu') or m.get('cpu')}, {m.get('cpu_cores')} cores)")
    origin = f.start.get("origin") or {}
    model = (f"{code(f.name)} is a {plain(s.architecture or 'language')} model ({plain(s.model)}) of "
             f"{count(s.params)} parameters")
    if s.kind == "imported":
        text = (f"{model}, imported from {code(origin['source']) if origin.get('source') else 'an unrecorded folder'} "
                f"({plain(origin.get('format') or 'format not recorded')}): lmlab did not train it.")
    else:
        how = (f"fine-tuned from {code(Path(origin['base']).name)} {s.steps:,} steps on {count(s.tokens)} tokens of "
               f"{plain(origin.get('train_records', '?'))} instruction records" if s.kind == "fine-tuned" and
               origin.get("base") else f"trained {s.steps:,} steps on {count(s.tokens)} tokens ({data_share(s)})")
        budget = f" of a {format_duration(s.budget_seconds)} budget" if s.budget_seconds else ""
        text = (f"{model}, {how} in {format_duration(s.elapsed)}{budget} on {where}, "
                f"{plain(f.start.get('dtype') or 'dtype not recorded')}; status: {plain(s.status)}.")
    if f.evaluation:
        e = f.evaluation
        text += (f" On the full val split its {f.which} (step {e['step']:,}) scores a loss of {e['loss']:.4f} "
                 f"(perplexity {e['perplexity']:.2f}, {e['bits_per_byte']:.3f} bits per byte).")
    if s.still_falling is not None:
        text += (" It was still improving at its last evaluation: more training would lower the loss." if
                 s.still_falling else f" Its best evaluation was at step {s.best_step:,}, before the end.")
    return text


def data_share(s: RunSummary) -> str:
    """Passes over the data and the share of Chinchilla-optimal in unique tokens, with the tokens seen beside."""
    if not s.params:
        return "size not recorded"
    unique = f"{chinchilla_percent(s.unique_tokens, s.params):.1f}% of Chinchilla-optimal"
    if s.epochs is None:
        return unique
    return (f"{s.epochs:.2f} passes over the {s.split_tokens:,}-token train split; {unique} in unique tokens, "
            f"{chinchilla_percent(s.tokens, s.params):.1f}% in tokens seen")


def reading(facts: list[RunFacts]) -> list[str]:
    """Sentences comparing several runs, most important first."""
    found = [_differences(facts)]
    ranked, measure = _ranking(facts)
    if len(ranked) >= 2:
        found += [_winner(ranked, measure), _cost(ranked[0][0].summary, ranked[1][0].summary)]
    elif measure:  # why they are not ranked
        found.append(measure)
    found += _caveats(facts)
    return found


def run_caveats(f: RunFacts) -> list[str]:
    """What a reader of one run's figures must know, one verdict on its val loss from the evidence and its noise:
    still falling, stopped improving (past twice the noise of its eval batches) or flat within that noise, with
    its val loss's gap to its train loss said in the same verdict (overfitting only once it stopped improving);
    and that it repeated its data past what repeats are worth."""
    found = [_settled(f)] if f.summary.still_falling is False else _gap(f)
    warning = repeat_warning(f.summary.epochs, f.summary.split_tokens, code(f.name))
    return found + ([warning[0].upper() + warning[1:]] if warning else [])


# The sections a run of a kind holds and never chose: an import was never trained here; a fine-tune trained on records,
# not its base's [data], by a [train] that follows from its [finetune] (lmlab.train.finetune).
UNUSED = {"imported": ("data", "train"), "fine-tuned": ("data", "train")}


def settings(facts: list[RunFacts]) -> tuple[list[str], list[dict[str, str]]]:
    """The config settings the runs differ in, sorted, and each run's settings as its config file writes them (true,
    not True), but a section its kind never chose (UNUSED): a setting differs where two runs or more have it, so one
    a kind of run has not (a base run's [finetune]) is no difference."""
    flat = [{f"{section}.{key}": str(value).lower() if isinstance(value, bool) else str(value)
             for section, keys in to_dict(f.config).items() for key, value in keys.items()
             if section not in UNUSED.get(f.run.kind(), ())} for f in facts]
    return sorted({k for d in flat for k in d if len({other[k] for other in flat if k in other}) > 1}), flat


def _differences(facts: list[RunFacts]) -> str:
    """What an import or a fine-tune is, then the config settings the runs differ in (`settings`)."""
    keys, flat = settings(facts)
    kin = "".join(f"{_kin(f)}. " for f in facts if f.run.kind() in UNUSED)
    if not keys:
        return f"{kin}The runs share every config setting they have in common" + \
            ("." if kin else ": they differ only in how they ran.")
    shown = "; ".join(f"{code(k)} {' / '.join(plain(d[k]) if k in d else '-' for d in flat)}" for k in keys[:MAX_KEYS])
    more = f"; and {len(keys) - MAX_KEYS} more" if len(keys) > MAX_KEYS else ""
    return f"{kin}The runs differ in {len(keys)} setting{'s' * (len(keys) > 1)} (in run order): {shown}{more}."


def _kin(f: RunFacts) -> str:
    """Why a run's [data] and [train] are not compared: an import's were never used, a fine-tune's are not its own."""
    if f.run.kind() == "imported":
        return f"{code(f.name)} is imported: its [data] and [train] are left out, never used"
    base = (f.start.get("origin") or {}).get("base")
    return (f"{code(f.name)} is a fine-tune of {code(Path(base).name) if base else 'a base run'}: its [train] follows "
            "from its [finetune] and it trained on records, not [data], so neither is compared")


def _ranking(facts: list[RunFacts]) -> tuple[list[tuple[RunFacts, float]], str]:
    """The runs best first by the fairest measure they share: the full-split evaluation when every run has one
    on the same split, else the fixed-batch estimate; bits per byte when the tokenizers differ. None, and why,
    when the estimates are of different text (a fine-tune's held-out records against its base's val split)."""
    evaluations = [f.evaluation for f in facts if f.evaluation]
    same_split = len(evaluations) == len(facts) and len({e["val_sha256"] for e in evaluations}) == 1
    sides = text_sides([f.summary for f in facts])
    if not same_split and len(sides) > 1:
        of = "; ".join(f"{', '.join(code(name) for name in names)}: {plain(what)}" for what, names in sides)
        return [], (f"The runs are not ranked: their val losses are of different text ({of}), and they have no "
                    "evaluation on one val split in common.")
    by_bytes = len({f.run.dataset().get("tokenizer") for f in facts}) > 1
    if same_split:
        value = {f.name: e["bits_per_byte" if by_bytes else "loss"] for f, e in zip(facts, evaluations)}
    else:
        value = {f.name: f.summary.best_bpb if by_bytes else f.summary.best_val_loss for f in facts}
    measure = ("bits per byte" if by_bytes else "val loss") + (" on the full val split" if same_split else ESTIMATE)
    ranked = sorted(((f, value[f.name]) for f in facts if value[f.name] is not None), key=lambda p: p[1])
    return ranked, measure


def _winner(ranked: list[tuple[RunFacts, float]], measure: str) -> str:
    (best, low), (second, next_low) = ranked[:2]
    text = (f"{code(best.name)} has the lowest {measure}: {low:.4f}, {next_low - low:.4f} "
            f"({100 * (1 - low / next_low):.1f}%) below {code(second.name)} ({next_low:.4f})")
    rest = ", ".join(f"{code(f.name)} {v:.4f}" for f, v in ranked[2:])
    return text + (f"; then {rest}." if rest else ".") + (_tied(ranked) if measure.endswith(ESTIMATE) else "")


def _tied(ranked: list[tuple[RunFacts, float]]) -> str:
    """A sentence where the two lowest fixed-batch estimates are within the noise of their eval batches (each run's
    `eval_noise`, in the unit ranked by) of each other; else none."""
    noises = []
    for f, value in ranked[:2]:
        noise = eval_noise(f.summary.trains, f.config.train.log_interval, f.eval_batches)
        if noise is None or not f.summary.best_val_loss:
            return ""
        noises.append(noise * value / f.summary.best_val_loss)  # in bits per byte too, where it ranks by them
    (_, low), (_, next_low) = ranked[:2]
    if told_apart(low, noises[0], next_low, noises[1]):
        return ""
    return (f" That is within the noise of their eval batches (±{noises[0]:.4f} and ±{noises[1]:.4f}): the two are not "
            "told apart; more eval batches (train.eval_iters) or the full val split (`lmlab eval`) would tell.")


def _cost(best: RunSummary, next_: RunSummary) -> str:
    def times(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}×" if a and b else "-"

    return (f"{code(best.name)} used {times(best.params, next_.params)} the parameters, "
            f"{times(best.tokens, next_.tokens)} the tokens, {times(best.flops, next_.flops)} the compute and "
            f"{times(best.elapsed, next_.elapsed)} the wall time of {code(next_.name)}.")


def eval_noise(trains: list[dict[str, Any]], log_interval: int, eval_iters: int) -> float | None:
    """The standard error of an evaluation's val estimate (a mean over eval_iters batches): the spread of one
    batch's loss, read from the train lines (each the mean of log_interval steps; successive ones differ by twice
    their variance, the trend being small between two), over the square root of eval_iters. None with under 8
    lines."""
    losses = [e["loss"] for e in trains[-64:] if isinstance(e.get("loss"), float) and math.isfinite(e["loss"])]
    if len(losses) < 8:
        return None
    steps = [b - a for a, b in zip(losses, losses[1:])]
    per_batch = statistics.pstdev(steps) * math.sqrt(log_interval / 2)
    return per_batch / math.sqrt(eval_iters)


def _settled(f: RunFacts) -> str:
    """A run whose best evaluation is not its last: stopped improving, when its evaluations since rose by more than
    twice the noise of their batches (and overfitting, with a val loss well above its train loss); else flat within
    that noise, which says nothing about more training, nor whether a gap between the splits is overfitting."""
    s, train = f.summary, f.config.train
    best = f"best at step {s.best_step:,} of {s.steps:,}"
    noise = eval_noise(s.trains, train.log_interval, f.eval_batches)
    rise = s.evals[-1]["val_loss"] - s.best_val_loss
    gap = s.gap if s.gap is not None and s.gap > GAP else None
    if noise is not None and rise > 2 * noise:
        overfits = f"; its val loss was {gap:.3f} above its train loss at its best: it overfits" if gap else ""
        return (f"{code(f.name)} stopped improving before its end ({best}; its last evaluation is {rise:.3f} higher, "
                f"over twice the ±{noise:.3f} noise of its {f.eval_batches} eval batches){overfits}: more of the "
                "same training will not lower its loss.")
    within = f"within the ±{noise:.3f} noise of" if noise is not None else "within what can be told from"
    split = (f"; its val loss is {gap:.3f} above its train loss at its best, a gap between the splits that is not "
             "told to be overfitting either" if gap else "")
    return (f"{code(f.name)}'s val loss has been flat since its best evaluation ({best}; the later ones are {within} "
            f"its {f.eval_batches} eval batches): whether more training lowers it is not told{split}; more eval "
            "batches (train.eval_iters) would tell.")


def _gap(f: RunFacts) -> list[str]:
    """A val loss well above the train loss (GAP or more) of a run still falling, or of one whose evaluations
    cannot tell: a gap between the splits, not (yet) overfitting."""
    gap = f.summary.gap
    if gap is None or gap <= GAP:
        return []
    trend = "but still falling" if f.summary.still_falling else "with too few evaluations to tell a trend"
    return [f"{code(f.name)}'s val loss is {gap:.3f} above its train loss (the same number of batches) at its best "
            f"evaluation, {trend}: a gap between the splits, not yet overfitting."]


def _caveats(facts: list[RunFacts]) -> list[str]:
    """Why the ranking may not hold: runs still improving, overfitting, short training, different data."""
    found = []
    falling = [code(f.name) for f in facts if f.summary.still_falling]
    if falling:
        found.append(f"Still improving at the last evaluation: {', '.join(falling)}; longer training can change the "
                     "ranking.")
    for f in facts:
        found += run_caveats(f)
    # Of the runs lmlab trained from scratch: an import's tokens are not its training, a fine-tune's not its base's.
    shares = [chinchilla_percent(f.summary.unique_tokens, f.summary.params) for f in facts
              if f.summary.params and f.summary.kind in (None, "trained")]
    if shares and max(shares) < 50:
        every = "Every run trained here" if len(shares) < len(facts) else "Every run"
        found.append(f"{every} saw under half its Chinchilla-optimal tokens in unique tokens (at most "
                     f"{max(shares):.1f}%): this compares short trainings, not what the models can reach.")
    if len({f.config.data.dataset for f in facts if "data" not in UNUSED.get(f.run.kind(), ())}) > 1:
        found.append("The runs trained on different datasets: their losses measure different text.")
    return found
