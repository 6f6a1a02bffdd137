"""A trained run's checkpoints (`Checkpointer`): a new run begun, a run resumed from its newest checkpoint that
verifies, checkpoints saved, and the rollback after a streak of bad steps."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lmlab.core.config import RunConfig, TrainConfig, checkpoint_label, checkpoint_name
from lmlab.core.config_toml import build_section, to_dict, toml_value
from lmlab.core.errors import UserError
from lmlab.core.fileio import ReadError
from lmlab.data.loader import resolve_config
from lmlab.data.tokenizers import tokenizer_identity
from lmlab.model import LanguageModel
from lmlab.run.checkpoint import pointer
from lmlab.run.rundir import RunDir
from lmlab.train.budget import BY_STEPS
from lmlab.train.distributed import Parallel
from lmlab.train.state import TrainingState, upgrade_training
from lmlab.train.stop import Writes

# What a resume does with a [train] setting its --set changes from those its checkpoint trained by (`trained_by`). One
# in KEPT was settled as the run began and its checkpoint goes on with it: refused. One in PLANNED a budget's plan
# fixed: refused while the run goes on by that plan; by steps, the schedule's are laid again from where the LR stands
# and said (`Schedule.resume_with`). Every other setting, and data.dataset, is honoured from the step resumed at and
# named in the resume event; a [model] setting is the weights' shape, refused by `Checkpointer.resume`.
KEPT = {"seed": "seeded the weights and the order of the batches, which its checkpoint goes on with",
        "optimizer": "made the optimizer state its checkpoint holds",
        **dict.fromkeys(("weight_decay", "beta1", "beta2"), "is part of the optimizer state its checkpoint holds"),
        "micro_batch": "was settled as the run began (config.toml keeps the result; set batch_size and "
                       "grad_accum_steps instead)",
        "attention": "chose the attention path its checkpoint goes on by"}
PLANNED = ("max_iters", "eval_iters", "learning_rate", "min_lr", "schedule", "decay_fraction", "warmup_iters",
           "warmup_epochs")


def check_resumable(run: RunDir, cfg: RunConfig) -> tuple[RunConfig, dict[str, list[Any]]]:
    """Only a trained run has a training state to continue, only on a dataset that is here, and only with settings it
    can honour (`KEPT`, `PLANNED`); `cfg` going on by the micro-batch it trained by (in config.toml; older runs': as
    written), and the [data] and [train] settings it changes, {"train.batch_size": [8, 16]}."""
    dataset = cfg.data.dataset
    kind = run.kind()
    if kind == "fine-tuned":
        go_on = (f"continue it with the fine-tuning command that made it: `{run.resume_command()}`" if run.unfinished()
                 else f"it is finished; to tune it further, fine-tune it into a new run: `lmlab finetune {run.path} "
                 "--data FILE --run NEW`")
        raise UserError(f"{run.path} was made by `lmlab finetune`, not `lmlab train`; {go_on}.")
    if kind == "imported":
        raise UserError(f"{run.path} was imported, so it has no training to continue; start a new run from its "
                        f"weights with `lmlab train CONFIG --init-from {run.path}`.")
    if dataset == run.config().data.dataset and not (Path(dataset) / "meta.json").exists():
        raise UserError(f"{run.path} was trained on {dataset}, which is not here (moved or deleted); continue it on "
                        f"the dataset where it is now with `lmlab train --resume {run.path} --set data.dataset=DIR`, "
                        "or put the dataset back.")
    old, new = trained_by(run), to_dict(resolve_config(cfg)[0])  # warmup_epochs as the steps config.toml keeps
    if new["train"]["micro_batch"] == "set":  # what every resume trains by (`Trainer`): no change asked
        old["train"]["micro_batch"] = "set"
    changed = {f"{section}.{k}": [v, new[section][k]] for section in ("data", "train")
               for k, v in old[section].items() if new[section][k] != v}
    budget = old["train"]["budget_seconds"]
    for key, (was, asked) in changed.items():
        name, setting = key.removeprefix("train."), f"--set {key}={_shown(asked)}"
        if name in KEPT:
            raise UserError(f"{run.path} cannot resume with {setting} ({_shown(was)} as it trained): it "
                            f"{KEPT[name]}; resume without it, or start a new run from its weights with "
                            f"`lmlab train CONFIG --init-from {run.path}`.")
        if name in PLANNED and budget and new["train"]["budget_seconds"] == budget:
            raise UserError(f"{run.path} resumes by the plan of its {budget:g} s budget, which fixed {key} "
                            f"({_shown(was)}), so {setting} cannot take effect; resume it by steps with it "
                            f"({BY_STEPS}: the LR goes on from where it stands), or without it.")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch="set")), changed


def trained_by(run: RunDir) -> dict[str, dict[str, Any]]:
    """The settings a resume goes on from: its newest checkpoint's, not config.toml's, which a resume that changed
    settings rewrote before it was killed (a later resume without them would train by them unsaid, its `changed`
    lost); config.toml's for a checkpoint from before lmlab kept them."""
    settings = to_dict(run.config())
    for section, values in (run.trained_by() or {}).items():
        settings[section] = dataclasses.asdict(build_section(section, values, f"the newest checkpoint of {run.path}"))
    return settings


def trained_in(run: RunDir, dtype: torch.dtype) -> dict[str, list[Any]]:
    """The dtype a resume trains in as a change where this machine chose another than the checkpoint trained in (its
    events as they stood then: `auto` on a CPU whose bf16 no longer pays, say): {"dtype": ["bfloat16", "float32"]}."""
    was = [e.get("dtype") for e in run.events() if e.get("event") in ("start", "resume")]
    now = str(dtype).removeprefix("torch.")
    return {"dtype": [was[-1], now]} if was and was[-1] and was[-1] != now else {}


def from_here(changed: dict[str, list[Any]]) -> str:
    """The settings a resume changed, as its line ends on them."""
    said = ", ".join(f"{key} {toml_value(was)} -> {toml_value(now)}" for key, (was, now) in changed.items())
    return f"; from here {said}" if said else ""


def _shown(value: Any) -> str:
    """A setting's value as --set takes it: text bare, the rest as TOML writes it."""
    return value if isinstance(value, str) else toml_value(value)


def check_tokenizer(run: RunDir, dataset: str, name: str) -> None:
    """A run's weights are those of its tokenizer's vocabulary: continuing them on another tokenizer's ids, even one of
    the same size, would give every id other text, so no --force lets it. `name` names the run."""
    ours, theirs = run.path / "tokenizer.json", Path(dataset) / "tokenizer.json"
    if ours.exists() and tokenizer_identity(ours) != tokenizer_identity(theirs):
        raise UserError(f"dataset {dataset} has another tokenizer than {name} (the same ids stand for other text), "
                        "and a run's weights continue with their own tokenizer only, --force or not; point "
                        f"data.dataset at a dataset prepared with it (`lmlab prepare CORPUS --tokenizer {run.path}` "
                        "makes one).")


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    return ", ".join(f"{k} {old[k]} -> {new[k]}" for k in new if old.get(k) != new[k])


class Checkpointer:
    """The checkpoints of one trained run, saving and restoring `state` (state.json's `training`) with the model and
    optimizer: `start` (a new run), `resume`, `save`, `rollback`, `say_retention`. `saved_step` is the step of the
    newest checkpoint on disk of this process's run: written, or resumed from."""

    def __init__(self, run_dir: RunDir, model: LanguageModel, optimizer: torch.optim.Optimizer, parallel: Parallel,
                 state: TrainingState, writes: Writes, train: TrainConfig, console: Console):
        self.run_dir, self.model, self.optimizer, self.parallel = run_dir, model, optimizer, parallel
        self.state, self.writes, self.train, self.console = state, writes, train, console
        self.progress = state.parts["progress"]
        self.saved_step = -1

    def start(self, cfg: RunConfig, init_from: str | None, keep_optimizer: bool) -> None:
        """A new run: nothing of an earlier one is overwritten; its weights (and optimizer) from another run's, if asked
        (`runs/OLD`, or `runs/OLD:CHECKPOINT`)."""
        self.run_dir.check_new()
        if not init_from:
            return
        old_dir, _, which = init_from.partition(":")
        try:
            which = checkpoint_name(which or "latest")
        except UserError:
            raise UserError(f"--init-from {init_from}: {which!r} is not a checkpoint of a run; use {old_dir}, "
                            f"{old_dir}:best, {old_dir}:latest or {old_dir}:step_N.") from None
        old_run = RunDir(old_dir)
        old = old_run.config().model
        if old.vocab_size != cfg.model.vocab_size:
            raise UserError(f"--init-from {old_dir} has vocab size {old.vocab_size} but dataset "
                            f"{cfg.data.dataset} has {cfg.model.vocab_size}; use a dataset prepared "
                            "with the same tokenizer.")
        check_tokenizer(old_run, cfg.data.dataset, f"--init-from {old_dir}")
        if dataclasses.asdict(old) != dataclasses.asdict(cfg.model):
            raise UserError(f"--init-from {old_dir} has another model shape "
                            f"({_differences(dataclasses.asdict(old), dataclasses.asdict(cfg.model))}); "
                            "use the same [model] settings as that run.")
        folder = old_run.checkpoint(which)
        state = old_run.read_checkpoint(folder, self.model, self.optimizer if keep_optimizer else None,
                                        self.parallel.load_checkpoint)
        carried = "its weights and optimizer state" if keep_optimizer else "its weights (a new optimizer)"
        self.console.print(f"starting from {old_dir}, checkpoint {folder.name} "
                           f"({checkpoint_label(which, state.get('step') or 0)}): {carried}", highlight=False)

    def resume(self, cfg: RunConfig, train_sha256: str, force: bool) -> Path:
        """Restore the newest checkpoint that verifies, of this model on this run's tokenizer and, without `force`, on
        data of the same checksum (`train_sha256`); the step folder it came from."""
        self.run_dir.checkpoint("latest")  # says so if there is nothing to resume
        self.run_dir.tokenizer()  # the run's copy is checked against its record, not silently written over
        check_tokenizer(self.run_dir, cfg.data.dataset, str(self.run_dir.path))
        trained, asked = dataclasses.asdict(self.run_dir.config().model), to_dict(cfg)["model"]
        trained["vocab_size"] = trained["vocab_size"] or asked["vocab_size"]  # 0 in a hand-written config
        if trained != asked:
            raise UserError(f"{self.run_dir.path} was trained with another model shape "
                            f"({_differences(trained, asked)}); resume with the run's own [model] settings.")
        folder, training = self.restore_newest()
        if training["dataset_sha256"] != train_sha256 and not force:
            raise UserError(f"dataset {cfg.data.dataset} differs from the one {self.run_dir.path} was trained "
                            "on (train split checksum); pass --force to continue on the new data anyway.")
        return folder

    def restore_newest(self) -> tuple[Path, dict[str, Any]]:
        """Restore the newest checkpoint that verifies (a run's resume, a fine-tune's continuation); its folder and
        training state."""
        if self.parallel.is_main:
            self.run_dir.remove_partial_checkpoints()  # a write cut short by a crash
        folder, training = self._load_newest_good()
        self.parallel.check_same("checkpoint", {"resumed from": folder.name},
                                 "every host must see the same run folder: keep it on the filesystem they share")
        self._restore(training, rollback=False)
        self.saved_step = self.progress.step
        return folder, training

    def save(self, best: bool) -> None:
        """Checkpoint the run where it stands, its event saying how long the weights took to gather and write."""
        step, began = self.progress.step, time.perf_counter()

        def log() -> None:
            # Logged once the files are whole, before the folder takes its step's name: a kill leaves neither, or an
            # event that resume drops with the unfinished folder; a failed write logs none, and a failed log keeps no
            # folder.
            self.writes.log({"event": "checkpoint", "step": step, "best": best,
                             "seconds": round(time.perf_counter() - began, 3)})
            if self.writes.error is not None:
                raise self.writes.error

        weights, optimizer_state = self.parallel.full_state(self.model, self.optimizer)
        self.writes(self.run_dir.save_checkpoint, step, weights, optimizer_state, self.state.state_dict(), best,
                    self.train.keep_checkpoints, log)
        self.parallel.barrier()  # a rollback on any rank reads what rank 0 wrote
        if self.writes.error is None:
            self.saved_step = step

    def rollback(self, step: int, lr_scale: float) -> None:
        """`step` completed a streak of bad steps: reload the newest checkpoint from before the streak (the guard
        has lowered the LR scale to `lr_scale` already)."""
        patience = self.train.spike_patience
        try:
            folder, training = self._load_newest_good(at_most=step - patience)
            self._restore(training, rollback=True)
        except UserError:  # no checkpoint from before the streak yet: all we can do is lower the LR
            folder = None
        self.writes.log({"event": "rollback", "step": step, "to_step": self.progress.step, "lr_scale": lr_scale})
        where = f"rolled back to {folder.name}" if folder else "no earlier checkpoint to roll back to"
        self.console.print(f"[yellow]step {step}: {patience} bad steps in a row; {where}; "
                           f"LR scaled by {lr_scale:g}[/yellow]")

    def say_retention(self, last_step: int) -> None:
        """Name the step folders that retention will delete as the resumed run's checkpoints come, and what it keeps."""
        tc, step = self.train, self.progress.step
        end, every = last_step, tc.checkpoint_interval
        coming = (end, *range(end // every * every, step, -every)[:tc.keep_checkpoints]) if end > step else ()
        going = self.run_dir.to_prune(tc.keep_checkpoints, coming) if coming else []
        if going:
            best = pointer(self.run_dir.checkpoints, "best")
            kept = {name: ["resumed from"] for name in self.run_dir.resume_points()}
            if best:
                kept.setdefault(best.name, []).append("best")
            stay = ", ".join(f"{name} ({' and '.join(why)})" for name, why in sorted(kept.items()))
            rule, more = f"with train.keep_checkpoints = {tc.keep_checkpoints}", "raise keep_checkpoints to keep more"
            if self.run_dir.kind() == "fine-tuned":  # [finetune] has no keep_checkpoints: its [train] is its base's
                rule = (f"as its base run's train.keep_checkpoints = {tc.keep_checkpoints} says ([finetune] has no "
                        "such setting)")
                more = "a larger finetune.checkpoint_interval writes fewer"
            self.console.print(f"note: {rule}, the checkpoints to come delete {', '.join(p.name for p in going)}; "
                               f"{stay} stay; {more}", style="yellow", highlight=False, markup=False)

    def _load_newest_good(self, at_most: int | None = None) -> tuple[Path, dict[str, Any]]:
        """Load the newest checkpoint (at most `at_most` steps in) that verifies; its folder and training state."""
        latest = self.run_dir.checkpoint("latest")
        for folder in [latest, *(p for p in reversed(self.run_dir.step_folders()) if p != latest)]:
            if at_most is not None and int(folder.name.removeprefix("step_")) > at_most:
                continue
            try:
                state = self.run_dir.read_checkpoint(folder, self.model, self.optimizer, self.parallel.load_checkpoint)
                return folder, upgrade_training(state["training"])
            except ReadError:  # not damaged, unreadable here (its permissions): an older one would train over it
                raise
            except UserError as err:
                self.console.print(f"[yellow]{err} Trying an older checkpoint.[/yellow]")
        raise UserError(f"no checkpoint of {self.run_dir.path} could be loaded; start the run again.")

    def _restore(self, training: dict[str, Any], rollback: bool) -> None:
        """Put a checkpoint's training state back, in place (the weights and optimizer are loaded already)."""
        self.state.load_state_dict(training, rollback)
        self.parallel.own_rng(self.train.seed, self.progress.step)
