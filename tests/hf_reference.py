"""transformers as the reference for import-hf and export-hf: tiny random models of every family lmlab reads and
writes, built with transformers' own config classes (nothing downloads), and the measurements the tests assert
on and `python -m benchmarks.hf_parity` tabulates: logits, greedy continuations, tokenizer ids; and instruct
models' tokenizer folders with the chat templates of Qwen2.5, Llama 3 and Gemma."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import tokenizers
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    pipeline,
)

from lmlab.core.config import SamplingParams
from lmlab.core.config_toml import load_config
from lmlab.data.prepare import PrepareOptions, prepare
from lmlab.data.tokenizers import Tokenizer, load_pretrained
from lmlab.hf import export_hf
from lmlab.inference.generate import stream_ids
from lmlab.run.rundir import RunDir
from lmlab.train.loop import Trainer
from lmlab.train.preflight import train_job
from tests.helpers import tiny_tiktoken, write_config

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64)
# Hugging Face models to import: every family, with and without grouped-query attention and a tied head, and
# away from the defaults where lmlab has an option (rope theta, norm epsilon, MLP and head width, biases).
IMPORTS: dict[str, tuple[type, type, dict]] = {
    "gpt2": (GPT2Config, GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, n_inner=48,
                                               layer_norm_epsilon=1e-6)),
    "llama": (LlamaConfig, LlamaForCausalLM, dict(TINY, tie_word_embeddings=True)),
    "llama untied": (LlamaConfig, LlamaForCausalLM, dict(TINY, tie_word_embeddings=False, rms_norm_eps=1e-5)),
    "llama gqa": (LlamaConfig, LlamaForCausalLM, dict(TINY, num_key_value_heads=2, tie_word_embeddings=True,
                                                      rope_theta=50000.0)),
    "llama gqa untied bias": (LlamaConfig, LlamaForCausalLM, dict(TINY, num_key_value_heads=1, attention_bias=True,
                                                                  mlp_bias=True, tie_word_embeddings=False)),
    # Qwen2.5's shape: q/k/v biases, GQA, a tied head, theta 1e6; a sliding window no shorter than the context.
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(TINY, num_key_value_heads=2, tie_word_embeddings=True,
                                                  rope_theta=1e6, use_sliding_window=True, sliding_window=64,
                                                  max_window_layers=1)),
    "qwen2 untied": (Qwen2Config, Qwen2ForCausalLM, dict(TINY, num_key_value_heads=1, head_dim=16,
                                                         tie_word_embeddings=False, rms_norm_eps=1e-5)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(TINY, num_key_value_heads=2, head_dim=16,
                                                  tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3 untied": (Qwen3Config, Qwen3ForCausalLM, dict(TINY, num_key_value_heads=4, head_dim=8,
                                                         tie_word_embeddings=False)),
}
LLAMA_OPTIONS = ['model.pos_emb="rope"', 'model.norm="rmsnorm"', 'model.mlp="swiglu"', "model.bias=false",
                 "model.n_head=4"]
# lmlab runs to train and export, one per family and head/tie variant; `auto` must pick the family named.
EXPORTS: dict[str, tuple[str, list[str]]] = {
    "gpt2": ("gpt2", ['model.gelu_approx="tanh"', "model.mlp_hidden=48"]),
    "gpt2 untied": ("gpt2", ["model.tie_embeddings=false", "model.norm_eps=1e-6"]),
    "llama": ("llama", LLAMA_OPTIONS),
    "llama untied": ("llama", [*LLAMA_OPTIONS, "model.tie_embeddings=false", "model.norm_eps=1e-5"]),
    "llama gqa": ("llama", [*LLAMA_OPTIONS, "model.n_kv_head=2", "model.rope_theta=50000.0"]),
    "llama gqa untied bias": ("llama", [*LLAMA_OPTIONS, "model.n_kv_head=1", "model.tie_embeddings=false",
                                        "model.bias=true", "model.mlp_hidden=40"]),
    "qwen2": ("qwen2", [*LLAMA_OPTIONS, "model.qkv_bias=true", "model.n_kv_head=2", "model.rope_theta=1e6"]),
    "qwen2 untied": ("qwen2", [*LLAMA_OPTIONS, "model.qkv_bias=true", "model.tie_embeddings=false",
                               "model.head_dim=16", "model.norm_eps=1e-6"]),
    "qwen3": ("qwen3", [*LLAMA_OPTIONS, "model.qk_norm=true", "model.n_kv_head=2", "model.head_dim=16"]),
    "qwen3 untied": ("qwen3", [*LLAMA_OPTIONS, "model.qk_norm=true", "model.tie_embeddings=false",
                               "model.norm_eps=1e-6", "model.rope_theta=1e6"]),
}
KINDS = {"char": "char", "word": "word:200", "bpe": "bpe:300", "gpt2": "gpt2", "tiktoken": "tiktoken:tiny"}
TRAIN = ["train.max_iters=20", "train.eval_interval=20", "train.eval_iters=2", "train.checkpoint_interval=20",
         "train.dtype=float32", "train.compile=false"]


def write_tokenizer_files(folder: Path, tokenizer: Tokenizer) -> None:
    """A Hugging Face folder's tokenizer: tokenizer.json and the eos token in tokenizer_config.json."""
    tokenizer.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": tokenizer.eot_token}))


def tiny_hf(folder: Path, case: str, tokenizer: Tokenizer | None, vocab_size: int = 0, **changes) -> Path:
    """A random model of IMPORTS[case] (with `changes` to its config) saved by transformers, with gains and biases
    drawn away from 1 and 0 (as training leaves them) so that a mix-up of any two tensors shows in the logits."""
    config_class, model_class, options = IMPORTS[case]
    options = {**options, **changes}
    torch.manual_seed(0)
    vocab = vocab_size or tokenizer.vocab_size
    eot = tokenizer.eot_id if tokenizer is not None else None
    model = model_class(config_class(vocab_size=vocab, bos_token_id=eot, eos_token_id=eot, **options))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    model.save_pretrained(folder)
    if tokenizer is not None:
        write_tokenizer_files(folder, tokenizer)
    return folder


def train_run(run: Path, config: Path, options: list[str]) -> Path:
    """A tiny lmlab run: 20 steps of `config` (tests/helpers.py's TINY_CONFIG) with `options`."""
    Trainer(train_job(load_config(config, [*TRAIN, *options]), run, "cpu", console=Console(quiet=True))).run()
    return run


def kind_run(root: Path, kind: str, corpus: Path, gpt2_dir: Path) -> Path:
    """A tiny run of tokenizer KINDS[kind] trained on `corpus` under `root`, exported to `root/<kind>-hf`
    (gpt2 reads GPT-2-format files from `gpt2_dir`, tiktoken a tiny encoding written here)."""
    tiny_tiktoken(root / "tiktoken")
    with mock.patch.dict(os.environ, {"TIKTOKEN_CACHE_DIR": str(root / "tiktoken")}):
        dataset, _, _ = prepare([str(corpus)], KINDS[kind], out_dir=root / "data",
                                options=PrepareOptions(gpt2_dir=gpt2_dir, workers=1))
    run = train_run(root / kind, write_config(root / f"{kind}.toml", dataset), [])
    export_hf(run, root / f"{kind}-hf")
    return run


def random_ids(vocab_size: int, length: int = 30, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    return AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits


@torch.no_grad()
def lmlab_logits(run: Path, ids: torch.Tensor) -> torch.Tensor:
    return RunDir(run).load("best", "cpu").model(ids)[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@torch.no_grad()
def hf_greedy(folder: Path, prompt: list[int], n: int = 20) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def lmlab_greedy(run: Path, prompt: list[int], n: int = 20) -> list[int]:
    model = RunDir(run).load("best", "cpu").model
    return list(stream_ids(model, prompt, SamplingParams(max_new_tokens=n, temperature=0)))


def pipeline_text(folder: Path, prompt: str, n: int = 12) -> str:
    """The prompt and its greedy continuation by transformers' pipeline("text-generation")."""
    generate = pipeline("text-generation", model=str(folder), device="cpu")
    return generate(prompt, max_new_tokens=n, do_sample=False)[0]["generated_text"]


def sampler_text(run: Path, prompt: str, n: int = 12) -> str:
    """The same by lmlab's sampler, cut where transformers stops: before the end-of-text token."""
    loaded = RunDir(run).load("best", "cpu")
    ids = list(stream_ids(loaded.model, loaded.tokenizer.encode(prompt), SamplingParams(n, temperature=0)))
    eot = loaded.tokenizer.eot_id
    return prompt + loaded.tokenizer.decode(ids[:ids.index(eot)] if eot in ids else ids)


def tokenizer_ids(folder: Path, run: Path, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Each text's ids by transformers' AutoTokenizer from an exported folder, and by the run's own tokenizer."""
    theirs = AutoTokenizer.from_pretrained(folder)
    ours = RunDir(run).tokenizer()
    return [theirs(t)["input_ids"] for t in texts], [ours.encode(t) for t in texts]


# Qwen2.5's template as it renders without tools: a default system message, <|im_start|>ROLE ... <|im_end|>.
QWEN = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}
    {%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
    {{- "\n\n# Tools\n\n<tools>" }}
    {%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first)
           or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- for tool_call in message.tool_calls %}
            {{- '\n<tool_call>\n' + tool_call.function.name + '\n</tool_call>' }}{%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


# Llama 3.1's, without tools: the BOS, a dated system header, <|start_header_id|>ROLE<|end_header_id|>, <|eot_id|>.
LLAMA3 = r"""{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


# Gemma's: no system role, roles that alternate (raise_exception otherwise), the assistant called "model".
GEMMA = (r"{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
         r"{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}"
         r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
         r"{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
         r"{% set role = message['role'] %}{% endif %}"
         r"{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         r"{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


STYLES = {  # special tokens (the first, id 0, ends a turn), tokenizer_config.json, where the template is kept
    "qwen2.5": (["<|im_end|>", "<|endoftext|>", "<|im_start|>"],
                {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}, "tokenizer_config"),
    "llama3": (["<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, "chat_template.jinja"),
    "gemma": (["<end_of_turn>", "<bos>", "<eos>", "<start_of_turn>"], {"bos_token": "<bos>", "eos_token": "<eos>"},
              "tokenizer_config"),
}


TEMPLATES = {"qwen2.5": QWEN, "llama3": LLAMA3, "gemma": GEMMA}


def chat_folder(folder: Path, style: str, corpus: Path, template: str | None = None) -> Path:
    """A tokenizer folder as an instruct model ships it: a byte-level BPE whose special tokens are the style's
    (Llama 3's tokenizer adds its BOS to every text, as the real one does), and its chat template."""
    specials, settings, where = STYLES[style]
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train([str(p) for p in sorted(corpus.glob("*.txt"))], trainer)
    if style != "qwen2.5":  # Llama 3's and Gemma's tokenizers put their BOS before every text
        bos = settings["bos_token"]
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                               special_tokens=[(bos, backend.token_to_id(bos))])
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    template = template if template is not None else TEMPLATES[style]
    config = {**settings, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64}
    if where == "chat_template.jinja":
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    else:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def hf_chat_model(folder: Path, style: str, corpus: Path, silent: bool = False) -> Path:
    """A tiny random Qwen2 (context 512) saved by transformers with the style's tokenizer and template; `silent`: its
    final norm zeroed, so every logit is 0 and greedy decoding picks id 0, the end of a turn, at once."""
    chat_folder(folder, style, corpus)
    tokenizer = load_pretrained(folder)
    saved = {name: (folder / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}
    tiny_hf(folder, "qwen2", tokenizer, max_position_embeddings=512, use_sliding_window=False)  # a judge's rubric fits
    for name, data in saved.items():  # tiny_hf writes a plain tokenizer_config.json: the instruct one goes back
        (folder / name).write_bytes(data)
    if silent:
        weights = load_file(str(folder / "model.safetensors"))
        weights["model.norm.weight"].zero_()
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


CONVERSATIONS = [
    [{"role": "user", "content": "Who is Romeo?"}],
    [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "Who is Juliet?"}],
    [{"role": "user", "content": "Name a star."}, {"role": "assistant", "content": "The sun."},
     {"role": "user", "content": "Another,\nplease — in French: étoile?"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
]
