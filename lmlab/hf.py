"""Import and export of Hugging Face GPT-2 checkpoints (`config.json` + `model.safetensors`).

An imported checkpoint becomes an ordinary run dir (config.toml, checkpoints/step_000000, tokenizer.json,
dataset.json, metrics.jsonl) that eval, sample, finetune and serve accept. Export writes the reverse, for
`transformers.AutoModelForCausalLM.from_pretrained`. Only GPT-2's own architecture crosses either way:
every model option is checked against the table `EXPORTABLE` before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lmlab.checkpoint import model_tensors, save_tensors
from lmlab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from lmlab.data.tokenizers import EOT, Tokenizer, load_gpt2, parse_spec
from lmlab.errors import UserError
from lmlab.fileio import atomic_write_text, fsync_dir, sha256_file, writing
from lmlab.model import build_model
from lmlab.model.gpt import GPT
from lmlab.rundir import RunDir

# transformers stores these four as Conv1D weights, (in, out): the transpose of nn.Linear's (out, in).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Hugging Face's activation_function -> model.gelu_approx; "gelu_new" is OpenAI's tanh approximation.
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which lmlab's model uses

def _ANY(cfg: ModelConfig) -> bool:
    return True


def _is(field: str, *allowed: Any) -> Callable[[ModelConfig], bool]:
    return lambda cfg: getattr(cfg, field) in allowed


# Every ModelConfig field export understands: a check and why GPT-2 cannot hold the values it refuses. A field
# missing here is refused, so an option added to the model later stays unexportable until it is taught here.
# kind, pos_emb, norm, mlp, qk_norm, tie_embeddings and n_kv_head are the architecture options planned
# alongside this module, listed with the values GPT-2 can express so they export the day they land.
EXPORTABLE: dict[str, tuple[Callable[[ModelConfig], bool], str]] = {
    "n_layer": (_ANY, ""),
    "n_head": (_ANY, ""),
    "n_embd": (_ANY, ""),
    "block_size": (_ANY, ""),
    "vocab_size": (_ANY, ""),
    "dropout": (_ANY, ""),  # a training setting; the exported config turns dropout off
    "gelu_approx": (_ANY, ""),  # both exist in transformers: "gelu" and "gelu_new"
    "bias": (_is("bias", True), "GPT-2 has a bias in every linear layer and LayerNorm"),
    "kind": (_is("kind", "gpt"), "GPT-2 is a transformer, not a recurrent model"),
    "rnn_cell": (_ANY, ""),  # read only by the recurrent model, which `kind` refuses
    "pos_emb": (_is("pos_emb", "learned"), "GPT-2 learns one embedding per position and has no rotary ones"),
    "norm": (_is("norm", "layernorm"), "GPT-2 normalises with LayerNorm, not RMSNorm"),
    "mlp": (_is("mlp", "gelu"), "GPT-2's MLP is a GELU feed-forward layer, not SwiGLU"),
    "qk_norm": (_is("qk_norm", False), "GPT-2 does not normalise queries and keys"),
    "tie_embeddings": (_is("tie_embeddings", True), "GPT-2 shares its token embedding with the output head"),
    "n_kv_head": (lambda cfg: cfg.n_kv_head in (0, cfg.n_head),
                  "GPT-2 gives every query head its own key and value head (no grouped-query attention)"),
}


def export_problems(cfg: ModelConfig) -> list[str]:
    """One sentence per model option that GPT-2's architecture cannot express; empty when export can go."""
    problems = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in EXPORTABLE:
            problems.append(f"model.{f.name} = {value!r} is an option export-hf does not know, so it cannot tell "
                            "whether GPT-2 can express it.")
        elif not EXPORTABLE[f.name][0](cfg):
            problems.append(f"model.{f.name} = {value!r} cannot be exported: {EXPORTABLE[f.name][1]}.")
    return problems


def _read_hf_config(folder: Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face GPT-2 config.json, refusing variants lmlab's model would compute
    differently (another activation, LayerNorm epsilon, MLP width or attention scaling)."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass a Hugging Face GPT-2 folder (config.json + model.safetensors).")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; re-download the checkpoint.")
    if raw.get("model_type") != "gpt2":
        raise UserError(f"{path} describes a {raw.get('model_type')!r} model; import-hf reads GPT-2 checkpoints only.")
    activation = raw.get("activation_function", "gelu_new")
    differs = {
        "activation_function": activation not in ACTIVATIONS,
        "layer_norm_epsilon": raw.get("layer_norm_epsilon", LAYER_NORM_EPS) != LAYER_NORM_EPS,
        "n_inner": raw.get("n_inner") not in (None, 4 * raw.get("n_embd", 0)),
        "scale_attn_weights": raw.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": raw.get("scale_attn_by_inverse_layer_idx", False) is not False,
        "tie_word_embeddings": raw.get("tie_word_embeddings", True) is not True,
    }
    for key, bad in differs.items():
        if bad:
            raise UserError(f"{path}: {key} = {raw.get(key)!r} is a GPT-2 variant lmlab's model does not compute; "
                            "import-hf takes standard GPT-2 checkpoints.")
    sizes = {key: raw.get(key) for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")}
    for key, value in sizes.items():
        if type(value) is not int or value < 1:
            raise UserError(f"{path}: {key} is {value!r}; a GPT-2 config.json holds a positive integer there.")
    return ModelConfig(n_layer=sizes["n_layer"], n_head=sizes["n_head"], n_embd=sizes["n_embd"],
                       block_size=sizes["n_positions"], dropout=0.0, bias=True, vocab_size=sizes["vocab_size"],
                       gelu_approx=ACTIVATIONS[activation])


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise UserError(f"{path} does not exist; import-hf reads safetensors weights (save the model with "
                        "save_pretrained, which writes them).")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err}); it is truncated or not a checkpoint: "
                        "download it again.")


def _hf_to_lmlab(tensors: dict[str, torch.Tensor], model: GPT) -> dict[str, torch.Tensor]:
    """Rename, transpose and pad a transformers GPT-2 state dict into `model`'s."""
    # GPT2LMHeadModel saves under `transformer.`; OpenAI's original upload (GPT2Model) has no prefix.
    hf = {k.removeprefix("transformer."): v.float() for k, v in tensors.items()}
    state = {}
    for name, target in model.state_dict().items():
        key = "wte.weight" if name == "lm_head.weight" else name.removeprefix("transformer.")
        if key not in hf:
            raise UserError(f"model.safetensors has no tensor {key}; the checkpoint is incomplete or not GPT-2.")
        value = hf[key].t() if key.endswith(CONV1D) else hf[key]
        if key == "wte.weight":  # restore the padding rows lmlab adds to large vocabularies (never looked up)
            value = torch.cat([value, value.new_zeros(target.size(0) - value.size(0), value.size(1))])
        if value.shape != target.shape:
            raise UserError(f"model.safetensors: {key} has shape {tuple(value.shape)} but config.json implies "
                            f"{tuple(target.shape)}; the two files do not belong together.")
        state[name] = value
    return state


def _lmlab_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """The inverse of `_hf_to_lmlab`: transformers names and layouts, the vocab padding cut off, and the head
    left out (transformers ties it to wte on load)."""
    out = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name == "transformer.wte.weight":
            value = value[:model.config.vocab_size]
        out[name] = (value.t() if name.endswith(CONV1D) else value).detach().float().contiguous().cpu()
    return out


def _fresh_dir(path: Path, what: str) -> Path:
    """A temporary sibling of `path` to build in; `path` itself must be new or empty, as nothing is overwritten."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path} already exists; choose a new {what} or remove it first.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _move_into_place(tmp: Path, path: Path) -> None:
    fsync_dir(tmp)
    try:
        if path.exists():
            path.rmdir()  # empty, checked by _fresh_dir
        os.replace(tmp, path)
    except OSError:  # another process wrote `path` meanwhile (not through lmlab, which locks it)
        raise UserError(f"{path} was created by another process meanwhile; choose a new folder.")
    fsync_dir(path.parent)


def _hf_tokenizer(folder: Path, vocab_size: int) -> Tokenizer | None:
    """The checkpoint's tokenizer if its folder has one; it must cover exactly the model's vocabulary."""
    if not any((folder / name).exists() for name in ("tokenizer.json", "vocab.json")):
        return None
    tokenizer = load_gpt2(folder)
    if tokenizer.vocab_size != vocab_size:
        raise UserError(f"the tokenizer in {folder} has {tokenizer.vocab_size} tokens but config.json says "
                        f"vocab_size {vocab_size}; they do not belong together.")
    return tokenizer


def import_hf(folder: Path, run_dir: Path) -> dict[str, Any]:
    """Write a Hugging Face GPT-2 checkpoint folder as an lmlab run; returns what was imported."""
    folder, run_dir = Path(folder), Path(run_dir)
    with RunDir(run_dir).locked():  # a second import into the same --out is refused, not raced
        tmp = _fresh_dir(run_dir, "--out run dir")
        try:
            result = _import_into(folder, tmp)
            _move_into_place(tmp, run_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"run": str(run_dir), **result}


def _import_into(folder: Path, tmp: Path) -> dict[str, Any]:
    """Write the run into the empty folder `tmp` (renamed into place once whole)."""
    model_cfg = _read_hf_config(folder)
    weights = folder / "model.safetensors"
    model = build_model(model_cfg)  # refuses a size this machine cannot hold, before allocating it
    model.load_state_dict(_hf_to_lmlab(_read_weights(weights), model))
    tokenizer = _hf_tokenizer(folder, model_cfg.vocab_size)
    # An imported run has no dataset of its own: `lmlab eval --dataset DIR` names one.
    cfg = RunConfig(DataConfig(dataset=""), model_cfg, TrainConfig())
    facts = {"tokenizer": None, "vocab_size": model_cfg.vocab_size}
    if tokenizer is not None:
        facts.update(tokenizer="gpt2", eot_id=tokenizer.eot_id)
    with RunDir(tmp).locked() as run:
        run.begin("imported", model, cfg, facts, origin={"source": str(folder.resolve()), "format": "huggingface gpt2",
                                                         "weights_sha256": sha256_file(weights)})
        run.write_setup(cfg, tokenizer, facts)
        run.save_checkpoint(0, model_tensors(model), torch.optim.AdamW(model.parameters()).state_dict(), None,
                            best=True, keep=1)
        run.log({"event": "end", "step": 0, "tokens": 0, "elapsed": 0.0, "stopped_early": False, "stopped_by": None})
    return {"params": model.num_params(), "model": model_cfg, "tokenizer": facts["tokenizer"]}


def _hf_config(cfg: ModelConfig, eot_id: int | None) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "n_inner": None, "activation_function": "gelu_new" if cfg.gelu_approx == "tanh" else "gelu",
        "layer_norm_epsilon": LAYER_NORM_EPS, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": "float32",
    }


def _write_tokenizer(tokenizer: Tokenizer, out: Path, block_size: int) -> None:
    """tokenizer.json for the fast tokenizer, plus OpenAI's vocab.json + merges.txt for the slow one."""
    tokenizer.save(out / "tokenizer.json")
    tokenizer.backend.model.save(str(out))
    settings = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, "add_prefix_space": False,
                "bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    atomic_write_text(out / "tokenizer_config.json", json.dumps(settings, indent=2))


def export_hf(run_dir: Path, out: Path, checkpoint: str = "best") -> dict[str, Any]:
    """Write a run's model as a Hugging Face GPT-2 folder; returns what was written and what was left out."""
    problems = export_problems(RunDir(run_dir).config().model)
    if problems:
        raise UserError(f"{run_dir} cannot be exported as GPT-2: " + " ".join(problems))
    run = RunDir(run_dir).load(checkpoint, "cpu", need_tokenizer=False)
    tokenizer = run.tokenizer
    # GPT2TokenizerFast reproduces byte-level BPE exactly; char and word tokenizers have no GPT-2 counterpart.
    byte_level = tokenizer is not None and parse_spec(tokenizer.spec)[0] in ("bpe", "gpt2")
    out = Path(out)
    tmp = _fresh_dir(out, "output folder")
    try:
        with writing(out):
            save_tensors(_lmlab_to_hf(run.model), tmp / "model.safetensors", metadata={"format": "pt"})
        eot_id = tokenizer.eot_id if byte_level else None
        atomic_write_text(tmp / "config.json", json.dumps(_hf_config(run.config.model, eot_id), indent=2))
        if byte_level:
            _write_tokenizer(tokenizer, tmp, run.config.model.block_size)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    skipped = None if byte_level else f"tokenizer {tokenizer.spec if tokenizer else '(none)'} is not byte-level BPE"
    return {"out": str(out), "checkpoint": run.checkpoint, "step": run.step, "tokenizer_skipped": skipped}
