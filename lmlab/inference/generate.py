"""Sampling text: a prompt's continuation, alone or many at once through the batched decoder, ending before a stop
string, at the end-of-text token or after max_new_tokens; instructions and chats put to a run in its own format."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from lmlab.core.config import SamplingParams
from lmlab.core.errors import UserError
from lmlab.core.threads import Heard
from lmlab.data.tokenizers import Tokenizer
from lmlab.inference.decode import Decoder, Step, hold_weights
from lmlab.inference.decode import Sequence as Decoding
from lmlab.inference.quantize import held_as, state_dtype
from lmlab.model import LanguageModel
from lmlab.model.memory import check_decoding
from lmlab.run.prompt import PromptFormat, alpaca_format, check_format
from lmlab.run.rundir import LoadedRun

SETTLE_TOKENS = 16  # decoded text older than this many tokens is kept, not decoded again with every token


def decode_dtype(device: torch.device, dtype: torch.dtype, compiled: bool) -> torch.dtype:
    """The dtype to decode in: the run's, except eagerly on the CPU, where autocast would cast every weight at every
    step and fp32 is the faster (docs/reference/performance.md, benchmarks/decode_speed.py)."""
    return torch.float32 if device.type == "cpu" and not compiled else dtype


def decoding_only(run: LoadedRun, compiled: bool) -> torch.dtype:
    """The dtype `run` decodes in, with its matmul weights cast to it once when it decodes eagerly, for a run loaded to
    decode and nothing else: nothing reads those weights in fp32 afterwards."""
    dtype = decode_dtype(run.device, run.dtype, compiled)
    if not compiled:
        hold_weights(run.model, dtype)
    return dtype


def stream_ids(model: LanguageModel, prompt: list[int], params: SamplingParams,
               dtype: torch.dtype = torch.float32) -> Iterator[int]:
    """Yield up to `params.max_new_tokens` tokens continuing `prompt`, one at a time (without grad, as the decoder
    runs). Past the context the window restarts from its newest half (see `Decoder.step`)."""
    decoder = Decoder(model, 1, dtype)
    seq = Decoding(list(prompt), params)
    decoder.join(seq)
    while not seq.exhausted:
        yield decoder.step()[0]


class StopStrings:
    """Where a growing text first holds one of the stop strings, read once: each string's KMP automaton is advanced over
    the characters not read yet, so a token costs what its own characters cost. `partial` is the longest beginning of a
    stop string the text read ends with (once `advance` found none whole)."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.fallback = [_borders(s) for s in self.stop]
        self.matched = [0] * len(self.stop)  # per string: how much of it the text read ends with
        self.read = 0
        self.partial = 0

    def advance(self, text: str, upto: int) -> int | None:
        """Read `text` up to `upto` (the part no later token can change); where the first stop string read
        whole begins (the longest, of those ending at the same character), else None."""
        for at in range(self.read, upto):
            char, ended = text[at], None
            for i, s in enumerate(self.stop):
                k = self.matched[i]
                while k and s[k] != char:
                    k = self.fallback[i][k - 1]
                k = self.matched[i] = k + (s[k] == char)
                if k == len(s) and (ended is None or k > len(ended)):
                    ended = s
            if ended is not None:
                return at + 1 - len(ended)
        self.read = max(self.read, upto)
        self.partial = max(self.matched, default=0)
        return None


def _borders(s: str) -> list[int]:
    """KMP's table: for each prefix of `s`, the length of its longest proper prefix that is also its suffix."""
    table, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = table[k - 1]
        k += s[i] == s[k]
        table[i] = k
    return table


class Detokenizer:
    """The text of a continuation as its tokens arrive. `feed` returns the text that can be sent now (holding back what
    a stop string or the rest of a UTF-8 character may still change); a stop string, or the end-of-text token unless
    `past_eot`, sets `finish_reason` to "stop", and `flush` returns what was held back.

    Text older than SETTLE_TOKENS tokens is settled and not decoded again, so a long continuation costs the same per
    token as a short one: only an unfinished character at the end (U+FFFD) may still change."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], past_eot: bool = False):
        self.tokenizer, self.stops = tokenizer, StopStrings(stop)
        self.eot_id = None if past_eot else tokenizer.eot_id
        self.settled, self.tail = "", list[int]()  # the text of the tokens before `tail`, and those tokens
        self.text, self.sent = "", 0  # the text so far (cut before a stop string), and how much of it was sent
        self.finish_reason: str | None = None

    def feed(self, token: int) -> str:
        if token == self.eot_id:
            self.finish_reason = "stop"
            return self.flush()
        self.tail.append(token)
        decoded = self.tokenizer.decode(self.tail)
        text = self.settled + decoded
        final = len(text.rstrip("\ufffd"))  # what no later token changes
        cut = self.stops.advance(text, final)
        if cut is not None:
            self.finish_reason, self.text = "stop", text[:cut]
            return self.flush()
        self.text = text
        if len(self.tail) >= SETTLE_TOKENS and not decoded.endswith("\ufffd"):
            self.settled, self.tail = text, []
        ready = max(self.sent, final - self.stops.partial)
        piece, self.sent = text[self.sent:ready], ready
        return piece

    def flush(self) -> str:
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece


@dataclass(eq=False)
class Continuation:
    """One prompt's continuation: its sequence in the decoder, its text, and once it has ended, why: "stop" or "length",
    OpenAI's words."""

    decoding: Decoding
    text: Detokenizer
    finish_reason: str | None = None

    @property
    def tokens(self) -> int:
        return self.decoding.generated


class Batch:
    """Continuations decoded together, up to `capacity` at once; each ends on its own and leaves at once, and
    one may join or be dropped between any two steps (continuous batching). With `past_eot`, the end-of-text
    token ends nothing: the text runs on into the next document."""

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, capacity: int, dtype: torch.dtype,
                 step: Step | None = None, past_eot: bool = False, setting: str = "the batch",
                 tokens_per_row: int | None = None, threads: Heard | None = None):
        """`dtype` is the run's, decoded in as `decode_dtype` says; `setting` names the capacity in the sentence that
        refuses one that would not fit in memory for rows of `tokens_per_row` tokens (default: the context); `threads`
        hears each step (`Decoder`)."""
        device = next(model.parameters()).device
        dtype = decode_dtype(device, dtype, step is not None)
        check_decoding(model.config, capacity, tokens_per_row or model.config.block_size, setting, device, dtype,
                       state_dtype(held_as(model), dtype))
        self.decoder = Decoder(model, capacity, dtype, step, threads)
        self.tokenizer, self.past_eot = tokenizer, past_eot
        self.owner: dict[Decoding, Continuation] = {}

    @property
    def capacity(self) -> int:
        return self.decoder.capacity

    def __len__(self) -> int:
        return len(self.owner)

    def add(self, prompt: list[int], params: SamplingParams, logprobs: int | None = None, echo: bool = False,
            generate: bool = True) -> Continuation:
        """Start continuing `prompt`. With `logprobs` N, every generated token's log-probability is recorded with the N
        likeliest alternatives, and with `echo` the prompt's tokens' first; without `generate` (the server's
        `max_tokens: 0`) the prompt is only read and scored."""
        decoding = Decoding(list(prompt), params, logprobs=logprobs, echo=echo)
        continuation = Continuation(decoding, Detokenizer(self.tokenizer, params.stop, self.past_eot))
        self.decoder.join(decoding)
        if generate:
            self.owner[decoding] = continuation
        else:
            self.decoder.leave(decoding)
            continuation.finish_reason = "length"
        return continuation

    def drop(self, continuation: Continuation) -> None:
        if self.owner.pop(continuation.decoding, None) is not None:
            self.decoder.leave(continuation.decoding)

    def step(self) -> list[tuple[Continuation, str]]:
        """One token more for every continuation: each with the text it adds (maybe ''); those that ended have left the
        batch."""
        events = []
        # the active sequences as they were: one that ends leaves `active` at once
        for decoding, token in zip(list(self.decoder.active), self.decoder.step()):
            continuation = self.owner[decoding]
            piece = continuation.text.feed(token)
            if continuation.text.finish_reason is None and decoding.exhausted:
                continuation.text.finish_reason = "length"
                piece += continuation.text.flush()
            continuation.finish_reason = continuation.text.finish_reason
            if continuation.finish_reason is not None:
                self.drop(continuation)
            events.append((continuation, piece))
        return events


class TextStream:
    """Iterating yields the decoded text of one continuation piece by piece; then `finish_reason` is "stop" or
    "length" and `tokens` the number of tokens generated."""

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, prompt: list[int], params: SamplingParams,
                 dtype: torch.dtype = torch.float32, step: Step | None = None, past_eot: bool = False,
                 threads: Heard | None = None, prefix: str = ""):
        self.batch = Batch(model, tokenizer, 1, dtype, step, past_eot, threads=threads)
        self.continuation = self.batch.add(prompt, params)
        self.prefix = prefix  # yielded first: the prompt a sample is printed after

    def __iter__(self) -> Iterator[str]:
        if self.prefix:
            yield self.prefix
        while len(self.batch):
            piece = self.batch.step()[0][1]
            if piece:
                yield piece

    @property
    def finish_reason(self) -> str:
        return self.continuation.finish_reason or "length"

    @property
    def tokens(self) -> int:
        return self.continuation.tokens

    def text(self) -> str:
        return "".join(self)


def document_start(tokenizer: Tokenizer) -> list[int]:
    """What an empty prompt stands for: the start of a document, after an end-of-text token (or, for char
    tokenizers, which have none, a newline)."""
    return [tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode("\n")


def max_prompt_chars(run: LoadedRun) -> int | None:
    """The most characters a prompt can have and still fit the run's context, whatever its tokens (None: no bound). A
    longer prompt is refused (or, in a prompt format that keeps its end, cut) before it is tokenized, as tokenizing it
    takes memory by its length."""
    return run.tokenizer.most_chars(run.config.model.block_size)


def check_prompt_length(run: LoadedRun, text: str, what: str) -> None:
    """Refuse `text` (`what` names it) when it is longer than `max_prompt_chars`."""
    limit = max_prompt_chars(run)
    if limit is not None and len(text) > limit:
        raise UserError(f"{what} is {len(text):,} characters, more than the {run.config.model.block_size:,} tokens "
                        f"of {run.run.path}'s context can hold (at most {limit:,} of its tokenizer's characters); "
                        "shorten it.")


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation as a prompt: its text, what ends the reply, and whether the tokenizer adds its own special
    tokens around the text (not when a chat template writes them itself, as transformers encodes it)."""

    text: str
    stop: tuple[str, ...]
    special: bool = True

    def ids(self, tokenizer: Tokenizer) -> list[int]:
        return tokenizer.encode(self.text, self.special)


def chat_prompt(run: LoadedRun, turns: Sequence[tuple[str, str]]) -> ChatPrompt:
    """How a conversation of (role, text) turns is put to a run: an imported instruct model's chat template, else a
    fine-tuned run's prompt format (the last user message is the instruction), else a `role: content` transcript ending
    with `assistant:`."""
    if run.chat_template is not None:
        text = run.chat_template.render([{"role": role, "content": content} for role, content in turns],
                                        where=str(run.run.path))
        return ChatPrompt(text, run.chat_template.end_of_turn, special=False)
    if run.prompt_format is not None:
        users = [content for role, content in turns if role == "user"]
        if not users:
            raise UserError("a chat needs a user message: with the prompt format a run was fine-tuned in, the last "
                            "one is the instruction.")
        return ChatPrompt(run.prompt_format.render(users[-1]), (run.prompt_format.end,))
    return ChatPrompt("".join(f"{role}: {content}\n" for role, content in turns) + "assistant:", ("\nuser:",))


def _instruction_prompt(run: LoadedRun, fmt: PromptFormat, instruction: str, input: str) -> list[int]:
    """An instruction asked in the prompt format `fmt`. With a char tokenizer, characters it never saw are blamed
    on the instruction or input that has them, or else on the prompt format (a run not tuned for instructions)."""
    run.tokenizer.check(instruction, "the instruction")
    run.tokenizer.check(input, "the input")
    check_format(run.tokenizer, fmt, run.run.path)
    text = fmt.render(instruction, input)
    # A prompt longer than the context is cut on the left, in characters first, so that no more is tokenized than read.
    return run.tokenizer.encode(text[-(max_prompt_chars(run) or len(text)):])[-run.config.model.block_size:]


@dataclass(frozen=True)
class Asked:
    """Prompts put to a run, as its tokenizer's ids, and how the text of each goes on: up to `stop` (as well as the
    sampling settings' own stop strings), past the end of a document with `past_eot`, printed after `prefix` (a
    sample's prompt). Made, the prompts checked, by `continuing`, `chatting` or `instructing`."""

    prompts: list[list[int]]
    stop: tuple[str, ...] = ()
    past_eot: bool = False
    prefix: str = ""

    def stopping(self, params: SamplingParams) -> SamplingParams:
        return dataclasses.replace(params, stop=(*params.stop, *self.stop))


def continuing(run: LoadedRun, prompt: str, n: int = 1, what: str = "--prompt") -> Asked:
    """The prompt (`what` names it in a refusal) n times, continued as nanoGPT's samples are, on across documents (an
    empty one starts a new document)."""
    check_prompt_length(run, prompt, what)
    run.tokenizer.check(prompt, what)
    start = run.tokenizer.encode(prompt) if prompt else document_start(run.tokenizer)
    return Asked([start] * n, past_eot=True, prefix=prompt)


def chatting(run: LoadedRun, turns: Sequence[tuple[str, str]]) -> Asked:
    """A conversation of (role, text) turns (`chat_prompt`), for the reply that ends its turn."""
    prompt = chat_prompt(run, turns)
    check_prompt_length(run, prompt.text, "the chat's rendered prompt")
    return Asked([prompt.ids(run.tokenizer)], prompt.stop)


def instructing(run: LoadedRun, asks: Sequence[tuple[str, str]]) -> Asked:
    """(instruction, input) pairs in the run's own format (an imported instruct model's chat template, else its prompt
    format, Alpaca's for a run not fine-tuned), each answer ending at its end marker."""
    if run.chat_template is not None:
        texts = [f"{instruction}\n\n{input}" if input else instruction for instruction, input in asks]
        return Asked([chat_prompt(run, [("user", text)]).ids(run.tokenizer) for text in texts],
                     run.chat_template.end_of_turn)
    fmt = run.prompt_format or alpaca_format(run.tokenizer)
    return Asked([_instruction_prompt(run, fmt, instruction, input) for instruction, input in asks], (fmt.end,))


def text_stream(run: LoadedRun, asked: Asked, params: SamplingParams, step: Step | None = None,
                threads: Heard | None = None) -> TextStream:
    """The text of `asked`'s first prompt, its prefix first, piece by piece."""
    return TextStream(run.model, run.tokenizer, asked.prompts[0], asked.stopping(params), run.dtype, step,
                      asked.past_eot, threads, asked.prefix)


def continue_all(run: LoadedRun, asked: Asked, params: Sequence[SamplingParams], capacity: int = 1,
                 step: Step | None = None, progress: Callable[[int, int], None] | None = None,
                 setting: str = "--batch-size", ended: Callable[[int, Continuation], None] | None = None,
                 threads: Heard | None = None) -> list[Continuation]:
    """Every prompt of `asked` continued, drawn with its own of `params`, `capacity` (the option `setting`) decoded at
    once; the next prompt joins as soon as one ends. `ended` hears each as it ends (the prompt's index, its
    continuation): what a stop keeps."""
    params = [asked.stopping(p) for p in params]
    longest = max((len(p) + q.max_new_tokens for p, q in zip(asked.prompts, params)), default=0)
    batch = Batch(run.model, run.tokenizer, capacity, run.dtype, step, asked.past_eot, setting, longest, threads)
    waiting, done = list(zip(asked.prompts, params))[::-1], 0
    index: dict[Continuation, int] = {}  # in the prompts' order
    while waiting or len(batch):
        while waiting and batch.decoder.free:
            index[batch.add(*waiting.pop())] = len(index)
        for continuation, _ in batch.step():
            if continuation.finish_reason is not None:
                done += 1
                if ended:
                    ended(index[continuation], continuation)
                if progress:
                    progress(done, len(params))
    return list(index)


def sample(run: LoadedRun, prompt: str, params: SamplingParams) -> str:
    """The prompt and its continuation (`continuing`), decoded eagerly."""
    return text_stream(run, continuing(run, prompt), params).text()
