"""What a Hugging Face model family is to lmlab: which model options it can express (the export check), how its
config.json becomes a ModelConfig and back, and how its tensors are named and laid out against lmlab's GPT.

Each family maps every lmlab tensor to one or more of its own (`hf_names`): q, k and v are one fused `c_attn`
in lmlab (queries of n_head heads, then keys and values of n_kv_head heads each), as SwiGLU's gate and value are
one `c_fc` (gate first), so those are concatenated on import and split on export along the output dimension.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from lmlab.core.config import ModelConfig
from lmlab.core.errors import UserError
from lmlab.model.gpt import GPT, mlp_width

Rule = tuple[Callable[[ModelConfig], bool], str]
Lookup = Callable[[str], torch.Tensor | None]  # a source tensor by name, as float32; None when it is missing
REQUIRED = object()
# torch's epsilon of each norm: nn.RMSNorm(eps=None)'s on float32 input (the dtype lmlab exports and computes in by
# default), nn.LayerNorm's default
TORCH_EPS = {"rmsnorm": torch.finfo(torch.float32).eps, "layernorm": 1e-5}


ANY_VALUE: Rule = (lambda cfg: True, "")  # an option the family expresses whatever its value


def equals(field: str, *allowed: Any) -> Callable[[ModelConfig], bool]:
    return lambda cfg: getattr(cfg, field) in allowed


def read(raw: dict[str, Any], key: str, path: Path, kind: type | tuple[type, ...] = int, default: Any = REQUIRED,
         positive: bool = True) -> Any:
    """config.json's `key`, checked for type (and sign): a file that lies gets one sentence, not a traceback."""
    if key not in raw or raw[key] is None:
        if default is REQUIRED:
            raise UserError(f"{path} has no {key}; it is not a complete Hugging Face config.json.")
        return default
    value = raw[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)) or (isinstance(value, (int, float))
            and not isinstance(value, bool) and (not math.isfinite(value) or (positive and value <= 0))):
        raise UserError(f"{path}: {key} is {value!r}, not a {'positive ' if positive else ''}"
                        f"{getattr(kind, '__name__', 'number')}; the file is damaged or not a model's config.")
    return value


def refuse(path: Path, key: str, value: Any, why: str) -> UserError:
    return UserError(f"{path}: {key} = {value!r} {why}, which lmlab's model does not compute; import-hf takes the "
                     "standard variant of the family.")


def default_eps(cfg: ModelConfig) -> float:
    """The epsilon lmlab's norms use, as a number for config.json."""
    return cfg.norm_eps or TORCH_EPS[cfg.norm]


def own_eps(eps: float, norm: str) -> float:
    """config.json's epsilon as model.norm_eps: torch's default of the norm becomes 0, so a run that went out
    and came back has the config it left with."""
    return 0.0 if eps == TORCH_EPS[norm] else float(eps)


@dataclasses.dataclass(frozen=True)
class Family:
    """One Hugging Face architecture. Subclasses fill in the mapping; `rules` names every ModelConfig field with
    a check and the reason the family cannot hold what the check refuses. A field missing from the rules is
    refused, so an option added to the model later stays unexportable until a family is taught it."""

    name: str  # what --arch calls it, and config.json's model_type
    architecture: str  # config.json's architectures[0], the class AutoModelForCausalLM builds
    rules: dict[str, Rule]

    def problems(self, cfg: ModelConfig) -> list[str]:
        """One sentence per model option this family cannot express; empty when export can go."""
        problems = []
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.name not in self.rules:
                problems.append(f"model.{f.name} = {value!r} is an option export-hf does not know, so it cannot tell "
                                f"whether {self.name} can express it.")
            elif not self.rules[f.name][0](cfg):
                problems.append(f"model.{f.name} = {value!r} cannot be exported: {self.rules[f.name][1]}.")
        return problems

    def model_options(self, raw: dict[str, Any], path: Path) -> dict[str, Any]:
        """The ModelConfig fields of a config.json of this family, refusing variants lmlab's model computes
        otherwise."""
        raise NotImplementedError

    def window(self, raw: dict[str, Any], path: Path) -> int | None:
        """The sliding window some layers of a config.json attend within; None: every layer sees the whole context."""
        return None

    def write_config(self, cfg: ModelConfig, eot_id: int | None) -> dict[str, Any]:
        raise NotImplementedError

    def hf_names(self, name: str) -> list[str]:
        """The family's tensor names that make up lmlab's tensor `name`, in the order they are concatenated."""
        raise NotImplementedError

    def transposed(self, hf_name: str) -> bool:
        """Whether the family stores this tensor as (in, out) rather than nn.Linear's (out, in)."""
        return False

    @torch.no_grad()
    def load(self, lookup: Lookup, model: GPT) -> None:
        """Copy each part of the model's tensors (`parts`) from the family's tensor, one at a time (never holding a
        second copy of the model): renamed, transposed, a position table cut to the context import-hf cut short; the
        rows that pad the token table and head past the vocabulary (never looked up) zeroed."""
        for table in (model.transformer.wte.weight, model.lm_head.weight):
            table[model.config.vocab_size:] = 0
        for hf_name, part in self.parts(model):
            value = lookup(hf_name)
            if value is None:
                raise UserError(f"the weights have no tensor {hf_name}; the checkpoint is incomplete or not "
                                f"{self.name}.")
            value = value.t() if self.transposed(hf_name) else value
            if hf_name.endswith("wpe.weight"):
                value = value[:part.shape[0]]  # a context cut short by import-hf --block-size
            if value.shape != part.shape:
                raise UserError(f"the weights' {hf_name} has shape {tuple(value.shape)} but config.json "
                                f"implies {tuple(part.shape)}; the two do not belong together.")
            part.copy_(value)

    def parts(self, model: GPT) -> Iterator[tuple[str, torch.Tensor]]:
        """(the family's name, tensor) of each part of the model's tensors, in lmlab's (out, in) layout, the
        vocabulary padding cut off; a tied head is left out: transformers and llama.cpp alike take the token table
        for it when the file has none."""
        cfg = model.config
        kv = cfg.kv_heads * cfg.head_size
        for name, value in model.state_dict().items():
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            if name.endswith(("wte.weight", "lm_head.weight")):
                value = value[:cfg.vocab_size]
            names = self.hf_names(name)
            # a fused tensor divides along dim 0 into the family's: q, k and v, or gate and up
            sizes = [cfg.n_head * cfg.head_size, kv, kv] if ".attn.c_attn." in name else [mlp_width(cfg)] * 2
            yield from zip(names, value.split(sizes) if len(names) > 1 else [value])

    def from_lmlab(self, model: GPT) -> dict[str, torch.Tensor]:
        """The model's tensors under the family's names and layouts, the vocabulary padding cut off."""
        return {hf_name: (part.t() if self.transposed(hf_name) else part).detach().float().contiguous().cpu()
                for hf_name, part in self.parts(model)}
