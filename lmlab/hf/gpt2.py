"""GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm, a GELU MLP and biases, as lmlab's defaults are.
transformers stores its linear layers as Conv1D weights, (in, out): the transpose of nn.Linear's (out, in)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmlab.core.config import ModelConfig
from lmlab.hf.family import ANY_VALUE, Family, Lookup, Rule, default_eps, equals, own_eps, read, refuse
from lmlab.model.gpt import GPT, mlp_width

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Hugging Face's activation_function -> model.gelu_approx; "gelu_new" is OpenAI's tanh approximation.
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}

RULES: dict[str, Rule] = {
    # Both GELUs exist in transformers ("gelu" and "gelu_new"); rnn_cell is read only by the recurrent model,
    # which `kind` refuses, and rope_theta only with rotary positions, which `pos_emb` refuses.
    **{name: ANY_VALUE for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout",
                                          "tie_embeddings", "mlp_hidden", "norm_eps", "gelu_approx",
                                          "rnn_cell", "rope_theta")},
    "bias": (equals("bias", True), "GPT-2 has a bias in every linear layer and LayerNorm"),
    "kind": (equals("kind", "gpt"), "GPT-2 is a transformer, lmlab's kind gpt"),
    "options": (lambda cfg: not cfg.options, "GPT-2 has no options of a model plugin"),
    "pos_emb": (equals("pos_emb", "learned"), "GPT-2 learns one embedding per position and has no rotary ones"),
    "norm": (equals("norm", "layernorm"), "GPT-2 normalises with LayerNorm, not RMSNorm"),
    "mlp": (equals("mlp", "gelu"), "GPT-2's MLP is a GELU feed-forward layer"),
    "qk_norm": (equals("qk_norm", False), "GPT-2 does not normalise queries and keys"),
    "n_kv_head": (lambda cfg: cfg.kv_heads == cfg.n_head,
                  "GPT-2 gives every query head its own key and value head (no grouped-query attention)"),
    "head_dim": (lambda cfg: cfg.head_size == cfg.n_embd // cfg.n_head, "GPT-2's heads are n_embd / n_head wide"),
    "bigram_buckets": (equals("bigram_buckets", 0), "GPT-2 embeds each token alone, with no table of token pairs"),
}


class GPT2(Family):
    def model_options(self, raw: dict[str, Any], path: Path) -> dict[str, Any]:
        activation = read(raw, "activation_function", path, str, "gelu_new")
        if activation not in ACTIVATIONS:
            raise refuse(path, "activation_function", activation, "is a GPT-2 variant")
        for key, standard in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if read(raw, key, path, bool, standard) is not standard:
                raise refuse(path, key, raw[key], "scales attention otherwise")
        n_embd = read(raw, "n_embd", path, default=768)
        n_inner = read(raw, "n_inner", path, default=4 * n_embd)
        return dict(
            n_layer=read(raw, "n_layer", path, default=12), n_head=read(raw, "n_head", path, default=12),
            n_embd=n_embd, block_size=read(raw, "n_positions", path, default=1024), dropout=0.0, bias=True,
            vocab_size=read(raw, "vocab_size", path, default=50257), gelu_approx=ACTIVATIONS[activation],
            tie_embeddings=read(raw, "tie_word_embeddings", path, bool, True),
            mlp_hidden=0 if n_inner == 4 * n_embd else n_inner,
            norm_eps=own_eps(read(raw, "layer_norm_epsilon", path, (int, float), 1e-5), "layernorm"))

    def write_config(self, cfg: ModelConfig, eot_id: int | None) -> dict[str, Any]:
        return {
            "architectures": [self.architecture], "model_type": self.name, "vocab_size": cfg.vocab_size,
            # n_ctx: OpenAI's configs carry it, and llama.cpp's converter reads the context from it.
            "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": mlp_width(cfg),
            "activation_function": "gelu_new" if cfg.gelu_approx == "tanh" else "gelu",
            "layer_norm_epsilon": default_eps(cfg), "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": eot_id, "eos_token_id": eot_id,
            "torch_dtype": "float32",
        }

    def hf_names(self, name: str) -> list[str]:
        return [name]  # lmlab's GPT keeps GPT-2's names

    def transposed(self, hf_name: str) -> bool:
        return hf_name.endswith(CONV1D)

    def load(self, lookup: Lookup, model: GPT) -> None:
        def either(name: str) -> torch.Tensor | None:  # OpenAI's original upload has no `transformer.` prefix
            found = lookup(name)
            return found if found is not None else lookup(name.removeprefix("transformer."))

        super().load(either, model)


FAMILY = GPT2("gpt2", "GPT2LMHeadModel", RULES)
