"""Loss curves as PNG files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

from lmlab.runs import read_metrics  # noqa: E402


def plot_losses(run_dir: Path) -> Path:
    """Draw train (per log interval) and val (per eval) loss against step into RUN/loss.png."""
    events = read_metrics(run_dir)
    train = [(e["step"], e["loss"]) for e in events if e["event"] == "train"]
    evals = [(e["step"], e["val_loss"]) for e in events if e["event"] == "eval"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train", color="tab:blue", alpha=0.6, linewidth=1)
    if evals:
        ax.plot(*zip(*evals), label="val", color="tab:orange", marker="o", markersize=3)
        best_step, best = min(evals, key=lambda p: p[1])
        ax.annotate(f"best val {best:.4f}", (best_step, best), textcoords="offset points", xytext=(-60, 12))
    ax.set_title(f"{Path(run_dir).name}: loss")
    ax.set_xlabel("step (optimizer updates)")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(run_dir) / "loss.png"
    tmp = path.with_name(".loss.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
