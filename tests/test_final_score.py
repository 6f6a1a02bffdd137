"""A run ends on one figure: the checkpoint it ended on scored on the val split by `lmlab eval`'s scorer (whole, or
windows spread over it with the loss's standard error), not the least of its noisy evaluations. The budget's share
for it is planned in tests/test_budget.py."""

import json
import math
import subprocess

import numpy as np
import pytest
import torch

from lmlab.core.config import ModelConfig
from lmlab.data.loader import open_tokens
from lmlab.data.shards import read_meta, windows_in
from lmlab.evals.evaluate import evaluate_split, split_windows, spread
from lmlab.model import build_model
from lmlab.run.rundir import RunDir
from tests.helpers import LMLAB, write_config


@pytest.mark.slow
def test_a_run_ends_on_its_checkpoint_scored_on_the_whole_val_split_as_lmlab_eval_scores_it(tmp_path, char_dataset):
    run = tmp_path / "run"
    # A run by steps scores the whole val split once it trained on 1 / 0.15 times the split's tokens: the steps of
    # 8 x 32 tokens that do, and a few more, from the fixture's split (enough steps to learn them from any seed).
    steps = math.ceil(read_meta(char_dataset)["val"]["tokens"] / 0.15 / 256) + 5
    done = subprocess.run([LMLAB, "train", write_config(tmp_path / "tiny.toml", char_dataset, max_iters=steps),
                           "--run", run, "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    events = RunDir(run).events()
    final = events[-2]
    assert final["event"] == "final" and final["step"] == steps and final["stderr"] == 0.0
    assert final["windows"] == final["split_windows"] == windows_in(read_meta(char_dataset), "val", 32)
    said = " ".join(done.stdout.split())  # whatever the width it folds at
    assert said.endswith(f"loss.png final val {final['val_loss']:.4f}: the last checkpoint (step {steps}) on the whole "
                         f"val split ({final['tokens']:,} tokens)")
    scored = subprocess.run([LMLAB, "eval", run, "--checkpoint", "latest", "--json"], capture_output=True, text=True,
                            timeout=300)
    assert scored.returncode == 0, scored.stderr
    result = json.loads(scored.stdout)
    assert result["step"] == steps and result["tokens"] == final["tokens"]
    assert result["loss"] == pytest.approx(final["val_loss"], abs=1e-5)  # its batches of 32 windows, the run's of 8


def test_a_sampled_score_gives_a_standard_error_that_covers_the_whole_splits_loss():
    """Windows spread over the split: the loss of each subset lies within a few of its standard errors of the whole
    split's (a seeded model and split, so the verdict is fixed), the error shrinks as the subset grows, and it is 0
    for the whole split and for every window of it."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50)).eval()
    rng = np.random.default_rng(0)
    # A split whose windows differ in difficulty: stretches of a few tokens and of many.
    tokens = np.concatenate([rng.integers(0, 50 if i % 3 else 5, 16 * 7) for i in range(60)]).astype(np.uint16)
    total = split_windows(tokens, 16)
    whole = evaluate_split(model, tokens, 1.0, 8, torch.device("cpu"), torch.float32)
    assert whole["stderr"] == 0.0 and whole["tokens"] == total * 16
    errors = []
    for wanted in (8, 32, 128, total - 1):
        part = evaluate_split(model, tokens, 1.0, 8, torch.device("cpu"), torch.float32, windows=spread(total, wanted))
        assert part["tokens"] == wanted * 16 and 0 < part["stderr"] < 1
        assert abs(part["loss"] - whole["loss"]) <= 3 * part["stderr"]
        errors.append(part["stderr"])
    assert errors == sorted(errors, reverse=True)
    every = evaluate_split(model, tokens, 1.0, 8, torch.device("cpu"), torch.float32, windows=spread(total, total))
    assert every["stderr"] == 0.0 and every["loss"] == pytest.approx(whole["loss"], rel=1e-12)
    assert math.isclose(whole["perplexity"], math.exp(whole["loss"]))


class TwoRanks:
    """Two ranks of a job in one process, each scoring its share: the sums of both, as an all-reduce gives them."""

    def __init__(self):
        self.world_size, self.rank, self.sums = 2, 0, []

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.sums.append(tensor.clone())
        return tensor


def test_under_torchrun_the_ranks_score_their_shares_in_as_many_forwards_and_the_sums_give_one_processs_figure(
        char_dataset):
    torch.manual_seed(0)
    meta = read_meta(char_dataset)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32,
                                    vocab_size=meta["vocab_size"])).eval()
    tokens = open_tokens(char_dataset, "val", meta["dtype"])
    windows = spread(split_windows(tokens, 32), 21)  # 3 batches of 8: rank 0 two, rank 1 one and a padding one
    alone = evaluate_split(model, tokens, 1.0, 8, torch.device("cpu"), torch.float32, windows=windows)
    calls, shares = [], []
    for rank in (0, 1):
        ranks = TwoRanks()
        ranks.rank = rank
        forwards = []

        def forward(x, forwards=forwards):
            forwards.append(x.shape[0])
            return model(x)

        evaluate_split(model, tokens, 1.0, 8, torch.device("cpu"), torch.float32, windows=windows, ranks=ranks,
                       forward=forward)
        calls.append(forwards)
        shares.append(ranks.sums[0])
    assert [len(f) for f in calls] == [2, 2]  # the same forwards on each rank
    summed = shares[0] + shares[1]
    assert summed[0] / summed[1] == pytest.approx(alone["loss"], rel=1e-6)
    assert int(summed[1]) == alone["tokens"] == 21 * 32
