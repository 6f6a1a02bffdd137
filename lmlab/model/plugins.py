"""Model kinds from other packages, registered under the `lmlab.models` entry point group: called with the run's
ModelConfig, they return a `LanguageModel`, checked so a plugin's mistake is one sentence naming it. Every call into a
plugin's code (its import, its build, the methods of lmlab's interface it writes, its decode state's) passes one
boundary, `_boundary`. Only installed entry points load: nothing is imported from a path a config or run folder
names."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import torch

from lmlab.core.config import ModelConfig
from lmlab.core.errors import UserError, classify
from lmlab.core.growth import Growth
from lmlab.core.plugin_kinds import PLUGIN_GROUP, UnknownKind
from lmlab.model.base import DecodeState, LanguageModel


def _entry_point(kind: str) -> EntryPoint:
    for found in entry_points(group=PLUGIN_GROUP, name=kind):
        return found
    raise UnknownKind(kind)


def provider(kind: str) -> dict[str, Any]:
    """The installed package that provides a model kind: {"package", "version", "entry_point"}."""
    ep = _entry_point(kind)
    return {"package": ep.dist.name if ep.dist else None, "version": ep.dist.version if ep.dist else None,
            "entry_point": ep.value}


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip() or '-').splitlines()[0]}"


def _loaded(kind: str) -> tuple[Any, str]:
    """A plugin's entry point, imported, and the words that name it and its package."""
    ep = _entry_point(kind)
    who = f"the model plugin {kind!r} (package {ep.dist.name if ep.dist else 'unknown'}, {ep.value})"
    with _boundary(lambda err: f"{who} fails to import ({_first_line(err)}); fix or reinstall the package."):
        return ep.load(), who


def build_plugin(config: ModelConfig) -> LanguageModel:
    """The model a plugin builds from `config`, or a UserError naming the plugin and its package."""
    factory, who = _loaded(config.kind)
    with _boundary(lambda err: f"{who} cannot build a model from [model] and [model.options] ({_first_line(err)})."):
        model = factory(config)
    if not isinstance(model, LanguageModel):
        raise UserError(f"{who} returned a {type(model).__name__}, not a model: its entry point must build an "
                        "lmlab.model.LanguageModel from the ModelConfig.")
    model.config = config  # what training, sampling and checkpoints read the shape from
    model.lmlab_plugin = who  # type: ignore[assignment]  # a Module's stubs take tensors and modules only
    model.__class__ = _guarded(type(model), who)
    check_forward(model)
    return model


DECLARE = ("to be sized, a plugin declares on its entry point which setting is its depth and which its width, each a "
           "[model] field or an \"options.KEY\" of [model.options] that the preset sets to a whole number, as growth = "
           "Growth(depth=\"n_layer\", width=\"n_embd\") (docs/reference/models.md, \"Sizes of your own model\")")


def declared_growth(config: ModelConfig, where: str) -> Growth:
    """How a plugin's model grows (the `growth` its entry point declares), its depth and width each a whole number
    `config` (the preset `where`) sets; or one sentence naming what to declare."""
    factory, who = _loaded(config.kind)
    growth = getattr(factory, "growth", None)
    if not isinstance(growth, Growth):
        raise UserError(f"{where}: {who} declares no growth, so lmlab cannot size it; {DECLARE}.")
    for part in ("depth", "width"):
        value = growth.setting(config, part)
        if type(value) is not int or value < 1:
            raise UserError(f"{where}: {who} declares its {part} as {getattr(growth, part)!r}, which {where} does not "
                            f"set to a whole number ({'it sets none' if value is None else f'it is {value!r}'}); "
                            f"{DECLARE}.")
    return growth


def _guarded(cls: type, who: str) -> type:
    """`cls`, a plugin's model or decode state, as a subclass whose methods of lmlab's interface that the plugin wrote
    each pass `_boundary`; a model's forward has its outputs checked on every call too (a plugin right on the probe's
    batch may fail on a real one). `cls` itself where it wrote none."""
    if (cls, who) in _GUARDED:  # a decode state's class, made again at each new_cache
        return _GUARDED[cls, who]
    interface = LanguageModel if issubclass(cls, LanguageModel) else DecodeState
    names = [name for name, value in vars(interface).items() if not name.startswith("_") and callable(
        getattr(value, "__func__", value))]
    methods: dict[str, Any] = {name: _guarded_method(inspect.getattr_static(cls, name), who, name)
                               for name in names if _plugins(inspect.getattr_static(cls, name))}
    if interface is LanguageModel:
        methods["forward"] = _checked(inspect.getattr_static(cls, "forward"), who)
    _GUARDED[cls, who] = type(cls)(cls.__name__, (cls,), {"__slots__": (), "__module__": cls.__module__,
                                                          "__qualname__": cls.__qualname__, **methods}) \
        if methods else cls
    return _GUARDED[cls, who]


_GUARDED: dict[tuple[type, str], type] = {}


def _plugins(method: Any) -> bool:
    """Whether `method` (as found on a class: a function, classmethod or staticmethod) is a plugin's code, not lmlab's
    default."""
    func = getattr(method, "__func__", method)
    return inspect.isfunction(func) and not func.__module__.startswith("lmlab.")


def _guarded_method(method: Any, who: str, name: str) -> Any:
    """`method` (as found on the class) raising through `_boundary`; a decode state it returns (`new_cache`) guarded
    too."""
    wrapper = type(method) if isinstance(method, (classmethod, staticmethod)) else None
    func = method.__func__ if wrapper is not None else method
    what = f"{name}()" if name in vars(LanguageModel) else f"decode state's {name}()"

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        with _named(who, f"its {what}", _device(args[0]) if args else None, what):
            out = func(*args, **kwargs)
        if isinstance(out, DecodeState):
            out.__class__ = _guarded(type(out), who)
        return out

    return wrapper(guarded) if wrapper is not None else guarded


def _checked(forward: Any, who: str) -> Any:
    """A plugin's `forward`, through `_boundary` and with its outputs' shapes checked."""

    @functools.wraps(forward)
    def checked_forward(self: LanguageModel, idx: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        targets = args[0] if args else kwargs.get("targets")
        how = _how(idx, targets)
        with _named(who, how, idx.device):
            out = forward(self, idx, *args, **kwargs)
        problem = _output_problem(out, idx.shape[0], idx.shape[1], self.config.vocab_size, targets is not None)
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
    with nullcontext() if who is None else _named(who, "its backward pass", _device(model), "backward"):
        yield


@torch.no_grad()
def check_forward(model: LanguageModel) -> None:
    """Try a plugin's forward with and without targets on a few ids, refusing what would fail deep inside training or
    sampling, or train on garbage: its guarded forward (`_checked`) checks what it returns, and here, off the meta
    device, that the logits and loss are finite. lmlab's own kinds are not tried."""
    who = getattr(model, "lmlab_plugin", None)
    if who is None or model.config.vocab_size < 1:  # no vocabulary before its dataset is read
        return
    T = min(3, model.config.block_size)
    B = T + 1  # a batch unlike its length, so logits with the two swapped are told apart
    idx = torch.zeros(B, T, dtype=torch.long, device=_device(model))
    for targets in (idx, None):
        logits, loss = _forward(model, idx, targets)
        if idx.device.type != "meta" and not (logits.isfinite().all() and (targets is None or loss.isfinite())):
            raise UserError(f"{who}: {_how(idx, targets)} returned logits or a loss that are not finite (NaN or "
                            f"infinite); {CONTRACT}")


def _how(idx: torch.Tensor, targets: torch.Tensor | None) -> str:
    """How a forward was called, for a sentence: `its forward of 4x3 token ids with targets`."""
    given = "with" if targets is not None else "without"
    return f"its forward of {'x'.join(map(str, idx.shape))} token ids {given} targets"


CONTRACT = ("forward(idx, targets=None) must return (logits of shape (B, T, vocab_size), the mean loss as one number, "
            "or None without targets).")


def _forward(model: LanguageModel, idx: torch.Tensor, targets: torch.Tensor | None) -> Any:
    """The plugin's outputs, in eval mode on a copy of the random state, so trying it draws nothing training would."""
    training = model.training
    try:
        with torch.random.fork_rng(devices=[idx.device] if idx.device.type == "cuda" else []):
            return model.eval()(idx, targets)
    finally:
        model.train(training)


@contextmanager
def _named(who: str, how: str, device: torch.device | None, part: str = "forward") -> Iterator[None]:
    """A plugin's own raise inside, as one sentence naming it, `how` it was called and what to fix (its `part`)."""
    where = " on the meta device, where lmlab sizes a model before building it" if device and device.type == "meta" \
        else ""
    # a MemoryError may be this machine's memory too
    short = ", or, if this machine ran short of memory, use a smaller batch or model"
    with _boundary(lambda err: f"{who} raised {_first_line(err)} in {how}{where}; fix the plugin's {part}"
                               f"{short if isinstance(err, MemoryError) else ''}."):
        yield


@contextmanager
def _boundary(sentence: Callable[[BaseException], str]) -> Iterator[None]:
    """The one boundary of a call into a plugin's code: whatever it raises (any BaseException, MemoryError included)
    that is the plugin's own becomes a UserError, the `sentence` of it."""
    try:
        yield
    except BaseException as err:
        if _not_the_plugins(err):
            raise
        raise UserError(sentence(err)) from err


# What passes a plugin's call as it came: a stop (Ctrl-C; lmlab's stop signals raise KeyboardInterrupts, `Stopped`
# and `Terminated`, and abandon a step with its own `StepAbandoned`) and an exit asked for. A GeneratorExit is the
# plugin's own: a generator's close throws it at the generator's `yield`, and no call into a plugin holds one.
PASSING = (KeyboardInterrupt, SystemExit)


def _not_the_plugins(err: BaseException) -> bool:
    """Whether `err`, raised inside a plugin, is not its own mistake: a stop or exit (`PASSING`), lmlab's own, a
    device's allocator out of memory, a failure `classify` knows (a peer gone, a size past counting), or a reader gone.
    A MemoryError is the plugin's to name: Python raises it for one allocation, which may be the plugin's bug."""
    return (isinstance(err, (*PASSING, UserError, BrokenPipeError, torch.OutOfMemoryError))
            or type(err).__module__.startswith("lmlab.") or classify(err) not in (None, "memory"))


def _device(obj: Any) -> torch.device | None:
    """The device of a model's weights (a decode state's: none)."""
    return next(iter(obj.parameters()), torch.zeros(())).device if isinstance(obj, torch.nn.Module) else None


def _output_problem(out: Any, B: int, T: int, vocab: int, targets: bool) -> str | None:
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
    return None


def _kind(value: Any) -> str:
    """`None`, `a tuple of 3`, `a float32 tensor of shape (4, 3)`."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return "None" if value is None else f"a {type(value).__name__}"
