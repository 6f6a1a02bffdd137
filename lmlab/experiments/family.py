"""A preset as a family of sizes along one dial, its depth (as nanochat's depth dial sets its models): depth d has d
layers of d × the preset's width per layer, its heads of the preset's head size, its micro-batch and context, and
its LR from the preset's by the family's LR rule; and the fit kept beside the preset (`PRESET.fit.json`, written by
`lmlab scaling PRESET --refit`): the val loss a size reaches after so many tokens, L(N, D), and the LR rule, both
measured on a miniseries of the family's runs on the preset's dataset.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.analysis.scaling import LossSurface, effective_tokens
from lmlab.core.config import RunConfig
from lmlab.core.errors import UserError
from lmlab.core.fileio import read_text
from lmlab.core.growth import Growth
from lmlab.core.jsontext import json_sha256, parse_json
from lmlab.core.plugin_kinds import BUILT_IN_KINDS

MAX_DEPTH = 48  # the deepest member a family has (48 layers of 64 per layer: 3072 wide)
FIT_FORMAT = 1
# A size whose parameters are this many times beyond the fit's largest run is not predicted: a power law carried
# far past its points says little.
EXTRAPOLATION = 4.0
GPT_GROWTH = Growth(depth="n_layer", width="n_embd")  # a GPT's depth and width (its heads follow its width)


@dataclass(frozen=True)
class Family:
    """The sizes of a preset: `config(depth)` is depth layers of `aspect` × depth wide (in whole heads of `head`; a
    plugin's, its declared depth and width), the preset's other settings, its LR times its fit's LR rule's `factor`
    of the width."""

    preset: RunConfig
    aspect: float  # width per layer: the preset's width / its depth
    head: int  # the width of a head, the preset's; 0: a plugin's model, whose depth and width alone a size sets
    kv_ratio: int  # query heads per key/value head (grouped-query attention), the preset's
    growth: Growth = GPT_GROWTH  # the settings that are its depth and width: a GPT's, or those a plugin declares

    @classmethod
    def of(cls, cfg: RunConfig, where: str) -> Family:
        """The family of a preset (`where` names it): a GPT whose width and heads follow from its depth, or a plugin's
        model whose depth and width are the settings it declares (lmlab.core.growth.Growth)."""
        m = cfg.model
        if m.kind not in BUILT_IN_KINDS:
            from lmlab.model.plugins import declared_growth  # imports torch, as the plugin does

            growth = declared_growth(m, where)
            return cls(cfg, growth.setting(m, "width") / growth.setting(m, "depth"), 0, 1, growth)
        if m.kind != "gpt":
            raise UserError(f"{where}: a size is a depth of a model's family, its width following from the depth "
                            f"(what a fit's L(N, D) and LR rule are measured along), and model.kind is {m.kind!r}: a "
                            "recurrent model's width is its own setting; use a gpt preset (or a plugin's that declares "
                            "its growth), or set its shape by hand.")
        if m.head_dim or m.mlp_hidden:
            raise UserError(f"{where} sets model.head_dim or model.mlp_hidden, which do not scale with depth; leave "
                            "them 0 (n_embd / n_head, and the MLP's own width) to size it by depth.")
        return cls(cfg, m.n_embd / m.n_layer, m.n_embd // m.n_head, m.n_head // m.kv_heads)

    @property
    def preset_width(self) -> int:
        """The preset's width, which a fit's LR rule scales the LR from."""
        return int(self.growth.setting(self.preset.model, "width"))

    def width(self, depth: int) -> int:
        unit = max(1, self.head * self.kv_ratio)  # whole groups of heads
        return max(unit, round(depth * self.aspect / unit) * unit)

    def config(self, depth: int, fit: SizeFit | None = None) -> RunConfig:
        """Depth `depth` of the family: its shape, and its LR by the fit's rule (without a fit, the preset's)."""
        width, preset = self.width(depth), self.preset.model
        if self.head:  # a GPT's heads follow its width
            heads = width // self.head
            model = dataclasses.replace(preset, n_layer=depth, n_embd=width, n_head=heads,
                                        n_kv_head=heads // self.kv_ratio if preset.n_kv_head else 0)
        else:
            model = self.growth.grown(preset, depth, width)
        factor = fit.lr.factor(width, self.preset_width) if fit else 1.0
        tc = self.preset.train
        train = dataclasses.replace(tc, learning_rate=_lr(tc.learning_rate * factor),
                                    min_lr=_lr(tc.min_lr * factor))
        return dataclasses.replace(self.preset, model=model, train=train)

    def describe(self, depth: int) -> str:
        """E.g. `3 layers of 192, 3 heads` (a plugin's: `3 layers of 192`)."""
        heads = self.width(depth) // self.head if self.head else 0
        return f"{depth} layer{'s' * (depth > 1)} of {self.width(depth)}" + \
            (f", {heads} head{'s' * (heads > 1)}" if heads else "")


def _lr(value: float) -> float:
    return float(f"{min(1.0, value):.3g}")  # as a person writes it in a preset; train.learning_rate is at most 1


@dataclass(frozen=True)
class LrRule:
    """The LR of a width: the preset's LR × scale × (the preset's width / width)^exponent, from the best LR of each
    depth's small search."""

    scale: float = 1.0
    exponent: float = 0.0

    def factor(self, width: int, preset_width: int) -> float:
        return self.scale * (preset_width / width) ** self.exponent


@dataclass
class SizeFit:
    """A preset's fit (`PRESET.fit.json`): the loss surface and LR rule, the runs they came from, and where and how
    they were measured."""

    preset: str  # the preset's path as it was fitted
    preset_sha256: str  # of the preset's settings: a preset whose settings changed since is fitted again
    dataset: dict[str, Any]  # `path`, `tokenizer`, `train_sha256` of the dataset the miniseries trained on
    surface: LossSurface
    lr: LrRule
    # `depth`, `params`, `tokens`, `learning_rate`, `val`, `run` of each point; `val` is the run's final score (the
    # figure a sized run ends on: its last checkpoint on the val split), not its evaluations' estimates, which read
    # the same windows each time
    runs: list[dict[str, Any]]
    lr_search: list[dict[str, Any]] = field(default_factory=list)  # `depth`, `width`, `factors`, `vals`, `best`
    measured: dict[str, Any] = field(default_factory=dict)  # `when`, `machine`, `seconds`, `load`, `command`
    held_out: list[dict[str, Any]] = field(default_factory=list)  # `depth`, `params`, `tokens`, `val`, `predicted`

    @property
    def largest(self) -> int:
        return max(r["params"] for r in self.runs)

    def beyond(self, tokens: int) -> str:
        """Where `tokens` lies outside the lengths the miniseries trained, what a prediction there is ("" inside):
        a power law carried past its points, on a curve that bends most where runs are shortest."""
        shortest, longest = min(r["tokens"] for r in self.runs), max(r["tokens"] for r in self.runs)
        if tokens < shortest:
            return f"extrapolated: {tokens:,} tokens, fewer than the fit's shortest run ({shortest:,})"
        if tokens > longest:
            return f"extrapolated: {tokens:,} tokens, more than the fit's longest run ({longest:,})"
        return ""

    def predict(self, params: int, tokens: float, unique: int | None = None) -> float | None:
        """The val loss L(N, D), D the new tokens that `tokens` drawn from a train split of `unique` are worth
        (lmlab.analysis.scaling.effective_tokens: the fit's runs pass over their split at most a few times, where a
        repeat is worth nearly a new token, so its surface reads D as new tokens); None beyond EXTRAPOLATION × the
        largest size fitted."""
        if params > EXTRAPOLATION * self.largest or tokens <= 0:
            return None
        return self.surface.predict(params, effective_tokens(tokens, unique))

    def to_json(self) -> dict[str, Any]:
        return {"format": FIT_FORMAT, **{k: v for k, v in dataclasses.asdict(self).items()}}


def fit_path(preset: Path) -> Path:
    """Where a preset's fit is kept: beside it, `NAME.fit.json` for `NAME.toml`."""
    return Path(preset).with_suffix(".fit.json")


def refit_command(preset: Path | str) -> str:
    """The command refusals name to make a preset's fit: a refit planned to 10 minutes (lmlab.experiments.series), a
    wait a person takes at once, its plan said before it trains."""
    return f"lmlab scaling {preset} --refit --budget 10m"


def preset_sha256(preset: Path) -> str:
    """The sha256 of what `preset` sets (its TOML parsed, keys sorted): a comment or layout edit keeps its fit."""
    settings = tomllib.loads(read_text(preset))
    return json_sha256(settings)


# Each figure of a fit file and the range a fit can make (low, high, whether low itself is allowed), checked when
# it is read: an edited or damaged value is refused before it overflows (an LR exponent of 1e6) or predicts nonsense
# (alpha -1 predicted val 827,699). Exponents are fitted in (0, 1.55] (lmlab.analysis.scaling.EXPONENTS), E, A and B
# by non-negative least squares; a loss, even E, is a few nats per token.
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "surface.E": (0.0, 100.0, True), "surface.A": (0.0, 1e12, True), "surface.alpha": (0.0, 3.0, False),
    "surface.B": (0.0, 1e12, True), "surface.beta": (0.0, 3.0, False), "surface.rmse": (0.0, 100.0, True),
    "lr.scale": (0.0, 1e3, False), "lr.exponent": (-4.0, 4.0, True),
    "runs[].depth": (1, MAX_DEPTH, True), "runs[].params": (0.0, 1e13, False), "runs[].tokens": (0.0, 1e15, False),
    "runs[].val": (0.0, 100.0, False), "lr_search[].depth": (1, MAX_DEPTH, True), "lr_search[].best": (0.0, 1e3, False),
    "held_out[].depth": (1, MAX_DEPTH, True), "held_out[].val": (0.0, 100.0, False),
    "held_out[].predicted": (0.0, 100.0, False),
}
FIT_FILE_TYPES = {"preset": str, "preset_sha256": str, "dataset": dict, "runs": list, "lr_search": list,
                  "measured": dict, "held_out": list}  # what each other part of a fit file is
MEASURED = {"when": str, "machine": dict, "seconds": float, "refit_seconds": float, "load": dict, "command": str}
_KIND_NAMES = {str: "a string", dict: "an object", list: "a list", float: "a number"}


def _wrong_kind(raw: dict[str, Any]) -> str | None:
    """The part of a fit file (or of its `measured`, which `lmlab scaling` shows) not of its kind, or None."""
    def of(value: Any, kind: type) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else \
            isinstance(value, kind)

    given = raw.get("measured")
    measured: dict[str, Any] = given if isinstance(given, dict) else {}
    wrong: list[tuple[str, type]] = [(k, t) for k, t in FIT_FILE_TYPES.items() if k in raw and not of(raw[k], t)]
    wrong += [(f"measured.{k}", t) for k, t in MEASURED.items() if measured.get(k) is not None
              and not of(measured[k], t)]
    return f"its {wrong[0][0]} is not {_KIND_NAMES[wrong[0][1]]}" if wrong else None


def read_fit(preset: Path) -> SizeFit | None:
    """The fit kept beside `preset`, or None where there is none; one that cannot be read, or holds a figure out of
    its range (BOUNDS), is refused in one sentence naming the field."""
    path = fit_path(preset)
    if not path.exists():
        return None
    again = f"fit it again with `{refit_command(preset)}`"
    try:
        raw = parse_json(read_text(path))
        if raw.pop("format", None) != FIT_FORMAT:
            raise ValueError(f"format is not {FIT_FORMAT}")
        kind = _wrong_kind(raw)
        if kind or not raw.get("runs"):
            raise ValueError(kind or "it holds no runs")
        fit = SizeFit(**{**raw, "surface": LossSurface(**raw["surface"]), "lr": LrRule(**raw["lr"])})
        wrong = next(filter(None, (_out_of_range(fit, name) for name in BOUNDS)), None)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise UserError(f"{path} is not a fit lmlab can read ({err}); {again}.")
    if not wrong and not all(math.isfinite(fit.surface.predict(r["params"], r["tokens"])) for r in fit.runs):
        wrong = "its surface does not predict its own runs"
    if wrong:
        raise UserError(f"{path}: {wrong}; {again}.")
    return fit


def _out_of_range(fit: SizeFit, name: str) -> str | None:
    """What is wrong with the figure `name` of BOUNDS in `fit` (each run's, for `runs[].`), or None."""
    low, high, low_ok = BOUNDS[name]
    part, key = name.split(".")
    if part.endswith("[]"):
        items = getattr(fit, part[:-2])
        if not all(isinstance(item, dict) for item in items):
            return f"{part[:-2]} holds an entry that is not an object"
        named = [(f"{part[:-2]}[{i}].{key}", item.get(key)) for i, item in enumerate(items)]
    else:
        named = [(name, getattr(getattr(fit, part), key))]
    for field_name, value in named:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or not (low <= value <= high) or (value == low and not low_ok):
            shown = f"{value:g}" if number else repr(value)[:40]
            span = f"from {low:g} to {high:g}" if low_ok else f"above {low:g} and at most {high:g}"
            return f"{field_name} is {shown}, where a fit's is a number {span}"
    return None
