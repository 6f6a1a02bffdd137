"""No host sync in a training step: over 50 steps of every optimizer in OPTIMIZERS and every dtype path a CPU has
(float32; bfloat16 autocast; float16 autocast with the grad scaler, as a pre-Ampere GPU trains), every op that makes
the host wait for the device (a value read: `.item()`, `.tolist()`, `bool()`; an output sized by the data:
`nonzero`) is counted through the real Trainer, and none comes inside a step or between the log and eval points."""

import inspect

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lmlab.core.config_toml import load_config
from lmlab.train.loop import Trainer
from lmlab.train.optim import OPTIMIZERS
from lmlab.train.preflight import train_job
from lmlab.train.step import TrainStep
from tests.helpers import write_config

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.is_nonzero, aten.equal, aten.masked_select, aten.unique_dim,
           aten._unique2, aten.repeat_interleave}
READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"}  # on a CPU tensor too
CADENCE = ["train.max_iters=50", "train.log_interval=10", "train.eval_interval=25", "train.checkpoint_interval=25",
           "train.eval_iters=1", "model.n_layer=1", "model.n_embd=16", "model.block_size=16", "train.batch_size=4"]
DUE = {10, 20, 25, 30, 40, 50}


class Syncs(TorchDispatchMode, TorchFunctionMode):
    """Each syncing op (an aten op the device must answer, or a Tensor method that reads a value) as the step it
    belongs to: inside TrainStep.__call__ the step under way, else the trainer's last step."""

    def __init__(self, trainer: Trainer):
        TorchDispatchMode.__init__(self)
        TorchFunctionMode.__init__(self)
        self.trainer, self.inside, self.outside = trainer, [], []

    def __enter__(self):
        TorchFunctionMode.__enter__(self)
        TorchDispatchMode.__enter__(self)
        return self

    def __exit__(self, *exc):
        TorchDispatchMode.__exit__(self, *exc)
        TorchFunctionMode.__exit__(self, *exc)

    def _seen(self, name: str) -> None:
        step, frame = self.trainer.progress.step, inspect.currentframe()
        while frame is not None and frame.f_code is not TrainStep.__call__.__code__:
            frame = frame.f_back
        (self.inside if frame is not None else self.outside).append((step + (frame is not None), name))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in SYNCING:
            self._seen(str(func))
        return func(*args, **(kwargs or {}))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in READS and isinstance(args[0] if args else None, torch.Tensor):
            self._seen(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_training_step_never_waits_on_the_device(tmp_path, char_dataset, optimizer, dtype):
    cfg = load_config(write_config(tmp_path / "tiny.toml", char_dataset),
                      [*CADENCE, f"train.optimizer={optimizer}", f"train.dtype={dtype}"])
    trainer = Trainer(train_job(cfg, tmp_path / "run", "cpu"))
    with Syncs(trainer) as syncs:
        trainer.run()
    assert trainer.progress.step == 50
    assert syncs.inside == []  # not one in 50 steps, the non-finite check and the grad scaler's included
    # the queued losses are read at each log, eval and checkpoint point, and at no other step
    assert {step for step, _ in syncs.outside} == DUE, syncs.outside
