"""A run's beginning and its checkpoints: a new run begun (from scratch or from another run's weights), a run
continued from its newest checkpoint that verifies, the training state a checkpoint holds and puts back, and the
rollback after a streak of bad steps. A mixin of `Trainer`, whose state (model, step, loader, guard, progress,
run folder, ranks) it reads and sets."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lmlab.core.config import TrainConfig, to_dict
from lmlab.core.errors import UserError
from lmlab.data.tokenizers import tokenizer_identity
from lmlab.run.checkpoint import pointer
from lmlab.run.rundir import RunDir
from lmlab.train.budget import BudgetPlan, resumed_plan, schedule_for
from lmlab.train.schedule import Relaid, budget_position, followed, relay
from lmlab.train.state import rng_state, set_rng_state, upgrade_training


def check_resumable(run: RunDir, dataset: str) -> None:
    """Only a trained run has a training state to continue, and only on a dataset that is here (`dataset`, what the
    run's config names, --set included)."""
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


def check_tokenizer(run: RunDir, dataset: str, name: str) -> None:
    """A run's weights are those of its tokenizer's vocabulary: continuing them on the ids of another tokenizer, even
    one of the same size, would give every id other text (and `sample` would decode the run's best checkpoint with
    the wrong one), so no --force lets it. `name` names the run as the command line does."""
    ours, theirs = run.path / "tokenizer.json", Path(dataset) / "tokenizer.json"
    if ours.exists() and tokenizer_identity(ours) != tokenizer_identity(theirs):
        raise UserError(f"dataset {dataset} has another tokenizer than {name} (the same ids stand for other text), "
                        "and a run's weights continue with their own tokenizer only, --force or not; point "
                        f"data.dataset at a dataset prepared with it (`lmlab prepare CORPUS --tokenizer {run.path}` "
                        "makes one).")


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    return ", ".join(f"{k} {old[k]} -> {new[k]}" for k in new if old.get(k) != new[k])


class Resuming:
    """What `Trainer` does with checkpoints: `_start` (a new run), `_resume`, `_checkpoint`, `_restore`,
    `_rollback`."""

    def _start(self, init_from: str | None, keep_optimizer: bool) -> None:
        self.run_dir.check_new()
        if init_from:
            self._init_from(init_from, keep_optimizer)
        if self.parallel.is_main:
            self.run_dir.begin("trained", self.model, self.cfg, self.meta, init_from=init_from, device=self.device,
                               dtype=self.dtype, world_size=self.parallel.world_size, parallel=self.parallel.mode,
                               peak=self.peak, dtype_reason=self.dtype_reason)

    def _init_from(self, source: str, keep_optimizer: bool) -> None:
        """Start from another run's weights (`runs/OLD`, or `runs/OLD:CHECKPOINT`: best, latest, step_N or N)."""
        old_dir, _, which = source.partition(":")
        if which not in ("", "best", "latest"):
            raise UserError(f"--init-from {source}: {which!r} is not a checkpoint of a run; use {old_dir}, "
                            f"{old_dir}:best or {old_dir}:latest.")
        old_run = RunDir(old_dir)
        old = old_run.config().model
        if old.vocab_size != self.cfg.model.vocab_size:
            raise UserError(f"--init-from {old_dir} has vocab size {old.vocab_size} but dataset "
                            f"{self.cfg.data.dataset} has {self.cfg.model.vocab_size}; use a dataset prepared "
                            "with the same tokenizer.")
        check_tokenizer(old_run, self.cfg.data.dataset, f"--init-from {old_dir}")
        if dataclasses.asdict(old) != dataclasses.asdict(self.cfg.model):
            raise UserError(f"--init-from {old_dir} has another model shape "
                            f"({_differences(dataclasses.asdict(old), dataclasses.asdict(self.cfg.model))}); "
                            "use the same [model] settings as that run.")
        old_run.read_checkpoint(old_run.checkpoint(which or "latest"), self.model,
                                self.step.optimizer if keep_optimizer else None, self.parallel.load_checkpoint)

    def _resume(self, force: bool) -> None:
        """Continue from `latest`; if it is damaged, fall back to the newest step folder that verifies."""
        if self.parallel.is_main:
            self.run_dir.remove_partial_checkpoints()  # a write cut short by a crash
        self.run_dir.checkpoint("latest")  # says so if there is nothing to resume
        self.run_dir.tokenizer()  # the run's copy is checked against its record, not silently written over
        check_tokenizer(self.run_dir, self.cfg.data.dataset, str(self.run_dir.path))
        old = self.run_dir.config()
        trained, asked = dataclasses.asdict(old.model), to_dict(self.cfg)["model"]
        trained["vocab_size"] = trained["vocab_size"] or asked["vocab_size"]  # 0 in a hand-written config
        if trained != asked:
            raise UserError(f"{self.run_dir.path} was trained with another model shape "
                            f"({_differences(trained, asked)}); resume with the run's own [model] settings.")
        folder, training = self._load_newest_good()
        self.parallel.check_same("checkpoint", {"resumed from": folder.name},
                                 "every host must see the same run folder: keep it on the filesystem they share")
        # The checksum of the bytes training reads (open_tokens verified them against meta.json): a dataset prepared
        # again from other inputs is another dataset.
        if training["dataset_sha256"] != self.train_tokens.sha256 and not force:
            raise UserError(f"dataset {self.cfg.data.dataset} differs from the one {self.run_dir.path} was trained "
                            "on (train split checksum); pass --force to continue on the new data anyway.")
        self._restore(training, rollback=False)
        kept = (training.get("schedule") or {}).get("train")  # absent before lmlab kept it: config.toml's then
        followed = dataclasses.replace(old.train, **kept) if kept else old.train
        old_lr = self._lr_at(self.progress.step, followed)
        self.budget = resumed_plan(self.budget, self.cfg.train.budget_seconds, self.run_dir.path)
        self._relay(followed, old_lr)
        if self.parallel.is_main:
            self.run_dir.truncate_after(self.progress.step)
            self.run_dir.resumed(self.progress.step, folder.name, self.device, self.dtype, self.parallel.world_size,
                                 self.peak)
            self._say_retention()
        self.console.print(f"Resumed {self.run_dir.path} from {folder.name} (step {self.progress.step}).")

    def _relay(self, old: TrainConfig, old_lr: float) -> None:
        """Lay the schedule of a run resumed with another length on from the LR it had (lmlab.train.schedule), and
        say so."""
        step, new = self.progress.step, self.cfg.train
        if new.budget_seconds and not self.budget.fixed:  # its plans lay the rest from where the schedule stands
            self.budget.position, line = budget_position(old_lr, step, new)
        else:
            self.relaid, line = relay(old, new, step, old_lr, self.relaid)
        if line:
            self.console.print(line, highlight=False)

    def _say_retention(self) -> None:
        """Name the step folders that retention will delete as the resumed run's checkpoints come (those of its
        interval and its end; a new best adds more), and what it keeps."""
        tc, step = self.cfg.train, self.progress.step
        end, every = schedule_for(tc, self.budget).max_iters, tc.checkpoint_interval
        coming = (end, *range(end // every * every, step, -every)[:tc.keep_checkpoints]) if end > step else ()
        going = self.run_dir.to_prune(tc.keep_checkpoints, coming) if coming else []
        if going:
            best = pointer(self.run_dir.checkpoints, "best")
            kept = {name: ["resumed from"] for name in self.run_dir.resume_points()}
            if best:
                kept.setdefault(best.name, []).append("best")
            stay = ", ".join(f"{name} ({' and '.join(why)})" for name, why in sorted(kept.items()))
            self.console.print(f"note: with train.keep_checkpoints = {tc.keep_checkpoints}, the checkpoints to come "
                               f"delete {', '.join(p.name for p in going)}; {stay} stay; raise keep_checkpoints to keep "
                               "more", style="yellow", highlight=False)

    def _load_newest_good(self, at_most: int | None = None) -> tuple[Path, dict[str, Any]]:
        """Load the newest checkpoint (at most `at_most` steps in) that verifies; its folder and training state."""
        latest = self.run_dir.checkpoint("latest")
        for folder in [latest, *(p for p in reversed(self.run_dir.step_folders()) if p != latest)]:
            if at_most is not None and int(folder.name.removeprefix("step_")) > at_most:
                continue
            try:
                state = self.run_dir.read_checkpoint(folder, self.model, self.step.optimizer,
                                                     self.parallel.load_checkpoint)
                return folder, upgrade_training(state["training"])
            except UserError as err:
                self.console.print(f"[yellow]{err} Trying an older checkpoint.[/yellow]")
        raise UserError(f"no checkpoint of {self.run_dir.path} could be loaded; start the run again.")

    def _training_state(self) -> dict[str, Any]:
        scaler = self.step.scaler
        return {"progress": self.progress.state_dict(), "means": {k: m.state_dict() for k, m in self.means.items()},
                "guard": self.guard.state_dict(), "clock": self.clock.state_dict(),
                "loader": self.loader.state_dict(), "rng": rng_state(self.device),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "dataset_sha256": self.meta["train"]["sha256"], "budget": self.budget.state_dict(),
                "schedule": followed(self.cfg.train, self.relaid)}

    def _restore(self, training: dict[str, Any], rollback: bool) -> None:
        """Put a checkpoint's training state back, in place (the weights and optimizer are loaded already). A
        rollback keeps the data position (so the bad batches are not replayed), the guard (its statistics and
        the LR scale it just lowered), the fp16 grad scaler (the scale it lowered: the checkpoint's would overflow
        again) and the clock."""
        self.progress.load_state_dict(training["progress"])
        for name, mean in self.means.items():
            mean.load_state_dict(training["means"][name])
        set_rng_state(training["rng"], self.device)
        self.parallel.own_rng(self.cfg.train.seed, self.progress.step)
        if not rollback:
            self.loader.load_state_dict(training["loader"])
            self.guard.load_state_dict(training["guard"])
            self.clock.load_state_dict(training["clock"])
            if training["scaler"]:
                self.step.scaler.load_state_dict(training["scaler"])
            self.budget.load_state_dict(training.get("budget") or BudgetPlan().state_dict())
            relaid = (training.get("schedule") or {}).get("relaid")
            self.relaid = Relaid(**relaid) if relaid else None

    def _checkpoint(self, best: bool) -> None:
        step = self.progress.step
        # Logged first: a crash between the two leaves an event that resume drops with everything after the
        # checkpoint it falls back to, while the other order could lose the event of a checkpoint that exists.
        self._log({"event": "checkpoint", "step": step, "best": best})
        weights, optimizer_state = self.parallel.full_state(self.model, self.step.optimizer)
        self._write(self.run_dir.save_checkpoint, step, weights, optimizer_state, self._training_state(), best,
                    self.cfg.train.keep_checkpoints)
        self.parallel.barrier()  # a rollback on any rank reads what rank 0 wrote
        if self._write_error is None:
            self._saved_step = step

    def _rollback(self, step: int) -> None:
        """`step` completed a streak of bad steps: reload the newest checkpoint from before the streak (the guard
        has lowered the LR scale already)."""
        try:
            folder, training = self._load_newest_good(at_most=step - self.cfg.train.spike_patience)
            self._restore(training, rollback=True)
        except UserError:  # no checkpoint from before the streak yet: all we can do is lower the LR
            folder = None
        scale = self.guard.lr_scale
        self._log({"event": "rollback", "step": step, "to_step": self.progress.step, "lr_scale": scale})
        where = f"rolled back to {folder.name}" if folder else "no earlier checkpoint to roll back to"
        self.console.print(f"[yellow]step {step}: {self.cfg.train.spike_patience} bad steps in a row; {where}; "
                           f"LR scaled by {scale:g}[/yellow]")
