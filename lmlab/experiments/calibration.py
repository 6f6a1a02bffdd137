"""A fit carried over to a preset or dataset it was not measured on: `--size auto` on a user's own data. A fit is a
recipe's (the model's options, the optimizer, the schedule, the context, the micro-batch: `recipe`) measured on one
dataset. What belongs to the recipe is kept: the exponents of its L(N, D) and its LR rule. What belongs to the data is
had here: its tokens per byte (meta.json says, so a token of one tokenizer counts as the text it stands for in the
other's), and its loss floor and scale, measured on two short runs of the family's smallest size on the data
(`calibrate`): L(N, D) = floor + scale × the fit's L(N, D × the ratio of bytes per token). A scale and a floor move
every size's prediction alike, so the size chosen follows from the recipe's exponents and the data's bytes per token;
the measured pair makes the predicted val the data's own. The pair is kept in the machine cache, so the next run of
the recipe on the same data measures nothing.

The fit a preset is sized by (`prior`) is its own (beside it) where it has one, else the fit of its recipe among those
beside the presets of its folder and lmlab's own (configs/), else the nearest one's, said with how the recipes
differ and the refit that would measure its own."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.analysis.scaling import LossSurface
from lmlab.core import cache
from lmlab.core.config import RunConfig
from lmlab.core.config_toml import load_config, to_dict
from lmlab.core.errors import UserError
from lmlab.core.jsontext import json_sha256
from lmlab.core.machine import MEASURED, READ_BACK, Machine
from lmlab.data.loader import BatchLoader
from lmlab.data.shards import open_tokens
from lmlab.experiments.family import Family, SizeFit, fit_path, preset_sha256, read_fit
from lmlab.experiments.plan import shape_of
from lmlab.model import build_model
from lmlab.train.estimate import estimate_loss
from lmlab.train.schedule import lr_at
from lmlab.train.step import TrainStep
from lmlab.train.timing import recall_config, time_config

# What a config sets besides its recipe: the data, the shape a size sets, the length and cadence of a run, and how
# and where it computes, none of which moves the loss a size reaches after so many tokens.
NOT_RECIPE = frozenset({
    "data.dataset", "model.n_layer", "model.n_head", "model.n_embd", "model.n_kv_head", "model.vocab_size",
    "train.micro_batch", "train.max_iters", "train.budget_seconds", "train.eval_interval", "train.eval_iters",
    "train.log_interval", "train.checkpoint_interval", "train.keep_checkpoints", "train.patience", "train.seed",
    "train.spike_zscore", "train.spike_patience", "train.rollback_lr_factor", "train.dtype", "train.compile",
    "train.attention", "train.threads", "train.tracker", "train.tracker_project", "train.tracker_run",
    "train.parallel", "train.collective_timeout"})
SHIPPED = Path(__file__).resolve().parents[2] / "configs"  # lmlab's own presets and their fits, in its checkout
CALIBRATION_SHARE = 0.06  # of the budget, the runs that measure the data's floor and scale may take at most
LEAST_STEPS = 10  # a calibration's shorter run: fewer steps learn too little for its val to say the data's floor
EVAL_BATCHES = 8  # a calibration run's val is the mean of so many batches (a run's evaluation takes eval_iters)
SCALES = (0.2, 5.0)  # a measured scale outside these is not the data's but the runs' noise: the floor alone is kept


def recipe(cfg: RunConfig) -> dict[str, Any]:
    """What a fit of `cfg`'s family holds for: every setting but NOT_RECIPE's, and the family's width per layer and
    head size (its shape's proportions)."""
    m = cfg.model
    kept = {f"{section}.{key}": value for section, fields in to_dict(cfg).items() for key, value in fields.items()
            if f"{section}.{key}" not in NOT_RECIPE}
    return {**kept, "family.aspect": round(m.n_embd / m.n_layer, 3), "family.head": m.n_embd // m.n_head}


@dataclass(frozen=True)
class Prior:
    """The fit a preset is sized by: its file, the fit, whether it is the preset's own, and how its recipe differs
    from the preset's ("model.mlp gelu, not swiglu"), none where it is the same."""

    path: Path
    fit: SizeFit
    own: bool
    differs: tuple[str, ...]


def prior(preset: Path, cfg: RunConfig) -> Prior | None:
    """The preset's own fit; else the fit of its recipe, or the nearest, among the fits beside its folder's presets
    and lmlab's own whose preset is as it was fitted; None where there is none."""
    own = read_fit(preset)
    if own is not None:
        return Prior(fit_path(preset), own, True, ())
    found = []
    for path in sorted({*preset.parent.glob("*.fit.json"), *SHIPPED.glob("*.fit.json")}):
        preset_of = path.with_name(path.name.removesuffix(".fit.json") + ".toml")
        try:
            fit = read_fit(preset_of)
            theirs = load_config(preset_of)
        except UserError:  # a damaged fit or preset of another: not a prior
            continue
        if fit is not None and fit.preset_sha256 == preset_sha256(preset_of):
            found.append(Prior(path, fit, False, _differences(recipe(theirs), recipe(cfg))))
    return min(found, key=lambda p: len(p.differs), default=None)


def _differences(theirs: dict[str, Any], ours: dict[str, Any]) -> tuple[str, ...]:
    return tuple(f"{key} {theirs.get(key)!r}, not {ours.get(key)!r}" for key in sorted({*theirs, *ours})
                 if theirs.get(key) != ours.get(key))


@dataclass(frozen=True)
class Calibration:
    """The data's floor and scale against a fit (L = floor + scale × the fit's L at the tokens × `ratio`), the
    points they were measured from (depth, params, tokens, val, the fit's own prediction there), the seconds that
    took, and whether they were measured now or read back."""

    floor: float = 0.0
    scale: float = 1.0
    ratio: float = 1.0
    points: tuple[dict[str, Any], ...] = ()
    seconds: float = 0.0
    how: str = MEASURED

    def applied(self, fit: SizeFit) -> SizeFit:
        """`fit` as it predicts this data: its surface at these tokens, scaled and lifted."""
        s = fit.surface
        surface = LossSurface(self.floor + self.scale * s.E, self.scale * s.A, s.alpha,
                              self.scale * s.B * self.ratio ** -s.beta, s.beta, self.scale * s.rmse)
        return dataclasses.replace(fit, surface=surface)

    def spread(self, fit: SizeFit) -> float:
        """How sure a prediction is: the fit's largest error on the runs it held out (or its rmse), in this data's
        scale."""
        held = [abs(h["predicted"] - h["val"]) for h in fit.held_out]
        return self.scale * max([fit.surface.rmse, *held])

    def record(self) -> dict[str, Any]:
        """As the `sizing` event keeps it."""
        return {"floor": round(self.floor, 4), "scale": round(self.scale, 4), "ratio": round(self.ratio, 4),
                "seconds": round(self.seconds, 2), "how": self.how, "points": list(self.points)}

    def says(self, dataset: str) -> str:
        """What was measured, where and in how many seconds."""
        if not self.points:
            return ""
        runs = ", ".join(f"{p['tokens']:,}" for p in self.points)
        how = f"in {self.seconds:.1f} s" if self.how == MEASURED else f"{READ_BACK} (measured in {self.seconds:.1f} s)"
        return (f"its floor and scale measured on {dataset} {how}: {len(self.points)} runs of depth "
                f"{self.points[0]['depth']} of {runs} tokens, {self.floor:+.3f} + {self.scale:.3f} × the fit")


def bytes_per_token(meta: dict[str, Any]) -> float:
    """The text a token of a dataset stands for, in bytes: of its val split, as its final score counts them."""
    return meta["val"]["bytes"] / meta["val"]["tokens"]


def calibrate(family: Family, fit: SizeFit, machine: Machine, meta: dict[str, Any], seconds: float,
              measure: bool = True) -> Calibration:
    """The data's floor and scale against `fit`, read back from the machine cache where this recipe was calibrated
    on this data, else (where it may `measure`) measured now on two runs of the family's smallest size (a third of
    the steps `seconds` holds at its timed step, then twice as many) and kept; else its bytes per token alone."""
    ratio = bytes_per_token(meta) / fit.dataset["bytes_per_token"] if fit.dataset.get("bytes_per_token") else 1.0
    key = {"fit": json_sha256(fit.to_json()), "recipe": recipe(family.preset), "train": meta["train"]["sha256"],
           "val": meta["val"]["sha256"]}
    kept = cache.recall("calibration", key, _not_calibration)
    if kept is not None:
        return Calibration(**{**kept, "points": tuple(kept["points"])}, how=READ_BACK)
    if not measure:
        return Calibration(ratio=ratio)
    cfg = family.config(1, fit)  # the smallest size, only where it is measured
    model, timed = shape_of(cfg), time.perf_counter()
    timing = recall_config(cfg, model, machine) or time_config(cfg, machine)  # the climb's first, read back there
    began = time.perf_counter()
    steps = int((seconds - (began - timed) - 2 * EVAL_BATCHES * timing.eval_batch / 2) / timing.step) // 3
    if steps < LEAST_STEPS:
        return Calibration(ratio=ratio)
    point = functools.partial(_point, cfg, machine, meta, model.multiplied_params())
    points = [point(steps)]
    # The second twice as long where what is left holds it at the first's pace, else none (one run says no scale)
    longer = min(2 * steps, int((seconds - (time.perf_counter() - timed)) / ((time.perf_counter() - began) / steps)))
    if longer < 1.5 * steps:
        return Calibration(ratio=ratio)
    points.append(point(longer))
    for p in points:
        p["predicted"] = fit.surface.predict(p["params"], p["tokens"] * ratio)
    floor, scale = floor_and_scale(tuple(points))
    floor = max(floor, -scale * fit.surface.E)  # no loss below 0 at any size and length
    found = Calibration(floor, scale, ratio, tuple(points), time.perf_counter() - began)
    cache.keep("calibration", key, {"floor": floor, "scale": scale, "ratio": ratio, "points": points,
                                    "seconds": round(found.seconds, 2)})
    return found


def _not_calibration(kept: Any) -> str | None:
    """What in a kept calibration (lmlab.core.cache.recall) no measurement here gives; None where nothing."""
    figures = {"floor": (-100.0, 100.0), "scale": SCALES, "ratio": (1e-3, 1e3), "seconds": (0.0, 1e6)}
    if not isinstance(kept, dict) or set(kept) != {*figures, "points"} or not isinstance(kept["points"], list):
        return "a calibration that is not one"
    if len(kept["points"]) != 2:  # an older lmlab's of one run: its floor mostly the untrained model's loss
        return f"a calibration of {len(kept['points'])} runs, not two"
    wrong = [name for name, (low, high) in figures.items()
             if type(kept[name]) not in (int, float) or not low <= kept[name] <= high]
    return f"a calibration whose {wrong[0]} is {kept[wrong[0]]!r}" if wrong else None


def floor_and_scale(points: tuple[dict[str, Any], ...]) -> tuple[float, float]:
    """The line through two points' vals against the fit's predictions there; where it is too steep or too flat to be
    the data's (the runs' noise on two close predictions), the fit's scale and the mean shift."""
    xs, ys = [p["predicted"] for p in points], [p["val"] for p in points]
    scale = (ys[1] - ys[0]) / (xs[1] - xs[0]) if abs(xs[1] - xs[0]) > 1e-6 else math.nan
    if not SCALES[0] <= scale <= SCALES[1]:
        scale = 1.0
    return (sum(ys) - scale * sum(xs)) / len(points), scale


def _point(cfg: RunConfig, machine: Machine, meta: dict[str, Any], params: int, steps: int) -> dict[str, Any]:
    return {"depth": 1, "params": params, "tokens": steps * cfg.tokens_per_step,
            "val": _trained(cfg, machine, meta, steps)}


def _trained(cfg: RunConfig, machine: Machine, meta: dict[str, Any], steps: int) -> float:
    """The val loss (over EVAL_BATCHES batches) of `cfg`'s model after `steps` steps on the dataset, its LR by its
    schedule over those steps: a run's figure, without the run's folder."""
    tc = dataclasses.replace(cfg.train, max_iters=steps, warmup_iters=min(cfg.train.warmup_iters, steps // 5))
    dataset, T = Path(cfg.data.dataset), cfg.model.block_size
    train, val = (open_tokens(dataset, split, meta["dtype"], verify=False, meta=meta) for split in ("train", "val"))
    step = TrainStep(build_model(cfg.model).to(machine.device), tc, machine)
    batches = BatchLoader(train, T, tc.batch_size, tc.seed, "train", machine.device)
    for n in range(steps):
        step([batches.next() for _ in range(tc.grad_accum_steps)], tc.grad_accum_steps, lr_at(n, tc))
    step.model.eval()
    return estimate_loss(step.scoring, val, T, tc.batch_size, EVAL_BATCHES, tc.seed + 2, machine.device,
                         machine.dtype).loss
