"""A run's model as one of llama.cpp's architectures: its hyperparameter keys, and its tensors under GGUF's names
(the gguf package's own map from a Hugging Face family's names, which `lmlab.hf` already gives each tensor) in
nn.Linear's (out, in) layout, which is GGUF's, at the precision `--type` asks for.

lmlab rotates the two halves of each head (as GPT-NeoX and transformers' Llama do); llama.cpp's `llama`
architecture rotates adjacent pairs, so its query and key rows are interleaved on the way out. `qwen2` and `qwen3`
rotate halves, as lmlab does. llama.cpp's `qwen2` has heads n_embd / n_head wide; one with wider or narrower heads
goes as `llama`, which is Qwen2 with free head widths (and its q, k and v biases).
"""

from __future__ import annotations

from collections.abc import Iterator

import gguf
import torch

from lmlab.core.config import ModelConfig
from lmlab.hf.family import Family
from lmlab.model.gpt import GPT

# --type -> (the GGML type of a matrix, general.file_type); vectors (norms, biases) stay float32.
TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
# config.json's keys, of GPT-2's family and of Llama's -> the GGUF keys llama.cpp reads (GGUFWriter's add_NAME) that
# hold the same figure: an architecture is described once, by the Hugging Face family it exports as.
GGUF_KEYS = {
    "n_positions": "context_length", "max_position_embeddings": "context_length",
    "n_embd": "embedding_length", "hidden_size": "embedding_length",
    "n_inner": "feed_forward_length", "intermediate_size": "feed_forward_length",
    "n_layer": "block_count", "num_hidden_layers": "block_count",
    "n_head": "head_count", "num_attention_heads": "head_count", "num_key_value_heads": "head_count_kv",
    "layer_norm_epsilon": "layer_norm_eps", "rms_norm_eps": "layer_norm_rms_eps", "rope_theta": "rope_freq_base",
    "head_dim": "rope_dimension_count key_length value_length",
}


def arch_name(family: Family, cfg: ModelConfig) -> str:
    """The llama.cpp architecture (general.architecture) of a model the Hugging Face `family` expresses: the family's
    own, but `llama` for a Qwen2 whose heads are not n_embd / n_head wide."""
    return "llama" if family.name == "qwen2" and cfg.head_size * cfg.n_head != cfg.n_embd else family.name


def write_keys(writer: gguf.GGUFWriter, family: Family, cfg: ModelConfig) -> None:
    """The hyperparameters llama.cpp reads, from the config.json `family` writes for the model (`GGUF_KEYS`)."""
    for key, value in family.write_config(cfg, None).items():
        for name in GGUF_KEYS.get(key, "").split():
            getattr(writer, f"add_{name}")(value)


def model_tensors(model: GPT, family: Family, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor) of every weight, under the names the gguf package maps `family`'s to in `arch`,
    the token table and head cut to the vocabulary. `llama` rotates adjacent pairs: its q and k rows are
    interleaved."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.n_layer)
    for hf_name, part in family.parts(model):
        if arch == "llama" and hf_name.split(".")[-2] in ("q_proj", "k_proj"):
            # each head's rows from halves (x0..xn, y0..yn) to pairs (x0, y0, x1, y1, ...)
            halves = part.reshape(-1, 2, model.config.head_size // 2, *part.shape[1:])
            part = halves.transpose(1, 2).reshape(part.shape)
        name_there = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name_there is not None, f"llama.cpp's {arch} has no tensor {hf_name}"
        yield name_there, part.detach().float().cpu()


def ggml_type(tensor: torch.Tensor, wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """What a tensor is stored as: vectors in float32; a matrix as asked, but float16 for q8_0 when its rows do
    not divide into q8_0's blocks of 32."""
    if tensor.dim() < 2:
        return F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if tensor.shape[-1] % block == 0 else F16
