"""The training loop's parts on their own: the spike guard, the micro-batch split across ranks, checkpoint pruning,
the saved state of each part and the trial of a compiled step on a CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmlab.core.errors import UserError
from lmlab.data.loader import BatchLoader
from lmlab.run.checkpoint import pointer, prune_checkpoints, save_checkpoint, step_folders
from lmlab.train.distributed import Parallel
from lmlab.train.guard import SpikeGuard
from lmlab.train.state import Mean, Progress


def warmed_guard(**kw) -> SpikeGuard:
    """A guard past its warmup and minimum samples, having seen losses around 2.0 and norms around 1.0."""
    guard = SpikeGuard(zscore=6.0, patience=3, warmup=5, min_samples=20, **kw)
    rng = np.random.default_rng(0)
    for _ in range(60):
        assert guard.judge(2.0 + 0.01 * rng.standard_normal(), 1.0 + 0.01 * rng.standard_normal()) == "ok"
    return guard


def test_the_guard_skips_non_finite_steps_flags_spikes_and_rolls_back_after_patience():
    guard = warmed_guard(lr_factor=0.5)
    assert guard.judge(float("nan"), 1.0) == "skip" and guard.judge(2.0, float("inf")) == "skip"
    assert guard.judge(2.0, 1.0) == "ok" and guard.bad_in_row == 0  # a good step ends the streak
    assert guard.judge(5.0, 1.0) == "spike"  # loss far above its mean
    assert guard.judge(2.0, 9.0) == "spike"  # grad norm far above its mean
    assert guard.lr_scale == 1.0
    assert guard.judge(5.0, 9.0) == "rollback" and guard.lr_scale == 0.5 and guard.bad_in_row == 0
    for _ in range(3):
        verdict = guard.judge(5.0, 1.0)
    assert verdict == "rollback" and guard.lr_scale == 0.25


def test_the_guard_learns_only_from_good_steps_and_not_during_warmup():
    guard = SpikeGuard(zscore=6.0, patience=0, warmup=5, min_samples=3)
    for _ in range(5):
        assert guard.judge(100.0, 100.0) == "ok"  # early steps: neither counted nor flagged
    assert guard.loss.count == 0
    for _ in range(10):
        guard.judge(2.0, 1.0)
    before = guard.state_dict()
    assert guard.judge(50.0, 1.0) == "spike" and guard.state_dict()["loss"] == before["loss"]
    assert guard.judge(50.0, 1.0) == "spike"  # patience 0 never rolls back, however long the streak


def test_a_restored_guard_judges_as_the_original_would():
    guard, copy = warmed_guard(), SpikeGuard(zscore=6.0, patience=3, warmup=5, min_samples=20)
    guard.judge(5.0, 1.0)
    copy.load_state_dict(guard.state_dict())
    for loss, norm in ((2.0, 1.0), (5.0, 1.0), (5.0, 1.0), (2.01, 0.99)):
        assert copy.judge(loss, norm) == guard.judge(loss, norm)
    assert copy.state_dict() == guard.state_dict()


def test_means_and_progress_save_and_restore_in_place():
    mean = Mean()
    for value in (1.0, 2.0, 6.0):
        mean.add(value)
    copy = Mean()
    copy.load_state_dict(mean.state_dict())
    assert copy.pop_mean() == mean.pop_mean() == 3.0 and mean.pop_mean() == 0.0  # popping resets
    progress = Progress(step=7, tokens=70, best_val_loss=1.5)
    alias = progress
    progress.load_state_dict(Progress(step=3).state_dict())
    assert alias.step == 3 and alias.best_val_loss == math.inf  # the same object, not a stale copy


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_each_step_into_disjoint_shares_and_their_loaders_stay_together(world):
    """Every rank draws the whole global batch (so all loaders stay at one position) and keeps its own slice;
    together the ranks see exactly what one process sees, in the same order."""
    def draw(parallel: Parallel) -> tuple[list[list[int]], dict]:
        loader = BatchLoader(np.arange(1000, dtype=np.uint16), 8, 2, seed=5)
        return [x.flatten().tolist() for x, _ in parallel.micro_batches(loader, 4)], loader.state_dict()

    alone, position = draw(Parallel())
    shares = [draw(Parallel(rank, rank, world)) for rank in range(world)]
    assert len(alone) == 4 and [batch for share, _ in shares for batch in share] == alone
    assert all(len(share) == 4 // world and state == position for share, state in shares)


def test_an_accumulation_the_ranks_cannot_share_is_refused():
    with pytest.raises(UserError, match=r"grad_accum_steps \(3\) must be a multiple of the number of processes \(2\)"):
        Parallel(0, 0, 2).local_steps(3)


def test_pruning_keeps_the_newest_steps_and_whatever_best_and_latest_name(tmp_path):
    weights, optimizer = {"w": torch.zeros(2)}, {"state": {}, "param_groups": []}
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(tmp_path, step, weights, optimizer, {}, best=step == 20)
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in step_folders(tmp_path)] == ["step_000020", "step_000040", "step_000050"]
    assert pointer(tmp_path, "best").name == "step_000020" and pointer(tmp_path, "latest").name == "step_000050"
    prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in step_folders(tmp_path)] == ["step_000020", "step_000050"]
