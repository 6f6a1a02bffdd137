"""The typed run configuration, each field checked in `__post_init__`; its comments are the config reference.
Names follow nanoGPT's. `lmlab.core.config_toml` reads and writes it as TOML."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmlab.core.errors import UserError
from lmlab.core.plugin_kinds import BUILT_IN_KINDS, UnknownKind, check_options, plugin_kinds
from lmlab.core.schedules import SCHEDULES

DEFAULT_SEED = 1337  # training, fine-tuning and sampling all start from it unless told otherwise
MAX_COUNT = 2**53  # the largest count (tokens, steps, sizes) any setting takes: floats and JSON hold it exactly
MAX_SEED = 2**63 - 1  # seeds are 64-bit
WARMUP_ITERS = 100  # train.warmup_iters' default, which warmup_epochs may stand beside (it replaces it)
MAX_BUDGET_SECONDS = 366 * 86_400  # a year: a longer budget is a typo (an hour count where minutes were meant)
STOP_CHARS = 1_000  # the longest stop string: each is matched against the text as it grows, a table per string


def as_text(value: Any) -> str:
    """A user's name or value as a one-line message quotes it: as typed if printable, else escaped; cut short."""
    text = str(value)
    text = text if text.isprintable() else repr(text)
    return text if len(text) <= 60 else text[:57] + "..."


def check_counts(section: str, values: dict[str, int], low: int = 1) -> None:
    """Whole-number settings: each from `low` to MAX_COUNT, or one sentence naming it."""
    for name, value in values.items():
        if not low <= value <= MAX_COUNT:
            floor = "a positive integer" if low == 1 else f"an integer from {low}"
            raise UserError(f"{section}{name} is {as_text(value)}; set it to {floor} up to 2**53.")


def checkpoint_name(spec: str) -> str:
    """A checkpoint spec as a run names it: `best`, `latest`, or the step folder `step_NNNNNN` of `step_N` or `N`;
    the one parser of every --checkpoint and of --init-from's RUN:CHECKPOINT."""
    if spec in ("best", "latest"):
        return spec
    match = re.fullmatch(r"(?:step_)?(\d{1,16})", spec.strip()) if isinstance(spec, str) else None
    if match is None or int(match[1]) > MAX_COUNT:
        raise UserError(f"checkpoint {spec!r} is unknown; use best, latest, or a step: step_N or N (e.g. 500).")
    return f"step_{int(match[1]):06d}"


def checkpoint_label(name: str, step: int) -> str:
    """A checkpoint as people read it: `best, step 1,500`, `latest, step 1,500`, or `step 500`."""
    return f"step {step:,}" if name.startswith("step_") else f"{name}, step {step:,}"


def check_choice(setting: str, value: Any, choices: tuple[str, ...], listed: str = "") -> None:
    """Refuse a value not among `choices`, in a sentence naming the setting and the choices (as `listed`, else joined
    by "or")."""
    if value not in choices:
        raise UserError(f"{setting} is '{as_text(value)}'; use {listed or ' or '.join(choices)}.")


# A number setting's range: the test a value passes, and the rule a refusal states ("must be ...").
Ranges = dict[str, tuple[Callable[[float], bool], str]]


def check_ranges(section: str, config: Any, ranges: Ranges) -> None:
    """Number settings of `config` each within its range, or one sentence naming it and the rule."""
    for name, (within, rule) in ranges.items():
        if not within(getattr(config, name)):
            raise UserError(f"{section}{name} ({getattr(config, name)}) must be {rule}.")


def check_seed(where: str, seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{where} is {as_text(seed)}; it must be between 0 and 2**63 - 1.")


@dataclass
class DataConfig:
    dataset: str = "data/shakespeare-char"  # dataset dir written by `lmlab prepare`


ATTENTION_CHOICES = ("auto", "fused", "math", "cudnn")  # train.attention's, finetune.attention's: a path, or a rule
OPTIMIZER_NAMES = ("adamw", "muon")  # train.optimizer's choices: lmlab.train.optim.OPTIMIZERS has what each is
BIAS_PLACES = ("qkv", "proj", "mlp", "norm")  # where model.bias may put biases, one by one

# The choices of each string-valued model option; the first is the default.
MODEL_CHOICES: dict[str, tuple[str, ...]] = {
    "pos_emb": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu", "relu2"),
    "gelu_approx": ("none", "tanh"),
    "rnn_cell": ("gru", "lstm"),
}

MODEL_RANGES: Ranges = {
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "rope_theta": (lambda v: v > 0, "positive, e.g. 10000"),
    "norm_eps": (lambda v: 0 <= v < 1, "in [0, 1), e.g. 1e-6; 0 for torch's default"),
}

# The fields each model kind reads besides the shared ones.
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "gpt": ("n_head", "bias", "gelu_approx", "pos_emb", "norm", "mlp", "qk_norm", "n_kv_head",
            "head_dim", "mlp_hidden", "rope_theta", "norm_eps", "bigram_buckets"),
    "recurrent": ("rnn_cell",),
}


def bias_spelling(places: set[str]) -> bool | str:
    """The one spelling of biases at `places`: true for every place, else the list in BIAS_PLACES order."""
    return True if places == set(BIAS_PLACES) else ",".join(p for p in BIAS_PLACES if p in places)


@dataclass
class ModelConfig:
    kind: str = "gpt"  # gpt | recurrent | an installed model plugin's name (its settings in [model.options])
    n_layer: int = 6  # transformer blocks, or stacked recurrent layers
    n_head: int = 6  # attention (query) heads; unused by the recurrent model
    n_embd: int = 384  # residual width, or the recurrent model's embedding and hidden-state width
    block_size: int = 256  # context length in tokens (the recurrent model trains on sequences this long)
    dropout: float = 0.0  # share of activations zeroed in training (attention, residual and MLP outputs)
    # Biases: true everywhere (GPT-2), false nowhere, or only in the places listed of qkv, proj, mlp, norm ("qkv" is
    # Qwen2's). The recurrent cells always keep theirs.
    bias: bool | str = True
    vocab_size: int = 0  # 0: taken from the dataset's meta.json
    gelu_approx: str = "none"  # none | tanh: the MLP's GELU exact, or tanh-approximated as in OpenAI's GPT-2
    pos_emb: str = "learned"  # learned | rope: a learned position table, or rotary embeddings of q and k
    norm: str = "layernorm"  # layernorm | rmsnorm
    # gelu | swiglu | relu2: 4x GELU MLP, a gated SiLU MLP with ~8/3x hidden width (same params), or 4x squared ReLU
    # (So et al. 2021, "Primer"; modded-nanogpt's)
    mlp: str = "gelu"
    qk_norm: bool = False  # RMS-normalise queries and keys per head before attention
    tie_embeddings: bool = True  # the output head shares the token embedding's weights
    n_kv_head: int = 0  # key/value heads; 0: n_head; fewer: grouped-query attention (must divide n_head)
    head_dim: int = 0  # width of each attention head; 0: n_embd / n_head (Qwen3 models set it wider)
    mlp_hidden: int = 0  # the MLP's hidden width; 0: 4 x n_embd (gelu, relu2), or ~8/3 x n_embd (swiglu, same params)
    rope_theta: float = 10000.0  # rotary base: channel pair i turns by position x theta^(-2i / head width)
    norm_eps: float = 0.0  # epsilon of every norm, QK-norm too; 0: torch's (LayerNorm 1e-5, RMSNorm machine eps)
    # Rows of a table of token pairs added to the token embedding, at most one per pair (vocab² rows): the pair
    # (previous, current) reads row (previous x vocab + current) mod the rows; 0: no table. A lookup, not a matmul:
    # pair statistics without spending a layer on them.
    bigram_buckets: int = 0
    rnn_cell: str = "gru"  # gru | lstm: the recurrent model's cell
    # A model plugin's own settings, the [model.options] table: what the plugin reads, checked by it.
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_counts("model.", {name: getattr(self, name) for name in ("n_layer", "n_head", "n_embd", "block_size")})
        zero_is_default = ("vocab_size", "n_kv_head", "head_dim", "mlp_hidden", "bigram_buckets")  # or none
        check_counts("model.", {name: getattr(self, name) for name in zero_is_default}, low=0)
        if self.kind not in BUILT_IN_KINDS and self.kind not in plugin_kinds():
            raise UnknownKind(self.kind)
        self.options = check_options(self.options, "model.options")
        if self.options and self.kind in BUILT_IN_KINDS:
            raise UserError(f"[model.options] ({', '.join(self.options)}) holds a model plugin's settings, and "
                            f"model.kind {self.kind!r} is lmlab's own, which reads none: remove the table, or set "
                            "model.kind to the plugin's name.")
        for name, choices in MODEL_CHOICES.items():
            check_choice(f"model.{name}", getattr(self, name), choices)
        if self.kind == "gpt":  # the recurrent model has no heads
            self._check_heads()
        check_ranges("model.", self, MODEL_RANGES)
        if isinstance(self.bias, str):  # the places listed, written in their one spelling
            places = {p.strip() for p in self.bias.split(",")}
            if not self.bias.strip() or places - set(BIAS_PLACES):
                raise UserError(f"model.bias is '{as_text(self.bias)}'; use true, false, or the places that have "
                                f"biases, comma-separated, from {', '.join(BIAS_PLACES)} (e.g. \"proj,mlp,norm\": all "
                                "but q/k/v).")
            self.bias = bias_spelling(places)

    def has_bias(self, place: str) -> bool:
        return place in self.bias.split(",") if isinstance(self.bias, str) else self.bias

    def _check_heads(self) -> None:
        if self.n_embd % self.n_head:
            raise UserError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head}); "
                            "change one of them.")
        if self.pos_emb == "rope" and self.head_size % 2:
            raise UserError(f"model.pos_emb = \"rope\" needs an even head size; it is {self.head_size} "
                            "(model.head_dim, or n_embd / n_head), change it.")
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            raise UserError(f"model.n_kv_head ({self.n_kv_head}) must divide model.n_head ({self.n_head}); "
                            "use 0 for as many as n_head.")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    def ignored_fields(self) -> list[str]:
        """Fields set away from their defaults that this kind does not read: said, not refused (presets are shared)."""
        read = set(KIND_FIELDS.get(self.kind, ()))  # a plugin reads the shared fields and its options
        unread = {name for fields in KIND_FIELDS.values() for name in fields} - read
        return sorted(f.name for f in dataclasses.fields(self)
                      if f.name in unread and getattr(self, f.name) != f.default)


TRAIN_RANGES: Ranges = {
    "beta1": (lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.9"),
    "beta2": (lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.9"),
    "grad_clip": (lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
    "spike_zscore": (lambda v: v > 0, "positive, e.g. 6"),
    "decay_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "collective_timeout": (lambda v: 0 < v <= 86400, "a positive number of seconds up to a day (86400), e.g. 600"),
    "budget_seconds": (lambda v: 0 <= v <= MAX_BUDGET_SECONDS,
                       f"0 (no budget) or positive, at most {MAX_BUDGET_SECONDS:,} (366 days)"),
    "warmup_epochs": (lambda v: 0 <= v <= MAX_COUNT,
                      "0 (warmup_iters says) or a number of passes over the train split, e.g. 0.5"),
    "rollback_lr_factor": (lambda v: 0 < v <= 1, "in (0, 1]"),
}


@dataclass
class TrainConfig:
    batch_size: int = 64  # sequences per micro-batch (per process under torchrun)
    grad_accum_steps: int = 1  # micro-batches per optimizer step in all; N torchrun processes run 1/N each
    # auto | set: on CUDA, "auto" trains by the largest micro-batch, batch_size times a power of two, that the GPU's
    # memory holds by lmlab's estimate (lmlab.model.memory) and accumulates to the same batch (batch_size x
    # grad_accum_steps); config.toml keeps the result, as "set". A CPU, or "set", trains as batch_size and
    # grad_accum_steps say.
    micro_batch: str = "auto"
    max_iters: int = 5000  # optimizer steps
    # Seconds from `lmlab train`'s start to the run's end, evals and checkpoints included (max_iters and the LR
    # schedule are fitted to it); 0: none; at most 366 days.
    budget_seconds: float = 0.0
    optimizer: str = "adamw"  # which optimizer trains (one of OPTIMIZER_NAMES, each in lmlab.train.optim.OPTIMIZERS)
    learning_rate: float = 1e-3  # peak LR, reached after warmup (Muon's too: its updates are scaled to AdamW's RMS)
    min_lr: float = 1e-4  # the LR at the end of the decay
    schedule: str = "cosine"  # how the LR falls after warmup (one of lmlab.core.schedules.SCHEDULES)
    decay_fraction: float = 0.2  # wsd: share of the steps, at the end, over which the LR falls (1-sqrt) to min_lr
    warmup_iters: int = WARMUP_ITERS  # steps over which the LR rises linearly from 0 to learning_rate
    # Passes over the train split the LR warms up over instead ("0.5": half a pass), kept in config.toml as
    # warmup_iters; 0: warmup_iters says.
    warmup_epochs: float = 0.0
    lr_decay_iters: int = 0  # steps over which the LR decays to min_lr; 0: max_iters
    weight_decay: float = 0.1  # applied to 2-D weights only
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.99  # AdamW's second-moment decay
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # Steps between evaluations, or passes over the train split: "epoch" or "N epochs" ("0.5 epochs": two a pass);
    # patience counts these evaluations.
    eval_interval: int | str = 250
    eval_iters: int = 50  # batches per split in each evaluation (the same batches every time)
    log_interval: int = 10  # steps between train lines in metrics.jsonl
    checkpoint_interval: int = 500  # steps between `latest` checkpoints
    keep_checkpoints: int = 3  # step folders kept besides `best`
    patience: int = 0  # evaluations without a new best before stopping (epochs, with eval_interval "epoch"); 0: never
    seed: int = DEFAULT_SEED  # seeds the weights, the batches and dropout: the same seed, the same run
    spike_zscore: float = 6.0  # a loss or grad norm this many std above its recent mean is a spike
    spike_patience: int = 3  # bad steps (spikes or non-finite) in a row before rolling back; 0: never
    rollback_lr_factor: float = 0.5  # LR multiplier applied at each rollback
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16: autocast dtype of the forward pass
    # true | false | auto: torch.compile on CUDA; eager on the CPU (no measured gain there)
    compile: bool | str = "auto"
    # auto | fused | math | cudnn: attention by torch's fused kernel, by the scores written out, by cuDNN's kernel
    # (CUDA only), or by the machine's rule (lmlab.train.attention: the math path on a CPU in bfloat16 at a short
    # context, where its scores fit in memory; else fused)
    attention: str = "auto"
    threads: int = 0  # CPU threads for torch, at most the cores; 0: chosen from the load on them (core/threads.py)
    tracker: str = "none"  # none | tensorboard | wandb: where metrics stream besides metrics.jsonl
    tracker_project: str = "lmlab"  # wandb: the project the run is logged under
    tracker_run: str = ""  # wandb: the run's name there; "": the run dir's name
    parallel: str = "ddp"  # ddp | fsdp: under torchrun, a model replica per process, or sharded by FSDP2
    # Under torchrun, seconds a process waits for the others in one collective before the job ends naming the host.
    collective_timeout: float = 600.0

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum_steps", "max_iters", "eval_iters", "log_interval",
                    "checkpoint_interval", "keep_checkpoints")
        check_counts("train.", {name: getattr(self, name) for name in positive})
        check_counts("train.", {name: getattr(self, name) for name in ("warmup_iters", "lr_decay_iters", "patience",
                                                                        "spike_patience", "threads")}, low=0)
        check_seed("train.seed", self.seed)
        if not 0 < self.learning_rate <= 1 or not 0 <= self.min_lr <= self.learning_rate:
            raise UserError(f"train.learning_rate ({self.learning_rate}) must be in (0, 1] and train.min_lr "
                            f"({self.min_lr}) in [0, learning_rate].")
        if not 0 <= self.weight_decay * self.learning_rate < 1:
            # Decoupled decay multiplies the weights by (1 - lr * wd) each step: at 1 or more it zeroes or flips them.
            raise UserError(f"train.weight_decay ({self.weight_decay}) must be >= 0 and below 1 / learning_rate.")
        check_ranges("train.", self, TRAIN_RANGES)
        check_choice("train.optimizer", self.optimizer, OPTIMIZER_NAMES)
        check_choice("train.attention", self.attention, ATTENTION_CHOICES, ", ".join(ATTENTION_CHOICES))
        check_choice("train.schedule", self.schedule, tuple(SCHEDULES))
        if self.budget_seconds and self.lr_decay_iters:
            raise UserError("train.lr_decay_iters fixes the decay in steps, while train.budget_seconds lays it over "
                            "the steps the budget allows; set lr_decay_iters = 0.")
        if not isinstance(self.eval_interval, str):
            check_counts("train.", {"eval_interval": self.eval_interval})
        elif self.passes_per_eval is None or not 0 < self.passes_per_eval <= MAX_COUNT:
            raise UserError(f"train.eval_interval is '{as_text(self.eval_interval)}'; use a number of steps (250), "
                            "\"epoch\", or a number of passes over the train split such as \"0.5 epochs\".")
        if self.warmup_epochs and self.warmup_iters not in (0, WARMUP_ITERS):
            raise UserError(f"train.warmup_epochs ({self.warmup_epochs:g}) and train.warmup_iters "
                            f"({self.warmup_iters}) both set the warmup's length; keep one: warmup_iters = 0 (or left "
                            "out) to warm up by passes, or warmup_epochs = 0.")
        check_choice("train.tracker", self.tracker, ("none", "tensorboard", "wandb"), "none, tensorboard or wandb")
        bad = set(self.tracker_project) & set("/\\#?%:")
        if not self.tracker_project or bad or len(self.tracker_project) > 128:
            raise UserError(f"train.tracker_project ({self.tracker_project!r}) must be 1-128 characters without any "
                            "of / \\ # ? % : (W&B's rule for project names); e.g. \"shakespeare\".")
        if self.compile not in (True, False, "auto"):
            raise UserError(f"train.compile is {self.compile!r}; use true, false or \"auto\".")
        check_choice("train.micro_batch", self.micro_batch, ("auto", "set"))
        check_choice("train.parallel", self.parallel, ("ddp", "fsdp"))
        check_choice("train.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"),
                     "auto, float32, bfloat16 or float16")

    @property
    def passes_per_eval(self) -> float | None:
        """The passes over the train split between evaluations, or None when they are spaced by steps."""
        words = self.eval_interval.split() if isinstance(self.eval_interval, str) else []
        if words == ["epoch"]:
            return 1.0
        try:
            passes = float(words[0]) if len(words) == 2 and words[1] in ("epoch", "epochs") else math.nan
        except ValueError:
            return None
        return passes if math.isfinite(passes) else None

    def patience_words(self) -> str:
        """The patience as a stop message says it: `15 evaluations`, `15 epochs`, `4 evaluations (2 passes)`."""
        passes = self.passes_per_eval
        if passes == 1.0:
            return f"{self.patience} epoch{'s' * (self.patience != 1)}"
        return f"{self.patience} evaluations" + ("" if passes is None else f" ({self.patience * passes:g} passes)")

    def eval_steps(self, split_tokens: int, tokens_per_step: int) -> int:
        """The steps between evaluations: eval_interval, or the whole steps nearest passes_per_eval passes."""
        passes = self.passes_per_eval
        if passes is None:
            assert isinstance(self.eval_interval, int), "__post_init__ refuses any other text"
            return self.eval_interval
        return _steps(passes, split_tokens, tokens_per_step)

    def warmup_steps(self, split_tokens: int, tokens_per_step: int) -> int:
        """The steps the LR warms up over: warmup_iters, or the whole steps nearest warmup_epochs passes."""
        return _steps(self.warmup_epochs, split_tokens, tokens_per_step) if self.warmup_epochs else self.warmup_iters


def _steps(passes: float, split_tokens: int, tokens_per_step: int) -> int:
    """The whole steps nearest `passes` passes over a split of `split_tokens`, at least one, at most MAX_COUNT."""
    return int(min(MAX_COUNT, max(1, round(passes * split_tokens / tokens_per_step))))


FINETUNE_RANGES: Ranges = {
    "learning_rate": (lambda v: 0 < v <= 1, "in (0, 1], e.g. 1e-4"),
    "val_fraction": (lambda v: 0 < v < 1, "between 0 and 1, e.g. 0.1"),
}


@dataclass
class FinetuneConfig:
    """`lmlab finetune`: Alpaca-format instruction tuning of a run's best checkpoint. The model, dtype, optimizer
    and clipping come from the base run; these settings, and the schedule derived from them, replace its [train]."""

    data: str = ""  # JSON list of {instruction, input, output} records
    epochs: int = 3  # passes over the training records
    learning_rate: float = 1e-4  # peak LR: 5% of the steps warm up to it, then a cosine to a tenth of it
    batch_size: int = 8  # records per step
    val_fraction: float = 0.1  # share of records held out (chosen by a hash of their content)
    seed: int = DEFAULT_SEED  # seeds the split of records, their order and dropout
    checkpoint_interval: int = 100  # steps between checkpoints inside an epoch (one ends every epoch too)
    threads: int = 0  # CPU threads for torch, at most the cores; 0: chosen from the load on them, as training's
    attention: str = "auto"  # auto | fused | math | cudnn, as train.attention

    def __post_init__(self) -> None:
        check_choice("finetune.attention", self.attention, ATTENTION_CHOICES, ", ".join(ATTENTION_CHOICES))
        check_counts("finetune.", {"epochs": self.epochs, "batch_size": self.batch_size,
                                   "checkpoint_interval": self.checkpoint_interval})
        check_counts("finetune.", {"threads": self.threads}, low=0)
        check_seed("finetune.seed", self.seed)
        check_ranges("finetune.", self, FINETUNE_RANGES)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig | None = None  # set in fine-tuned runs only

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.train.grad_accum_steps * self.model.block_size

    def intervals(self, split_tokens: int) -> tuple[int, int]:
        """The steps between its evaluations and between its checkpoints, over a train split of `split_tokens`."""
        return self.train.eval_steps(split_tokens, self.tokens_per_step), self.train.checkpoint_interval


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a prompt: temperature 0 is greedy; top_k keeps the k likeliest tokens and top_p the smallest
    set whose probability reaches p; a continuation ends after max_new_tokens or before a stop string."""

    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = DEFAULT_SEED
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = {
            "max_new_tokens": (not 1 <= self.max_new_tokens <= MAX_COUNT, "at least 1 and at most 2**53"),
            "temperature": (not (math.isfinite(self.temperature) and self.temperature >= 0), "a number >= 0 "
                            "(0 is greedy)"),
            "top_k": (self.top_k is not None and not 1 <= self.top_k <= MAX_COUNT, "at least 1 and at most 2**53, "
                      "or left out"),
            "top_p": (not 0 < self.top_p <= 1, "in (0, 1]"),
            "seed": (not 0 <= self.seed <= MAX_SEED, "between 0 and 2**63 - 1"),
            "stop": (any(len(s) > STOP_CHARS for s in self.stop), f"strings of at most {STOP_CHARS:,} characters"),
        }
        for name, (bad, rule) in problems.items():
            if bad:
                raise UserError(f"{name} is {as_text(getattr(self, name))}; it must be {rule}.")

    def describe(self) -> str:
        return f"seed {self.seed}, temperature {self.temperature}, top_k {self.top_k}, top_p {self.top_p}"


def seeded(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n copies of `params`, the i-th seeded seed + i: n different draws, each repeatable alone."""
    return [dataclasses.replace(params, seed=(params.seed + i) % 2**63) for i in range(n)]
