"""Models in and out of lmlab: Hugging Face folders of the GPT-2, Llama, Qwen2 and Qwen3 families. `import_hf` turns
a folder into an ordinary run dir; `export_hf` writes a run for transformers' Auto classes. Neither needs
transformers."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import torch

from lmlab.core.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from lmlab.core.errors import UserError
from lmlab.core.fileio import writing
from lmlab.data.tokenizers import EOT, GPT2_DIR_ENV, UNK, Tokenizer, json_object, load_gpt2, load_pretrained, parse_spec
from lmlab.hf.family import Family
from lmlab.hf.folder import (
    Weights,
    building,
    read_config,
    write_generation_config,
    write_json,
    write_tokenizer,
)
from lmlab.hf.gpt2 import FAMILY as GPT2
from lmlab.hf.llama import LLAMA, QWEN2, QWEN3
from lmlab.model import build_model
from lmlab.model.gpt import GPT
from lmlab.run.chat import read_chat_template
from lmlab.run.checkpoint import model_tensors, save_tensors
from lmlab.run.rundir import RunDir, check_steps
from lmlab.train.optim import optimizer_of

FAMILIES = {family.name: family for family in (GPT2, LLAMA, QWEN2, QWEN3)}  # `auto` takes the first that fits
ARCHS = ("auto", *FAMILIES)


def choose_family(cfg: ModelConfig, arch: str = "auto", what: str = "the model") -> Family:
    """The family a model exports as: `arch`, or for `auto` the first of FAMILIES that expresses every option.
    `what` names it in errors."""
    if arch not in ARCHS:
        raise UserError(f"--arch {arch} is unknown; use {', '.join(ARCHS)}.")
    candidates = list(FAMILIES.values()) if arch == "auto" else [FAMILIES[arch]]
    closest = min(candidates, key=lambda family: len(family.problems(cfg)))  # the first, on a tie
    problems = closest.problems(cfg)
    if problems:
        which = f"as {arch}" if arch != "auto" else (f"as any of {', '.join(FAMILIES)} (closest: {closest.name})")
        raise UserError(f"{what} cannot be exported {which}: " + " ".join(problems))
    return closest


def _model_config(raw: dict[str, Any], path: Path, block_size: int | None) -> tuple[Family, ModelConfig]:
    """The family of a config.json and the model it describes, its context cut to `block_size`."""
    family = FAMILIES.get(str(raw.get("model_type")))
    if family is None:
        raise UserError(f"{path} describes a {raw.get('model_type')!r} model; import-hf reads "
                        f"{', '.join(FAMILIES)} models.")
    options = family.model_options(raw, path)
    try:
        cfg = ModelConfig(**options)
    except UserError as err:
        raise UserError(f"{path} describes a model lmlab cannot build: {err}")
    if block_size is not None:
        if not 1 <= block_size <= cfg.block_size:
            raise UserError(f"--block-size {block_size} must be between 1 and the model's context, {cfg.block_size} "
                            "(a model does not know positions past the ones it was trained on).")
        cfg = dataclasses.replace(cfg, block_size=block_size)
    window = family.window(raw, path)
    if window is not None and window < cfg.block_size:
        raise UserError(f"{path}: use_sliding_window = True with sliding_window = {window} attends to the last "
                        f"{window} tokens alone in some layers, fewer than the context imported ({cfg.block_size}), "
                        f"which lmlab's model does not compute; import it with --block-size {window} or less, "
                        "where that is full attention.")
    return family, cfg


def _tokenizer(folder: Path, given: Path | None, family: Family, vocab_size: int) -> Tokenizer:
    """The imported model's tokenizer: --tokenizer, else the folder's own, else (GPT-2) $LMLAB_GPT2_DIR's. A run
    cannot sample without one."""
    if given is not None or any((folder / name).exists() for name in ("tokenizer.json", "vocab.json")):
        where, tokenizer = str(given or folder), load_pretrained(given or folder)
    elif family is GPT2 and os.environ.get(GPT2_DIR_ENV):
        where, tokenizer = f"${GPT2_DIR_ENV}", load_gpt2()
    else:
        raise UserError(f"{folder} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt), and a run "
                        "without a tokenizer cannot sample, serve or be evaluated; pass --tokenizer DIR_OR_FILE "
                        f"naming the model's tokenizer{f' (or set ${GPT2_DIR_ENV})' if family is GPT2 else ''}.")
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"the tokenizer in {where} has {tokenizer.vocab_size:,} tokens but the model only "
                        f"{vocab_size:,} embedding rows (vocab_size in config.json); it is not this model's tokenizer.")
    check_label(tokenizer, where)
    _check_evidence(tokenizer, where, folder, vocab_size)
    return tokenizer


PADDING_MULTIPLE = 128  # vocabularies are padded to a multiple of at most this (Qwen, Pythia), or by a few percent
PADDING_SHARE = 1 / 32  # (DeepSeek: 100,015 tokens in 102,400 rows)


def _check_evidence(tokenizer: Tokenizer, where: Path | str, folder: Path, rows: int) -> None:
    """Refuse a tokenizer the model's own files contradict: one that reaches far fewer embedding rows than padding
    leaves unused (samples there decode to nothing), or whose bos or eos token is missing or ordinary text."""
    tokens = tokenizer.vocab_size
    padded = max(-(-tokens // PADDING_MULTIPLE) * PADDING_MULTIPLE, math.ceil(tokens / (1 - PADDING_SHARE)))
    problem = (f"it has {tokens:,} tokens for the model's {rows:,} embedding rows (vocab_size in config.json), "
               f"{rows - tokens:,} rows no id of it reaches, more than padding leaves" if rows > padded else
               _special_problem(tokenizer, folder))
    if problem:
        raise UserError(f"the tokenizer in {where} is not this model's: {problem}; pass the model's own tokenizer "
                        "with --tokenizer DIR_OR_FILE.")


def _special_problem(tokenizer: Tokenizer, folder: Path) -> str | None:
    """What contradicts the tokenizer in the model's bos and eos ids: an id it lacks, or holds as text."""
    specials = tokenizer.backend.get_added_tokens_decoder()
    for name in ("config.json", "generation_config.json"):
        facts = json_object(folder / name)  # config.json was read already; generation_config.json is optional
        for key in ("eos_token_id", "bos_token_id"):
            ids = facts.get(key)
            for id_ in ids if isinstance(ids, list) else [ids]:
                if not isinstance(id_, int) or isinstance(id_, bool) or id_ in specials:
                    continue
                token = tokenizer.backend.id_to_token(id_) if id_ >= 0 else None
                if token is None or len(token) == 1:  # no model ends its text with one character of it
                    return (f"the model's {key} {id_} ({name}) is no token of it" if token is None else
                            f"the model's {key} {id_} ({name}) is its {token!r}, one character of text, not a "
                            "special token")
    return None


def check_label(tokenizer: Tokenizer, where: Path | str) -> None:
    """Refuse a tokenizer.json that is not the tokenizer its label (spec) says: ids it lacks would decode to
    nothing."""
    expected = tokenizer.kind.model
    if expected is None:
        return
    model, size = type(tokenizer.backend.model).__name__, parse_spec(tokenizer.spec)[1]
    plain = [t for t in tokenizer.vocab if t not in (UNK, EOT)]
    single = all(len(t) == 1 for t in plain)
    # A WordLevel vocabulary of single characters is a char tokenizer; a byte-level one may be of single characters
    # and still not be one (each token a byte).
    if model != expected or tokenizer.kind.per_character != (single and model == "WordLevel"):
        found = (f"a {model} vocabulary of {len(tokenizer.vocab):,} tokens" +
                 (", each one character (a char tokenizer)" if model == "WordLevel" and single else ""))
    elif size and tokenizer.vocab_size > size + (2 if tokenizer.kind.unknown else 0):
        found = f"a vocabulary of {tokenizer.vocab_size:,} tokens"
    else:
        return
    raise UserError(f"the tokenizer in {where} is labelled {tokenizer.spec} (lmlab_tokenizer in tokenizer_config.json, "
                    f"or the spec of the run or dataset) but its tokenizer.json holds {found}; it is not the tokenizer "
                    "the label names: put the model's own tokenizer.json back, or correct the label.")


def import_hf(folder: Path, run_dir: Path, tokenizer: Path | None = None,
              block_size: int | None = None) -> dict[str, Any]:
    """Write a Hugging Face folder of a family lmlab computes as a run; `block_size` cuts its context shorter.
    Returns what was imported."""
    folder, run_dir = Path(folder), Path(run_dir)
    raw = read_config(folder)
    family, model_cfg = _model_config(raw, folder / "config.json", block_size)
    tok = _tokenizer(folder, tokenizer and Path(tokenizer), family, model_cfg.vocab_size)
    chat = read_chat_template(folder, tok)
    weights = Weights(folder)
    # a second import into the same --out is refused, not raced
    with RunDir(run_dir).locked(), building(run_dir, "--out run dir") as tmp:
        model = build_model(model_cfg)  # refuses a size this machine cannot hold, before allocating it
        assert isinstance(model, GPT), "every family is lmlab's kind gpt"
        family.load(weights, model)
        # An imported run has no dataset of its own: `lmlab eval --dataset DIR` names one.
        cfg = RunConfig(DataConfig(dataset=""), model_cfg, TrainConfig())
        facts = {"tokenizer": tok.spec, "vocab_size": model_cfg.vocab_size, "eot_id": tok.eot_id}
        with RunDir(tmp).locked() as run:
            # The dtype the weights were published in (transformers 4's torch_dtype, 5's dtype): an fp16 GPU
            # computes bf16-born weights in fp32 (RunDir.weights_dtype).
            origin = {"source": str(folder.resolve()), "format": f"huggingface {family.name}",
                      "weights_sha256": weights.sha256(), "dtype": raw.get("torch_dtype") or raw.get("dtype")}
            run.begin("imported", model, cfg, facts, origin=origin)
            run.write_setup(cfg, tok, facts, chat=chat)
            optimizer = optimizer_of(cfg.train).build(model, cfg.train, torch.device("cpu"))
            run.save_checkpoint(0, model_tensors(model), optimizer.state_dict(), None, best=True, keep=1)
            run.log({"event": "end", "step": 0, "tokens": 0, "elapsed": 0.0, "stopped_early": False,
                     "stopped_by": None})
    return {"run": str(run_dir), "family": family.name, "params": model.num_params(), "model": model_cfg,
            "tokenizer": tok.spec, "chat_template": chat}


def export_hf(run_dir: Path, out: Path, checkpoint: str = "best", arch: str = "auto") -> dict[str, Any]:
    """Write a run's model as a Hugging Face folder of the family `arch`, with its tokenizer files when it has a
    tokenizer. The vocabulary is exactly the model's rows, so transformers' next-token distribution is lmlab's."""
    run_dir, out = Path(run_dir), Path(out)
    model = RunDir(run_dir).config().model
    if model.kind != "gpt":
        raise UserError(f"{run_dir} is a {model.kind} model, and export-hf writes lmlab's transformers (kind gpt) as "
                        f"{', '.join(FAMILIES)}; its weights are safetensors already, in "
                        f"{run_dir / 'checkpoints' / 'step_*' / 'model.safetensors'} (its own tensor names, each tied "
                        "weight once).")
    family = choose_family(model, arch, str(run_dir))
    check_steps([run_dir], checkpoint)  # a step the run has not is refused before anything is written
    with building(out, "output folder") as tmp:
        run = RunDir(run_dir).load(checkpoint, "cpu", need_tokenizer=False)
        tokenizer = run.tokenizer_or_none
        assert isinstance(run.model, GPT), "a run of kind gpt was asked for"
        eot_id = tokenizer.eot_id if tokenizer else None
        with writing(out):
            save_tensors(family.from_lmlab(run.model), tmp / "model.safetensors", metadata={"format": "pt"})
        write_json(tmp / "config.json", family.write_config(run.config.model, eot_id))
        write_generation_config(tmp, tokenizer, run.chat_template)
        if tokenizer is not None:  # only runs imported without one, before import-hf refused that
            write_tokenizer(tmp, tokenizer, run.config.model.block_size, run.chat_template)
    return {"out": str(out), "family": family.name, "checkpoint": run.checkpoint, "step": run.step,
            "tokenizer": tokenizer.spec if tokenizer else None}
