"""The val loss by a token's position in its window: what a longer context buys a run scored in windows of its
block size (as its final score is), since a window's first tokens are guessed with almost no context.

    python benchmarks/position_loss.py RUN [RUN ...] [--checkpoint best] [--windows N]

For each run, its checkpoint scores the val split in windows of its block size (all of them, or `--windows` of
them spread evenly: the windows its final score reads), in the autocast dtype of its config, and prints the mean
loss at positions 0, 1, 2 and 3, over bands of later positions, and over the whole window: the gap between the last
band and the whole is what the window's start costs the score.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table

import lmlab
from lmlab.commands.common import console
from lmlab.core.device import autocast
from lmlab.data.shards import open_tokens, read_meta
from lmlab.evals.evaluate import split_windows, spread


def bands(block_size: int) -> list[tuple[int, int]]:
    """Positions 0, 1, 2, 3, then bands doubling from 4 (4-7, 8-15, ...) up to the block's end."""
    edges, start = [(p, p + 1) for p in range(min(4, block_size))], 4
    while start < block_size:
        edges.append((start, min(2 * start, block_size)))
        start *= 2
    return edges


@torch.no_grad()
def position_losses(run: lmlab.Run, checkpoint: str, windows: int | None) -> torch.Tensor:
    """The mean loss at each position of the block over the val split's windows (`windows` of them, spread)."""
    loaded = run.load(checkpoint, "cpu")
    model, T = loaded.model, loaded.model.config.block_size
    dataset = loaded.config.data.dataset
    tokens = open_tokens(dataset, "val", read_meta(dataset)["dtype"])
    total_windows = split_windows(tokens, T)
    chosen = spread(total_windows, windows or total_windows)
    total = torch.zeros(T, dtype=torch.float64)
    for first in range(0, len(chosen), 32):
        batch = torch.from_numpy(np.stack([tokens[w * T:w * T + T + 1] for w in chosen[first:first + 32]])
                                 .astype(np.int64))
        with autocast(loaded.device, loaded.dtype):
            logits = model(batch[:, :-1])[0]
        loss = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")
        total += loss.sum(0).double()
    return total / len(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders")
    parser.add_argument("--checkpoint", default="best", help="which checkpoint of each run (default: best)")
    parser.add_argument("--windows", type=int, help="val windows scored, spread evenly (default: all)")
    args = parser.parse_args()
    for path in args.runs:
        losses = position_losses(lmlab.Run(path), args.checkpoint, args.windows)
        T = len(losses)
        console.print(f"{path} ({args.checkpoint} checkpoint): val loss by position in its {T}-token windows")
        table = Table()
        table.add_column("positions", justify="right")
        table.add_column("mean loss", justify="right")
        for start, end in bands(T):
            table.add_row(str(start) if end == start + 1 else f"{start}-{end - 1}", f"{losses[start:end].mean():.4f}")
        table.add_row("all", f"{losses.mean():.4f}")
        console.print(table)


if __name__ == "__main__":
    main()
