"""A golden loss curve: the per-step training losses of a tiny seeded run (CPU, fp32, one thread, dropout on)
must match tests/data/golden_loss.json to 1e-6.

Any change to the model's numbers, its initialisation, the loader's draws, the optimizer, the schedule or the
RNG's use moves the curve and fails this test. When such a change is intended, regenerate the file and say so
in the commit:

    LMLAB_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""

import json
import os
from pathlib import Path

import torch

from lmlab.core.config_toml import load_config
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from tests.helpers import write_config

GOLDEN = Path(__file__).parent / "data" / "golden_loss.json"
SETTINGS = ["train.log_interval=1", "train.eval_interval=20", "train.dtype=float32", "train.compile=false",
            "train.threads=1", "model.dropout=0.1"]


def test_a_tiny_seeded_run_follows_the_golden_loss_curve(tmp_path, stable_root):
    cfg = load_config(write_config(tmp_path / "tiny.toml", stable_root / "data" / "tiny-char", max_iters=40),
                      SETTINGS)
    threads = torch.get_num_threads()
    try:
        run = Trainer(train_job(cfg, tmp_path / "run", "cpu")).run().run_dir
    finally:
        torch.set_num_threads(threads)  # train.threads is process-wide: the next tests get all cores back
    losses = [e["loss"] for e in RunDir(run).events() if e["event"] == "train"]
    if os.environ.get("LMLAB_REGENERATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"settings": SETTINGS, "losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["settings"] == SETTINGS and len(losses) == len(golden["losses"]) == 40
    assert max(abs(a - b) for a, b in zip(losses, golden["losses"])) <= 1e-6
