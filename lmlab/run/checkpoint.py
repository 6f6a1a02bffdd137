"""Pickle-free, atomic, device-portable checkpoints: the `checkpoints/` folder of a run. `lmlab.run.rundir` decides
what goes into state.json; this module writes, verifies and finds the step folders and their pointers."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from lmlab.core.errors import UserError
from lmlab.core.fileio import WriteError, atomic_write_text, fsync, human_bytes, read_text, sha256_file, writing
from lmlab.core.jsontext import parse_json

if TYPE_CHECKING:  # torch is imported where tensors are read or written: finding the step folders needs none
    import torch

    # (parameter, the optimizer's tensor for it or None, the saved one) -> the tensor to load, or None: the saved one
    Placer = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor | None]

STEP_FOLDER = re.compile(r"step_\d{6,}")  # what a pointer may name: a step folder of the same run


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """The names of tied weights that model.safetensors leaves out, each mapped to the name it keeps (the first
    sorted, as safetensors' save_model chooses)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {alias: min(group) for group in names.values() for alias in group if alias != min(group)}


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What model.safetensors holds: the state dict with each tied weight once."""
    aliases = tied_aliases(model)
    return {name: t for name, t in model.state_dict().items() if name not in aliases}


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import torch

    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *plain["scalars"].items()]:
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def checkpoint_bytes(tensors: list[torch.Tensor], state: dict[str, Any]) -> int:
    """The disk a step folder takes: the tensors with their headers, state.json and the file system's rounding."""
    sized = json.dumps({**state, "files": {"model.safetensors": "0" * 64, "optimizer.safetensors": "0" * 64}},
                       indent=1)
    return sum(t.numel() * t.element_size() + 256 for t in tensors) + len(sized.encode()) + 4 * 4096


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, its I/O errors (a full disk) raised as the OSError they are."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from err


def save_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    state: dict[str, Any], best: bool, whole: Callable[[], None] = lambda: None) -> Path:
    """Write root/step_<N>/ through a temporary folder and point `latest` (and `best`) at it. `weights` is
    `model_tensors(model)` and `optimizer_state` the optimizer's state_dict, both whole even when sharded; `whole`
    is called before the folder takes its name (what it raises leaves no checkpoint)."""
    root.mkdir(parents=True, exist_ok=True)
    tensors, plain = _flatten_optimizer(optimizer_state)
    final = root / f"step_{step:06d}"
    need = checkpoint_bytes([*weights.values(), *tensors.values()], {**state, "step": step, "optimizer": plain})
    if shutil.disk_usage(root).free < need:
        raise WriteError(final, f"a checkpoint needs {human_bytes(need)}", errno.ENOSPC)
    tmp = root / f".step_{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(final):
            tmp.mkdir()
            save_tensors({name: t.contiguous() for name, t in weights.items()}, tmp / "model.safetensors")
            save_tensors(tensors, tmp / "optimizer.safetensors")
            files = {}
            for name in ("model.safetensors", "optimizer.safetensors"):
                fsync(tmp / name)
                files[name] = sha256_file(tmp / name)
        atomic_write_text(tmp / "state.json", json.dumps({**state, "step": step, "optimizer": plain,
                                                           "files": files}, indent=1))
        fsync(tmp)
        whole()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a checkpoint is whole or absent
        raise
    if final.exists():  # the same step again after a resume
        shutil.rmtree(final)
    # `latest` first: killed before the rename it names no folder, read as the newest whole one, not an older one
    atomic_write_text(root / "latest", final.name)
    os.replace(tmp, final)
    fsync(root)
    if best:
        atomic_write_text(root / "best", final.name)
    return final


def step_folders(root: Path) -> list[Path]:
    """The finished step folders, oldest first."""
    found = [p for p in Path(root).glob("step_*") if STEP_FOLDER.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def pointer(root: Path, which: str) -> Path | None:
    """The step folder that `best` or `latest` names; None unless it names an existing step folder of `root`."""
    try:
        name = read_text(Path(root) / which, 4096).strip()
    except (FileNotFoundError, UnicodeDecodeError):  # one that cannot be read, or is no file, is a ReadError
        return None
    folder = Path(root) / name
    return folder if STEP_FOLDER.fullmatch(name) and folder.is_dir() else None


def remove_partial(root: Path) -> None:
    """Delete step folders whose write a crash cut short (they never got their final name)."""
    for leftover in Path(root).glob(".step_*.tmp-*"):
        shutil.rmtree(leftover)


def prune_checkpoints(root: Path, keep: int, pinned: AbstractSet[str] = frozenset()) -> None:
    """Keep the newest `keep` step folders, those `best` and `latest` name and those `pinned` (resumed from)."""
    for old in to_prune(root, keep, pinned):
        shutil.rmtree(old)


def to_prune(root: Path, keep: int, pinned: AbstractSet[str] = frozenset(), coming: tuple[int, ...] = ()) -> list[Path]:
    """The step folders `prune_checkpoints` deletes, now or once the `coming` steps are written too."""
    pointers = ("best",) if coming else ("best", "latest")
    kept = set(pinned) | {folder.name for which in pointers if (folder := pointer(root, which))}
    existing = step_folders(root)
    steps = sorted({int(p.name.removeprefix("step_")) for p in existing} | set(coming))
    newest = set(steps[-keep:])
    return [p for p in existing if int(p.name.removeprefix("step_")) not in newest and p.name not in kept]


def load_state(folder: Path) -> dict[str, Any]:
    """Read state.json and verify the tensor files against their stored checksums."""
    try:
        state = parse_json(read_text(folder / "state.json"))
    except (FileNotFoundError, ValueError):  # ValueError: not UTF-8, or not JSON
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict):
        raise UserError(f"{folder}/state.json is missing or corrupt; resume from another checkpoint.")
    for name, digest in state["files"].items():
        path = folder / name
        if not path.exists() or sha256_file(path) != digest:
            raise UserError(f"{path} is truncated or corrupt (checksum mismatch); resume from another checkpoint.")
    return state


def load_checkpoint(folder: Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load weights (and optimizer state) into objects already on their device; return the JSON state. Read into
    host memory and copied into the tensors held, so a rollback mid-training adds nothing to the device's memory."""
    from safetensors.torch import load_model

    state = load_state(folder)
    try:
        load_model(model, str(folder / "model.safetensors"), device="cpu")
    except RuntimeError as err:  # missing, unexpected or differently shaped tensors
        detail = [line.strip() for line in str(err).splitlines() if line.strip()][-1]
        raise UserError(f"{folder}/model.safetensors does not hold the model that config.toml describes "
                        f"({detail}); restore the run's config.toml.")
    if optimizer is not None:
        optimizer.load_state_dict(into_place(optimizer, read_optimizer_state(folder, state)))
    return state


def copy_into(param: torch.Tensor, mine: torch.Tensor | None, saved: torch.Tensor) -> torch.Tensor | None:
    """One process's placer: `saved` copied into the optimizer's tensor of the same shape and dtype."""
    return mine.copy_(saved) if mine is not None and mine.shape == saved.shape and mine.dtype == saved.dtype else None


def into_place(optimizer: Any, saved: dict[str, Any], place: Placer = copy_into) -> dict[str, Any]:
    """`saved` (a state_dict in host memory) with the tensors `place` put into the optimizer's own, so
    `load_state_dict` keeps those rather than allocating new ones beside them."""
    import torch

    live = optimizer.state_dict()["state"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with torch.no_grad():
        for index, entries in saved["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    placed = place(params[index], live.get(index, {}).get(key), value)
                    entries[key] = value if placed is None else placed
    return saved


def read_optimizer_state(folder: Path, state: dict[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """The optimizer state_dict a checkpoint holds (`state`: its verified state.json)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "optimizer.safetensors"), device=str(device))
    return _unflatten_optimizer(tensors, state["optimizer"])
