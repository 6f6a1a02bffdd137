"""Model kinds from other packages, registered under the `lmlab.models` entry point group: called with the run's
ModelConfig, they return a `LanguageModel`, checked so a plugin's mistake is one sentence naming it. Only installed
entry points load: nothing is imported from a path a config or run folder names."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import torch

from lmlab.core.config import PLUGIN_GROUP, ModelConfig, UnknownKind
from lmlab.core.errors import UserError, classify
from lmlab.model.base import LanguageModel


def _entry_point(kind: str) -> EntryPoint:
    found = [ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name == kind]
    if not found:
        raise UnknownKind(kind)
    return found[0]


def provider(kind: str) -> dict[str, Any]:
    """The installed package that provides a model kind: {"package", "version", "entry_point"}."""
    ep = _entry_point(kind)
    return {"package": ep.dist.name if ep.dist else None, "version": ep.dist.version if ep.dist else None,
            "entry_point": ep.value}


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip() or '-').splitlines()[0]}"


def build_plugin(config: ModelConfig) -> LanguageModel:
    """The model a plugin builds from `config`, or a UserError naming the plugin and its package."""
    ep = _entry_point(config.kind)
    who = f"the model plugin {config.kind!r} (package {ep.dist.name if ep.dist else 'unknown'}, {ep.value})"
    try:
        factory = ep.load()
    except Exception as err:  # a plugin's import can raise anything; what matters is that it failed, and why
        raise UserError(f"{who} fails to import ({_first_line(err)}); fix or reinstall the package.")
    try:
        model = factory(config)
    except UserError:  # the plugin's own sentence, e.g. about an option it does not take
        raise
    except Exception as err:
        raise UserError(f"{who} cannot build a model from [model] and [model.options] ({_first_line(err)}).")
    if not isinstance(model, LanguageModel):
        raise UserError(f"{who} returned a {type(model).__name__}, not a model: its entry point must build an "
                        "lmlab.model.LanguageModel from the ModelConfig.")
    model.config = config  # what training, sampling and checkpoints read the shape from
    model.lmlab_plugin = who  # type: ignore[assignment]  # a Module's stubs take tensors and modules only
    check_forward(model)
    model.forward = _checked(model.forward, who, config.vocab_size)
    return model


def _checked(forward: Any, who: str, vocab: int) -> Any:
    """`forward` with its raises and output shapes checked on every call: a plugin right on the probe's batch may
    fail on a real one."""

    def checked_forward(idx: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        targets = args[0] if args else kwargs.get("targets")
        how = (f"its forward of {'x'.join(map(str, idx.shape))} token ids "
               f"{'with' if targets is not None else 'without'} targets")
        with _named(who, how, idx.device):
            out = forward(idx, *args, **kwargs)
        problem = _output_problem(out, idx.shape[0], idx.shape[1], vocab, targets is not None, check_values=False)
        if problem:
            raise UserError(f"{who}: {how} {problem}; {CONTRACT}")
        return out

    return checked_forward


def check_loss(model: LanguageModel, loss: torch.Tensor, batch: torch.Size) -> None:
    """Refuse a plugin's loss detached from the graph, which backward would fail on or silently train nothing with;
    `batch` is the ids' shape."""
    who = getattr(model, "lmlab_plugin", None)
    if who is not None and loss.grad_fn is None:
        raise UserError(f"{who}: its forward of {'x'.join(map(str, batch))} token ids with targets returned a loss "
                        "detached from its weights (no gradient can reach them: a .detach(), .item() or a constant); "
                        "compute the loss from the logits with torch operations.")


@contextmanager
def backward_named(model: LanguageModel) -> Iterator[None]:
    """A plugin's own raise in the backward pass (a custom autograd Function's) as one sentence naming it."""
    who = getattr(model, "lmlab_plugin", None)
    if who is None:
        yield
        return
    with _named(who, "its backward pass", next(iter(model.parameters()), torch.zeros(())).device, "backward"):
        yield


@torch.no_grad()
def check_forward(model: LanguageModel) -> None:
    """Try a plugin's forward with and without targets on a few ids (finiteness unchecked on meta), refusing what
    would fail deep inside training or sampling, or train on garbage. lmlab's own kinds are not tried."""
    who, vocab = getattr(model, "lmlab_plugin", None), model.config.vocab_size
    if who is None or vocab < 1:  # no vocabulary before its dataset is read
        return
    T = min(3, model.config.block_size)
    B = T + 1  # a batch unlike its length, so logits with the two swapped are told apart
    device = next(iter(model.parameters()), torch.zeros(())).device
    idx = torch.zeros(B, T, dtype=torch.long, device=device)
    for targets in (idx, None):
        how = f"its forward of {B}x{T} token ids {'with' if targets is not None else 'without'} targets"
        problem = _output_problem(_forward(model, idx, targets, who, how), B, T, vocab, targets is not None,
                                  check_values=device.type != "meta")
        if problem:
            raise UserError(f"{who}: {how} {problem}; {CONTRACT}")


CONTRACT = ("forward(idx, targets=None) must return (logits of shape (B, T, vocab_size), the mean loss as one number, "
            "or None without targets).")


def _forward(model: LanguageModel, idx: torch.Tensor, targets: torch.Tensor | None, who: str, how: str) -> Any:
    """The plugin's outputs, in eval mode on a copy of the random state, so trying it draws nothing training would."""
    training = model.training
    try:
        with torch.random.fork_rng(devices=[idx.device] if idx.device.type == "cuda" else []), \
                _named(who, how, idx.device):
            return model.eval()(idx, targets)
    finally:
        model.train(training)


@contextmanager
def _named(who: str, how: str, device: torch.device, part: str = "forward") -> Iterator[None]:
    """A plugin's own raise inside, as one sentence naming it and `how` it was called."""
    try:
        yield
    except Exception as err:  # a plugin's mistake can be any exception
        if _not_the_plugins(err):
            raise
        where = " on the meta device, where lmlab sizes a model before building it" if device.type == "meta" else ""
        raise UserError(f"{who} raised {_first_line(err)} in {how}{where}; fix the plugin's {part}.") from err


def _not_the_plugins(err: Exception) -> bool:
    """Whether `err`, raised inside a plugin, is not its own mistake: lmlab's own, one `classify` knows (out of
    memory, a peer gone), or a reader gone."""
    return (isinstance(err, (UserError, BrokenPipeError)) or type(err).__module__.startswith("lmlab.")
            or classify(err) is not None)


def _output_problem(out: Any, B: int, T: int, vocab: int, targets: bool, check_values: bool) -> str | None:
    """What is wrong with a forward's outputs for (B, T) ids, in a clause; None when nothing is."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        return f"returned {_kind(out)}, not the pair (logits, loss)"
    logits, loss = out
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        return f"returned {_kind(logits)} as its logits, not a tensor of floats"
    if tuple(logits.shape) != (B, T, vocab):
        swapped = " (time before batch)" if tuple(logits.shape) == (T, B, vocab) else ""
        return f"returned logits of shape {tuple(logits.shape)}{swapped}, not ({B}, {T}, {vocab})"
    if targets and (not isinstance(loss, torch.Tensor) or not loss.is_floating_point() or loss.dim() != 0):
        return f"returned {_kind(loss)} as its loss, not one number (a 0-dimensional tensor of floats)"
    if check_values and not (torch.isfinite(logits).all() and (not targets or torch.isfinite(loss))):
        return "returned logits or a loss that are not finite (NaN or infinite)"
    return None


def _kind(value: Any) -> str:
    """`None`, `a tuple of 3`, `a float32 tensor of shape (4, 3)`."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return "None" if value is None else f"a {type(value).__name__}"
