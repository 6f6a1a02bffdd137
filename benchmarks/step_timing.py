"""How long a step timing must run: each size of a preset's family timed as `--size auto` times it
(lmlab.train.timing.time_config: a warm-up step, an evaluation's batch, then steps for TIMED_SECONDS, their median
the step), at each of --seconds in turns, --rounds times, so that a change in the machine's load weighs on all alike.

    python benchmarks/step_timing.py [--preset configs/shakespeare-char-modern-cpu.toml] [--depths 1,2,3,4]
        [--seconds 1.0,0.4] [--rounds 5]

Prints, per depth and timed seconds, the median of the timings' steps, their spread over the rounds ((max - min) /
median: what the size's choice and the budget's first plan are left to) and what a timing costs a first start
(seconds, the mean). Nothing is kept in the machine cache. The preset's dataset need not be prepared: the timing
steps on random tokens, at the char vocabulary of 65.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from rich.table import Table

from lmlab.commands.common import console
from lmlab.core import cache
from lmlab.core.config_toml import load_config
from lmlab.core.machine import Machine
from lmlab.core.progress import ItemProgress
from lmlab.experiments.family import Family, fit_path, read_fit
from lmlab.train import timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="configs/shakespeare-char-modern-cpu.toml")
    parser.add_argument("--depths", default="1,2,3,4")
    parser.add_argument("--seconds", default="1.0,0.4", help="TIMED_SECONDS to compare, in turns")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    depths, seconds = [int(d) for d in args.depths.split(",")], [float(s) for s in args.seconds.split(",")]
    cfg = load_config(args.preset)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 65))
    family, fit = Family.of(cfg, args.preset), read_fit(fit_path(args.preset))
    machine = Machine.of("cpu")
    cache.keep = lambda *_: None  # every timing measured, none read back
    steps: dict[tuple[float, int], list[float]] = {}
    costs: dict[tuple[float, int], list[float]] = {}
    progress = ItemProgress(console, args.rounds * len(seconds) * len(depths))
    for round_ in range(args.rounds):
        for timed in seconds:
            timing.TIMED_SECONDS = timed
            for depth in depths:
                progress.start(f"round {round_ + 1}, {timed:g} s, depth {depth}")
                got = timing.time_config(family.config(depth, fit), machine)
                steps.setdefault((timed, depth), []).append(got.step)
                costs.setdefault((timed, depth), []).append(got.cost)
    table = Table(title=f"step timings of {args.preset}'s sizes, {args.rounds} rounds, {machine.dtype}")
    for column in ("depth", "timed s", "step ms (median)", "spread", "timing's cost s"):
        table.add_column(column, justify="right")
    for depth in depths:
        for timed in seconds:
            got = steps[timed, depth]
            middle = statistics.median(got)
            table.add_row(str(depth), f"{timed:g}", f"{1000 * middle:.1f}", f"{(max(got) - min(got)) / middle:.1%}",
                          f"{statistics.mean(costs[timed, depth]):.2f}")
    console.print(table)
    for timed in seconds:
        cost = sum(statistics.mean(costs[timed, depth]) for depth in depths)
        console.print(f"{timed:g} s: the sizes' timings cost {cost:.2f} s a first start")


if __name__ == "__main__":
    main()
