"""Chat templates: the Jinja template an instruct model ships, kept in the run it is imported into
(RUN/chat_template.json) and rendered as transformers' `apply_chat_template` does, in Jinja's immutable sandbox and
lmlab.run.sandbox's bounded workers. Stricter than transformers in one thing: a variable nobody set is refused by
name instead of rendering empty. The end of the assistant's turn (`<|im_end|>`, `<|eot_id|>`) is found by rendering
one exchange: generation stops there."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lmlab.core.errors import UserError
from lmlab.core.fileio import read_text
from lmlab.core.jsontext import parse_json
from lmlab.data.tokenizers import Tokenizer, json_object, token_text
from lmlab.run.sandbox import RENDER_CHARS, RENDER_MEMORY, RENDER_SECONDS, RenderError, render

# The special tokens transformers passes to a template (a tokenizer's `special_tokens_map`), when the tokenizer
# has them.
TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
PROBE = "lmlab-probe-7f3a"  # an assistant message whose end shows what the template writes after one
# A hostile probe: a long chat of long messages, turns alternating as strict templates want. A template whose work
# grows faster than its input (a loop over a message's characters inside another) passes a bound on it at import,
# rather than on a client's chat later.
LONG_CHAT = [{"role": ("user", "assistant")[i % 2], "content": "words of a message " * 200} for i in range(31)]


class Unrendered(UserError):
    """No template could be rendered: the sandbox's worker did not start (this installation's fault, not the
    template's nor the messages')."""


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template, the special tokens it may print, and the tokens that end the assistant's turn."""

    template: str
    tokens: dict[str, str]  # e.g. {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    end_of_turn: tuple[str, ...]  # token texts: a reply stops before the first of them
    source: str = ""  # the file it came from

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, where: str = "",
               what: str = "these messages") -> str:
        """The prompt for `messages` ({role, content} each), ending with the assistant's header when
        `add_generation_prompt`; a template that refuses them, fails, passes a bound of lmlab.run.sandbox or
        renders nothing is one sentence naming `where` (and `what` it was asked to render)."""
        variables = {"messages": messages, "tools": None, "documents": None,
                     "add_generation_prompt": add_generation_prompt, **self.tokens}
        try:
            text = render(self.template, variables)
        except RenderError as err:
            error = Unrendered if err.kind == "start" else UserError
            raise error(f"the chat template of {where or self.source} {self._failure(err, what)}")
        if not text:
            raise UserError(f"the chat template of {where or self.source} renders nothing for {what}; fix the "
                            "template.")
        return text

    def _failure(self, err: RenderError, what: str) -> str:
        """What went wrong, as the end of a sentence about the template."""
        fix = "fix the template."
        return {
            "syntax": f"is not valid Jinja (line {err.line}: {err.detail}); fix it, or remove it to import the model "
                      "without one.",
            "undefined": f"uses {err.detail}, which nothing sets (lmlab passes messages, add_generation_prompt, tools, "
                         f"documents and the special tokens {', '.join(self.tokens) or 'none'}); {fix}",
            "refused": f"cannot render {what}: {err.detail}",
            "time": f"takes more than {RENDER_SECONDS:g} s to render {what} (a loop that does not end?); {fix}",
            "memory": f"needs more than {RENDER_MEMORY >> 20} MiB to render {what}; {fix}",
            "recursion": f"recurses without end on {what} (a macro that calls itself?); {fix}",
            "size": f"renders more than {RENDER_CHARS:,} characters for {what}, longer than any prompt; {fix}",
            "crashed": f"crashed the process rendering it on {what}; {fix}",
            "start": f"could not be rendered: lmlab's process that renders chat templates did not start "
                     f"({err.detail}); reinstall lmlab and jinja2.",
        }[err.kind]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, path: Path) -> ChatTemplate:
        try:
            raw = parse_json(read_text(path))
            return cls(raw["template"], dict(raw["tokens"]), tuple(raw["end_of_turn"]), raw.get("source", ""))
        except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path} is not a chat template written by `lmlab import-hf` ({err}); restore or "
                            "delete it.")


def _read_template(folder: Path) -> tuple[str, Path] | None:
    """The folder's chat template and the file it is in: chat_template.jinja (transformers 4.43 and later write it),
    else tokenizer_config.json's chat_template (text, or a list of named ones, of which "default" is used)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return read_text(jinja), jinja
        except UnicodeDecodeError:
            raise UserError(f"{jinja} is not UTF-8 text; download the model's files again.")
    config = folder / "tokenizer_config.json"
    raw = json_object(config).get("chat_template")
    if isinstance(raw, list):
        raw = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}.get("default")
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw.strip():
        raise UserError(f"{config}: chat_template is not a template's text (nor a list naming a \"default\" one); "
                        "fix the file, or remove chat_template to import the model without one.")
    return raw, config


def read_chat_template(folder: Path, tokenizer: Tokenizer) -> ChatTemplate | None:
    """The chat template of a Hugging Face folder, checked by rendering one exchange and the hostile probes (a
    template that cannot, or passes a bound on them, is refused in one sentence), with the special tokens it may
    print and its end-of-turn token; None when the folder has none."""
    found = _read_template(Path(folder))
    if found is None:
        return None
    template, path = found
    settings = json_object(Path(folder) / "tokenizer_config.json")
    tokens = {name: text for name in TOKEN_NAMES if (text := token_text(settings.get(name))) is not None}
    if tokenizer.eot_token is not None:
        tokens.setdefault("eos_token", tokenizer.eot_token)
    chat = ChatTemplate(template, tokens, (), str(path))
    rendered = chat.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE}], False,
                           what="a user's message and a reply")
    chat.render(LONG_CHAT, what=f"a chat of {len(LONG_CHAT)} messages of {len(LONG_CHAT[0]['content']):,} characters")
    after = rendered[rendered.rfind(PROBE) + len(PROBE):].lstrip() if PROBE in rendered else ""
    # The longest special token the text after the assistant's message starts with (none: the eos ends a turn).
    specials = sorted((t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special),
                      key=len, reverse=True)
    end = next((t for t in specials if after.startswith(t)), None)
    return ChatTemplate(template, tokens, (end,) if end else (), str(path))
