"""What a refit's miniseries trains (`Series`), and its plan for a time budget (`Planner`): what the command line
leaves open (depths, lengths, the LR search) chosen from each depth's step time, timed here, so that the runs fit the
budget and measure L(N, D) where the fit will be used. The fit is meant for run budgets (`--for`; by default the
longest of LADDER whose whole plan fits), and a budget of B seconds trains a depth for about B / step steps:

- depths: from 1 up to the first that trains fewer than PAST_BEST tokens per parameter in the longest budget meant
  (the size past the best, where `--size auto`'s climb stops), at least 2; with `--for`, fewer where the budget is
  short, the deepest left out first;
- lengths: powers of 2 from what the deepest trains in the shortest budget meant (its LR search's length, every
  depth's) up to what depth 1 trains in the longest, each depth up to the first length at or past what it trains
  there, depth 1 over 4 lengths at least and each other depth 2 (so 2 depths are 6 runs, and each depth's longest
  is held out from a fit through the other 5, the least a fit takes);
- the LR search: the widest of LR_SEARCHES that fits beside those depths, at the shortest length, for every depth."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from lmlab.core.errors import UserError
from lmlab.experiments.family import MAX_DEPTH
from lmlab.train.budget import Costs

MIN_STEPS = 8  # a run of fewer steps is too short to say anything of its size
UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}
# The run budgets a fit may be meant for, in seconds: 5 s to a day, as a person names them.
LADDER = (5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 450, 600, 900, 1200, 1800, 2700, 3600, 5400, 7200, 10800,
          14400, 21600, 43200, 86400)
# Tokens per parameter below which a size is past the best for a budget: by both shipped fits, at budgets of 15 s to 30
# minutes, the best size trains 3.3 to 73 and the one above it 0.5 to 11 (docs/reference/training.md, "A refit").
PAST_BEST = 1.0
# Multiples of the preset's LR each depth tries, the widest first, centred where both shipped fits found the best: over
# 0.5, 1 and 2, five of their nine depths were best at 2, the val still falling there (a parabola's vertex needs the
# best bracketed), and the rest between 1 and 1.75.
LR_SEARCHES = ((1.0, 2.0, 4.0), (1.0, 2.0))


def parse_tokens(text: str) -> tuple[int, ...]:
    """`64k,256k,1M`: token counts (k and M are 2**10 and 2**20)."""
    found = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", item[:40])
        value = float(match[1]) * UNITS[match[2].lower()] if match else 0
        if not 1 <= value <= 2**40:
            raise UserError(f"--tokens {text[:60]!r}: each length is a token count such as 64k, 256k or 1M, "
                            "comma-separated.")
        found.append(int(value))
    return tuple(sorted(found))


def tokens_text(tokens: int) -> str:
    """A length as --tokens takes it: 512k, 4M, or the count."""
    for unit, size in (("M", 2**20), ("k", 2**10)):
        if tokens % size == 0:
            return f"{tokens // size}{unit}"
    return str(tokens)


@dataclass(frozen=True)
class Series:
    """What a miniseries trains: `depths` of the family, each at `tokens` up to its `reach` (the longest it trains; a
    depth not in it: every length) but those past `max_flops` (6·N·D; 0: none), its LR searched at the shortest
    length over `lr_factors` of the preset's; `meant`, the run budgets (seconds) its lengths were planned for. What is
    empty is planned to a budget (`Planner`)."""

    depths: tuple[int, ...] = ()
    tokens: tuple[int, ...] = ()
    lr_factors: tuple[float, ...] = ()
    max_flops: float = 0.0
    meant: tuple[float, ...] = ()
    reach: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for option, values, what in (("--depths", self.depths, "size"), ("--tokens", self.tokens, "length")):
            twice = next((v for v in values if values.count(v) > 1), None)
            if twice is not None:
                raise UserError(f"{option} names {twice} twice, and each is one {what} of the fit; name each once.")
        if any(not 0 < f <= 100 for f in self.lr_factors):
            raise UserError("--lr-factors are multiples of the preset's LR, above 0 and at most 100, e.g. 0.5,1,2.")
        if any(not 1 <= d <= MAX_DEPTH for d in self.depths):
            raise UserError(f"--depths are depths of the preset's family, from 1 to {MAX_DEPTH}, e.g. 1,2,3,4.")

    @property
    def given(self) -> bool:
        """Whether the grid is whole, nothing left to plan."""
        return bool(self.depths and self.tokens and self.lr_factors)

    def within(self, depth: int, params: int, tokens: int) -> bool:
        return tokens <= self.reach.get(depth, tokens) and (not self.max_flops or 6 * params * tokens <= self.max_flops)

    @property
    def searched(self) -> int:
        return self.tokens[0]


def _down(tokens: float) -> int:
    return 1 << (max(1, int(tokens)).bit_length() - 1)  # the power of 2 at or below


def _up(tokens: float) -> int:
    return 1 << (max(1, math.ceil(tokens)) - 1).bit_length()  # the power of 2 at or above


Priced = tuple[Series, float]  # a series and the seconds of the budget it takes, what is gone already included


class Planner:
    """The plan of a miniseries for `budget` seconds counted from `started` (a time.perf_counter() reading): what
    `given` leaves open chosen from each depth's costs (`timed(depth)`, once, as the plan reaches the depth), a
    series priced by `seconds(series, costs)` (what its runs left take) and checked by `refusal(series)` (why no fit
    could be made of it, or None). `params(depth)` is the fit's N of a depth, `tokens_per_step` a step's tokens."""

    def __init__(self, given: Series, budget: float, started: float, tokens_per_step: int,
                 params: Callable[[int], int], timed: Callable[[int], Costs],
                 seconds: Callable[[Series, dict[int, Costs]], float], refusal: Callable[[Series], str | None]):
        self.given, self.budget, self.started, self.tokens_per_step = given, budget, started, tokens_per_step
        self.params, self.timed, self.seconds, self.refusal = params, timed, seconds, refusal
        self.costs: dict[int, Costs] = {}
        self.left_out: tuple[int, ...] = ()  # the depths the budget left out of the plan chosen

    def spent(self) -> float:
        return time.perf_counter() - self.started

    def cost(self, depth: int) -> Costs:
        """The depth's costs, timed now the first time they are asked."""
        if depth not in self.costs:
            self.costs[depth] = self.timed(depth)
        return self.costs[depth]

    def trains(self, depth: int, seconds: float) -> float:
        """The tokens `seconds` of steps train `depth` at its step time."""
        return seconds / self.cost(depth).step * self.tokens_per_step

    def series(self, depths: tuple[int, ...], meant: tuple[float, ...], factors: tuple[float, ...]) -> Series:
        """`depths` with `factors`, at the given lengths or at lengths planned for `meant` (the rule above)."""
        if self.given.tokens:
            return replace(self.given, depths=depths, lr_factors=factors, meant=meant)
        shortest = max(_up(MIN_STEPS * self.tokens_per_step), _down(self.trains(depths[-1], min(meant))))
        reach = {d: max(_up(self.trains(d, max(meant))), (8 if d == depths[0] else 2) * shortest) for d in depths}
        lengths = tuple(shortest << k for k in range((max(reach.values()) // shortest).bit_length()))
        return replace(self.given, depths=depths, tokens=lengths, lr_factors=factors, meant=meant, reach=reach)

    def climb(self, meant: tuple[float, ...]) -> tuple[Priced | None, Priced | None, bool]:
        """For `meant`: the most depths from the smallest up whose plan fits the budget, with the widest LR search
        that fits beside them; the cheapest plan a fit can be made of (what a refusal names); and whether the climb
        kept every depth `meant` asks for (the given depths, or up to the first past the best)."""
        kept: Priced | None = None
        cheapest: Priced | None = None
        depths: tuple[int, ...] = ()
        self.left_out = ()
        order = self.given.depths or tuple(range(1, MAX_DEPTH + 1))
        for depth in order:
            if not self.given.depths and len(depths) >= 2 and \
                    self.trains(depths[-1], max(meant)) < PAST_BEST * self.params(depths[-1]):
                return kept, cheapest, True
            depths += (depth,)
            self.cost(depth)
            priced = [(s, self.spent() + self.seconds(s, self.costs))
                      for s in (self.series(depths, meant, f) for f in self.searches())]
            viable = [(s, needed) for s, needed in priced if self.refusal(s) is None]
            cheapest = cheapest or (viable[-1] if viable else None)
            fits = next((p for p in viable if p[1] <= self.budget), None)
            if fits is None and viable:  # a series no fit could be made of takes the next depth, however long
                self.left_out = order[len(depths) - 1:] if self.given.depths else (depth,)
                return kept, cheapest, False
            kept = fits or kept
        return kept, cheapest, True

    def searches(self) -> tuple[tuple[float, ...], ...]:
        return (self.given.lr_factors,) if self.given.lr_factors else LR_SEARCHES

    def plan(self) -> tuple[Priced, bool]:
        """The series chosen and the seconds it takes, and whether it fits the budget. With the budgets meant given,
        or nothing left to plan by them, the climb for them; else the longest budget of LADDER whose climb keeps every
        depth, or failing all, the shortest's. Where none fits, the cheapest plan of the last tried, to refuse."""
        planned_by_meant = not (self.given.depths and self.given.tokens)
        ladder = [(float(b),) for b in reversed(LADDER) if 2 * b <= self.budget] or [(float(LADDER[0]),)]
        for meant in ladder if planned_by_meant and not self.given.meant else [self.given.meant]:
            kept, cheapest, whole = self.climb(meant)
            if kept and (whole or meant == ladder[-1] or self.given.meant or not planned_by_meant):
                return kept, True
        if cheapest is None:
            order = self.given.depths or tuple(range(1, MAX_DEPTH + 1))
            raise UserError(self.refusal(self.series(order[:2], meant, self.searches()[-1])) or
                            "no miniseries a fit could be made of fits the budget.")
        return cheapest, False
