"""Llama (`LlamaForCausalLM`: SmolLM2, TinyLlama, ...), Qwen2 (`Qwen2ForCausalLM`: Qwen2 and Qwen2.5, base and
instruct), which is Llama with biases on q, k and v alone, and Qwen3 (`Qwen3ForCausalLM`), which is Llama with
QK-norm: rotary positions (halves rotated, as transformers' `rotate_half`), RMSNorm, a SwiGLU MLP (SiLU gate),
optional grouped-query attention, head width and untied head; lmlab's model options with those values.

Qwen2 and Qwen3 may attend within a sliding window in some layers; within a context no longer than the window
that is full attention, so such a model imports with its context cut to the window (`window`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lmlab.core.config import ModelConfig
from lmlab.hf.family import ANY_VALUE, Family, Rule, default_eps, equals, own_eps, read, refuse
from lmlab.model.gpt import mlp_width, swiglu_hidden

# lmlab's block tensors -> the family's, concatenated in this order (q, k, v; gate, up).
LAYER_PARTS = {
    "ln_1": ["input_layernorm"], "ln_2": ["post_attention_layernorm"],
    "attn.c_attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "attn.c_proj": ["self_attn.o_proj"],
    "attn.q_norm": ["self_attn.q_norm"], "attn.k_norm": ["self_attn.k_norm"],
    "mlp.c_fc": ["mlp.gate_proj", "mlp.up_proj"], "mlp.c_proj": ["mlp.down_proj"],
}
TOP = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
       "lm_head.weight": "lm_head.weight"}
LAYER = re.compile(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)")

COMMON: dict[str, Rule] = {
    # gelu_approx is read only by the GELU MLP, which `mlp` refuses.
    **{name: ANY_VALUE for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout",
                                          "tie_embeddings", "n_kv_head", "head_dim", "mlp_hidden", "rope_theta",
                                          "norm_eps", "rnn_cell", "gelu_approx")},
    "kind": (equals("kind", "gpt"), "Llama, Qwen2 and Qwen3 are transformers, lmlab's kind gpt"),
    "options": (lambda cfg: not cfg.options, "Llama, Qwen2 and Qwen3 have no options of a model plugin"),
    "pos_emb": (equals("pos_emb", "rope"), "Llama, Qwen2 and Qwen3 rotate queries and keys (RoPE), with no position "
                "table"),
    "norm": (equals("norm", "rmsnorm"), "Llama, Qwen2 and Qwen3 normalise with RMSNorm, not LayerNorm"),
    "mlp": (equals("mlp", "swiglu"), "the MLP of Llama, Qwen2 and Qwen3 is SwiGLU "
            "(SiLU-gated)"),
    "bigram_buckets": (equals("bigram_buckets", 0), "Llama, Qwen2 and Qwen3 embed each token alone, with no table of "
                       "token pairs"),
}
LLAMA_RULES = {**COMMON, "bias": (equals("bias", True, False), "Llama has biases in all of attention and the MLP or "
                                  "in none (attention_bias and mlp_bias); Qwen2 has them on q, k and v alone (--arch "
                                  "qwen2)"),
               "qk_norm": (equals("qk_norm", False), "Llama does not normalise queries and keys; Qwen3 does "
                           "(--arch qwen3)")}
QWEN2_RULES = {**COMMON, "bias": (equals("bias", "qkv"), "Qwen2 has biases on the query, key and value projections "
                                  "and no others (model.bias = \"qkv\"); without them it is Llama (--arch llama)"),
               "qk_norm": (equals("qk_norm", False), "Qwen2 does not normalise queries and keys; Qwen3 does "
                           "(--arch qwen3)")}
QWEN3_RULES = {**COMMON, "bias": (equals("bias", False), "Qwen3 has no biases, in attention or the MLP; Qwen2 has "
                                  "them on q, k and v (--arch qwen2)"),
               "qk_norm": (equals("qk_norm", True), "Qwen3 normalises queries and keys (QK-norm) in every layer; "
                           "Llama does not (--arch llama)")}


def rope_theta(raw: dict[str, Any], path: Path) -> float:
    """The rotary base of a config.json in either layout: transformers 5's `rope_parameters`, or 4's `rope_theta`
    with `rope_scaling`; only the original RoPE (no scaling, every channel rotated) is computed by lmlab."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict) or "full_attention" in params:
        raise refuse(path, "rope_parameters", params, "sets RoPE per layer type")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise refuse(path, "rope_type", kind, "scales the rotary frequencies")
    factor = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise refuse(path, "partial_rotary_factor", factor, "rotates only part of each head")
    return float(read({**raw, **params}, "rope_theta", path, (int, float), 10000.0))


class Llama(Family):
    def model_options(self, raw: dict[str, Any], path: Path) -> dict[str, Any]:
        if read(raw, "hidden_act", path, str, "silu") != "silu":
            raise refuse(path, "hidden_act", raw["hidden_act"], "gates the MLP with another activation than SiLU")
        bias = self._bias(raw, path)
        n_embd, n_head = read(raw, "hidden_size", path), read(raw, "num_attention_heads", path)
        kv = read(raw, "num_key_value_heads", path, default=n_head)
        head_dim = read(raw, "head_dim", path, default=128 if self.name == "qwen3" else n_embd // n_head)
        hidden = read(raw, "intermediate_size", path)
        self.window(raw, path)  # a malformed window is refused at once, whatever the context
        context = read(raw, "max_position_embeddings", path, default=2048 if self.name == "llama" else 32768)
        return dict(
            n_layer=read(raw, "num_hidden_layers", path), n_head=n_head, n_embd=n_embd, block_size=context,
            dropout=0.0, bias=bias, vocab_size=read(raw, "vocab_size", path),
            pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=self.name == "qwen3",
            tie_embeddings=read(raw, "tie_word_embeddings", path, bool, False),
            n_kv_head=0 if kv == n_head else kv, head_dim=0 if head_dim * n_head == n_embd else head_dim,
            mlp_hidden=0 if hidden == swiglu_hidden(n_embd) else hidden, rope_theta=rope_theta(raw, path),
            norm_eps=own_eps(read(raw, "rms_norm_eps", path, (int, float), 1e-6), "rmsnorm"))

    def _bias(self, raw: dict[str, Any], path: Path) -> bool | str:
        """Llama's biases are everywhere or nowhere: its attention_bias and mlp_bias together. Qwen2 has biases on
        q, k and v and nowhere else, whatever its config says (model.bias = "qkv"); Qwen3 has none."""
        attention = read(raw, "attention_bias", path, bool, False)
        if self.name == "qwen2":
            return "qkv"
        if self.name == "qwen3":
            if attention:
                raise refuse(path, "attention_bias", attention, "puts biases in attention but not in the MLP")
            return False
        if read(raw, "mlp_bias", path, bool, False) != attention:
            raise refuse(path, "attention_bias", attention, f"with mlp_bias = {raw.get('mlp_bias', False)} puts "
                         "biases in one half of each block")
        return attention

    def window(self, raw: dict[str, Any], path: Path) -> int | None:
        """The sliding window some layers attend within (Qwen2, Qwen3), or None when every layer attends to the
        whole context. As transformers reads it: only with use_sliding_window, in the layers `layer_types` calls
        sliding_attention, or else those from max_window_layers on."""
        if self.name == "llama" or not read(raw, "use_sliding_window", path, bool, False):
            return None
        layers = read(raw, "num_hidden_layers", path)
        types = raw.get("layer_types")
        if types is None:
            first = read(raw, "max_window_layers", path, default=layers, positive=False)
            types = ["full_attention" if i < first else "sliding_attention" for i in range(layers)]
        if not isinstance(types, list) or not set(types) <= {"full_attention", "sliding_attention"}:
            raise refuse(path, "layer_types", types, "names attention other than full_attention and "
                         "sliding_attention")
        return None if "sliding_attention" not in types else read(raw, "sliding_window", path)

    def write_config(self, cfg: ModelConfig, eot_id: int | None) -> dict[str, Any]:
        config = {
            "architectures": [self.architecture], "model_type": self.name, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd, "intermediate_size": mlp_width(cfg), "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
            "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": default_eps(cfg),
            # Both layouts: transformers 4 reads rope_theta, 5 reads rope_parameters.
            "rope_theta": cfg.rope_theta, "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_bias": cfg.bias, "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": eot_id, "eos_token_id": eot_id, "initializer_range": 0.02, "use_cache": True,
            "torch_dtype": "float32",
        }
        if self.name == "llama":
            return {**config, "mlp_bias": cfg.bias, "pretraining_tp": 1}
        if self.name == "qwen2":
            del config["attention_bias"]  # Qwen2 always has biases on q, k and v, and no others
        return {**config, "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer,
                "layer_types": ["full_attention"] * cfg.n_layer}

    def hf_names(self, name: str) -> list[str]:
        if name in TOP:
            return [TOP[name]]
        match = LAYER.fullmatch(name)
        assert match is not None, f"{name} is neither a top-level tensor of lmlab's GPT nor a layer's"
        layer, part, kind = match.groups()
        return [f"model.layers.{layer}.{hf_part}.{kind}" for hf_part in LAYER_PARTS[part]]


LLAMA = Llama("llama", "LlamaForCausalLM", LLAMA_RULES)
QWEN2 = Llama("qwen2", "Qwen2ForCausalLM", QWEN2_RULES)
QWEN3 = Llama("qwen3", "Qwen3ForCausalLM", QWEN3_RULES)
