"""Which step decodes: the one choice `serve`, `sample`, `answer`, the page and `lmlab.Run` make, and why. On CUDA the
step replays as CUDA graphs (lmlab.inference.graphs), built in milliseconds; on the CPU, with --compile, AOTInductor's
compiled step (lmlab.inference.compiled), built in a minute, from int8 weights too where asked
(lmlab.inference.quantize: a CPU's format, not captured); else eager. A step that fails its check (its first tokens
are not eager's) is not used: eager decodes, and says why."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmlab.core.config import SamplingParams
from lmlab.inference.compiled import compilable, compile_step, kept_or_compiled
from lmlab.inference.decode import Decoder, Sequence, Step
from lmlab.inference.graphs import Capture, GraphStep, compiled, cuda_graph
from lmlab.inference.quantize import quantize, tolerance
from lmlab.model import LanguageModel

CHECK_TOKENS = 8  # greedy tokens a step must decode as eager does, for each of two sequences, before it is used
# How a GPU's step is captured, by the kind a choice names. The captured graph is taken: it builds in milliseconds,
# with no compiler; benchmarks/hf_decode_speed.py times torch.compile's beside it, which a measurement kept per
# card and shape could choose instead.
CAPTURES: dict[str, Callable[[], Capture]] = {"cuda graphs": cuda_graph,
                                              "torch.compile reduce-overhead": lambda: compiled(mode="reduce-overhead")}


@dataclass(frozen=True)
class StepChoice:
    kind: str  # "cuda graphs", "compiled", "eager", or "compiled" or "eager" "from int8 weights"
    why: str
    weights: str = "none"  # the format the weights are quantized to (lmlab.inference.quantize) before decoding

    @property
    def compiled(self) -> bool:
        return self.kind.startswith("compiled")

    def describe(self) -> str:
        return f"{self.kind} ({self.why})"


def choose_step(model: LanguageModel, device: torch.device, compile: bool, weights: str = "none") -> StepChoice:
    """The step `model` decodes with on `device`, `compile` being whether the slow-to-build compiled step was asked and
    `weights` the format (--quantize) its weights are to decode from."""
    if weights != "none":  # quantize refuses a device other than the CPU
        if compile and compilable(model):
            return StepChoice(f"compiled from {weights} weights", f"AOTInductor: the step is one call into C++; "
                              f"{tolerance(weights)}", weights)
        return StepChoice(f"eager from {weights} weights", tolerance(weights), weights)
    if not compilable(model):
        return StepChoice("eager", "the model keeps no decode state to capture or compile")
    if device.type == "cuda":
        if not model.graphs:
            return StepChoice("eager", "its kind's step cannot be recorded as CUDA graphs (cuDNN's RNN, or a plugin "
                                       "that does not say it can)")
        return StepChoice("cuda graphs", "one graph per batch and length bucket, replayed as one launch a token")
    if not compile:
        return StepChoice("eager", "the compiled step was not asked for: it takes a minute or more to build")
    if device.type != "cpu":
        return StepChoice("eager", f"no compiled step runs on {device.type}")
    return StepChoice("compiled", "AOTInductor: the step is one call into C++")


def build_step(choice: StepChoice, model: LanguageModel, dtype: torch.dtype, capacity: int,
               capture: Callable[[], Capture] | None = None, weights_sha256: str | None = None,
               say: Callable[[str], None] = lambda line: None) -> tuple[Step | None, StepChoice]:
    """The step `choice` names for up to `capacity` rows (None: eager) and what decodes in the end: eager, with the
    reason, when the step fails its check (a capture that fails is ended first: lmlab.inference.graphs). `capture`
    makes how a bucket is captured, if not as CAPTURES says (a twin on the CPU). Weights the choice quantizes are
    quantized here, in place. A compiled step of weights hashing to `weights_sha256` is kept for the next call of them
    (`kept_or_compiled`, which tells `say` of its wait)."""
    quantize(model, choice.weights)
    if choice.compiled:
        if weights_sha256 is None:
            return compile_step(model, capacity, dtype), choice
        return kept_or_compiled(model, weights_sha256, capacity, dtype, choice.weights, say), choice
    if choice.kind not in CAPTURES:
        return None, choice
    capture = capture or CAPTURES[choice.kind]
    try:
        failure = check_step(model, dtype, lambda: GraphStep(model, dtype, capture))
    except Exception as err:  # a capture the card or the driver refuses
        failure = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if failure:
        return None, StepChoice("eager", f"the {choice.kind} step failed its check ({failure})")
    return GraphStep(model, dtype, capture), choice


def check_step(model: LanguageModel, dtype: torch.dtype, make: Callable[[], Step]) -> str | None:
    """Why the step `make` builds cannot be used (its first greedy tokens differ from eager's), or None; it decodes
    in a decoder of its own, so what it captures there is let go."""
    vocab = model.config.vocab_size
    prompts = [[1 % vocab], [2 % vocab, 3 % vocab]]
    tokens = []
    for step in (None, make()):
        decoder = Decoder(model, len(prompts), dtype, step)
        for p in prompts:
            decoder.join(Sequence(list(p), SamplingParams(CHECK_TOKENS, temperature=0)))
        steps = [decoder.step() for _ in range(CHECK_TOKENS)]  # each the rows' tokens, in the prompts' order
        tokens.append([list(row) for row in zip(*steps)])
    return None if tokens[0] == tokens[1] else f"its first tokens {tokens[1]} are not eager's {tokens[0]}"
