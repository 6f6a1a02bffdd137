"""Stream training metrics to the experiment trackers people already use (TensorBoard, Weights & Biases).

TensorBoard gets, in the run dir itself: the scalars below at each log line and eval, the hyper-parameters (the
HParams plugin, with the best val loss as the metric), the config as text, and a sample at each eval. W&B gets
the scalars and the config, under `train.tracker_project` and `train.tracker_run` (default: the run dir's name).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from lmlab.core.config import RunConfig, SamplingParams
from lmlab.core.config_toml import to_dict, to_toml
from lmlab.core.extras import require
from lmlab.core.peak import autocast_dtype
from lmlab.data.shards import read_meta
from lmlab.data.tokenizers import Tokenizer
from lmlab.inference.generate import document_start, stream_ids
from lmlab.model import LanguageModel

if TYPE_CHECKING:  # imported where a run asks for TensorBoard: an extra
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.writer import FileWriter

# metrics.jsonl field -> tracker tag, per event kind
TAGS = {
    "train": {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
              "tokens_per_sec": "perf/tokens_per_sec", "ms_per_step": "perf/ms_per_step", "mfu": "perf/mfu"},
    "eval": {"val_loss": "val/loss", "val_accuracy": "val/accuracy", "train_eval_loss": "train/eval_loss",
             "best_val_loss": "val/best_loss"},
}
METRIC = "val/best_loss"  # what the HParams plugin ranks runs by
SAMPLE = SamplingParams(max_new_tokens=256)  # drawn at each eval from the start of a document, the same seed each time


def require_tracker(kind: str) -> None:
    """Refuse `train.tracker = KIND` in one sentence where its package is missing: before a run is begun."""
    if kind in ("tensorboard", "wandb"):
        require(kind, user=f'train.tracker = "{kind}"', otherwise=' or set train.tracker = "none"')


class Tracker:
    """`train.tracker`: none, tensorboard (event files in the run dir) or wandb (when installed). `model` draws the
    samples TensorBoard shows at each eval (None: no samples, e.g. a sharded model rank 0 cannot run alone)."""

    def __init__(self, kind: str, run_dir: Path, cfg: RunConfig, resume_step: int | None = None,
                 model: LanguageModel | None = None):
        self._writer: SummaryWriter | None = None
        self._wandb: Any = None  # wandb's run, of an extra without type hints
        self._session_end: Any = None  # TensorBoard's session-end summary, logged at close
        self._cfg, self._model = cfg, model
        require_tracker(kind)
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams

            # Events go into the run dir itself, so `tensorboard --logdir runs` shows every run by name.
            # On resume, purge what was logged after the checkpoint, as metrics.jsonl does.
            self._writer = writer = SummaryWriter(log_dir=str(run_dir),
                                                  purge_step=None if resume_step is None else resume_step + 1)
            if resume_step is None:  # the session (hyper-parameters) starts once; its metric is logged at each eval
                experiment, session_start, self._session_end = hparams(_hparams(cfg), {METRIC: 0.0})
                _file_writer(writer).add_summary(experiment)
                _file_writer(writer).add_summary(session_start)
            # Indented: TensorBoard renders text as Markdown, and this keeps the TOML as written.
            writer.add_text("config", _preformatted(to_toml(cfg)), resume_step or 0)
        elif kind == "wandb":
            import wandb

            self._wandb = wandb.init(project=cfg.train.tracker_project, dir=str(run_dir), config=to_dict(cfg),
                                     name=cfg.train.tracker_run or Path(run_dir).name, resume="allow")

    def log(self, event: dict[str, Any]) -> None:
        tags = TAGS.get(event.get("event", ""), {})
        values = {tag: event[key] for key, tag in tags.items() if event.get(key) is not None}
        if not values:
            return
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, event["step"])
            if event["event"] == "eval" and self._model is not None:
                self._writer.add_text("samples", _preformatted(self._sample(self._model)), event["step"])
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=event["step"])

    def _sample(self, model: LanguageModel) -> str:
        """The model as it stands continuing the start of a document, under SAMPLE's fixed seed (its own
        generator: training's random state is untouched)."""
        meta = read_meta(Path(self._cfg.data.dataset))
        tokenizer = Tokenizer.load(Path(self._cfg.data.dataset) / "tokenizer.json", meta["tokenizer"])
        device = next(model.parameters()).device
        training = model.training
        model.eval()
        ids = list(stream_ids(model, document_start(tokenizer), SAMPLE, autocast_dtype(device, self._cfg.train.dtype)))
        model.train(training)
        return tokenizer.decode(ids)

    def close(self) -> None:
        if self._writer is not None:
            if self._session_end is not None:
                _file_writer(self._writer).add_summary(self._session_end)
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()


def _file_writer(writer: SummaryWriter) -> FileWriter:
    """The writer's file writer, which its __init__ makes (torch's own type says None, its value before)."""
    return cast("FileWriter", writer.file_writer)


def _preformatted(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _hparams(cfg: RunConfig) -> dict[str, Any]:
    """The config as TensorBoard's HParams take it: `section.key` scalars, a plugin's [model.options] as
    `model.options.NAME` (a list as its text)."""
    values = {}
    for section, keys in to_dict(cfg).items():
        for key, value in keys.items():
            for name, item in (value.items() if isinstance(value, dict) else [("", value)]):
                values[".".join(filter(None, (section, key, name)))] = str(item) if isinstance(item, list) else item
    return values
