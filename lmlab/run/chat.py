"""Chat templates: the Jinja template an instruct model ships (tokenizer_config.json's `chat_template`, or
chat_template.jinja), kept in the run it is imported into (RUN/chat_template.json) and rendered as transformers'
`apply_chat_template` renders it: in Jinja's immutable sandbox (a template is code from the Hub: it may read its
arguments, not reach Python's internals), with trim_blocks and lstrip_blocks, loop controls, a `tojson` that keeps
non-ASCII text, and `raise_exception` and `strftime_now`.

One thing is stricter than transformers: a template that uses a variable nobody set (a special token the
tokenizer does not have, a name only another program passes) is refused with its name instead of rendering it as
empty text. A key missing from a message (`message.tool_calls`) is empty, as templates expect.

The end of the assistant's turn is the special token the template writes after an assistant message
(`<|im_end|>` for Qwen, `<|eot_id|>` for Llama 3), found by rendering one exchange: generation stops there.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
from jinja2.utils import missing

from lmlab.core.errors import UserError
from lmlab.data.tokenizers import Tokenizer

# The special tokens transformers passes to a template (a tokenizer's `special_tokens_map`), when the tokenizer
# has them.
TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
PROBE = "lmlab-probe-7f3a"  # an assistant message whose end shows what the template writes after one


class _Unset(jinja2.Undefined):
    """A variable nobody passed fails where it is used (printed, tested, looped over, compared); a missing key or
    attribute of a value the template was given is empty, as in transformers. `is defined` works for both."""

    __slots__ = ()

    def _top_level(self) -> bool:
        return self._undefined_obj is missing

    def _check(self) -> None:
        if self._top_level():
            self._fail_with_undefined_error()

    def __str__(self) -> str:
        self._check()
        return ""

    def __bool__(self) -> bool:
        self._check()
        return False

    def __iter__(self):
        self._check()
        return iter(())

    def __len__(self) -> int:
        self._check()
        return 0

    def __eq__(self, other: object) -> bool:
        self._check()
        return type(self) is type(other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = jinja2.Undefined.__hash__


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks; rendering a prompt
    only needs its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=_Unset,
                                                       extensions=[jinja2.ext.loopcontrols, _Generation])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template, the special tokens it may print, and the tokens that end the assistant's turn."""

    template: str
    tokens: dict[str, str]  # e.g. {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    end_of_turn: tuple[str, ...]  # token texts: a reply stops before the first of them
    source: str = ""  # the file it came from

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, where: str = "") -> str:
        """The prompt for `messages` ({role, content} each), ending with the assistant's header when
        `add_generation_prompt`; a template that refuses them, or fails, is one sentence naming `where`."""
        try:
            return _compile(self.template).render(messages=messages, tools=None, documents=None,
                                                  add_generation_prompt=add_generation_prompt, **self.tokens)
        except jinja2.UndefinedError as err:
            raise UserError(f"the chat template of {where or self.source} uses {_first_line(err)}, which nothing "
                            f"sets (lmlab passes messages, add_generation_prompt, tools, documents and the special "
                            f"tokens {', '.join(self.tokens) or 'none'}); fix the template.")
        except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as err:
            raise UserError(f"the chat template of {where or self.source} cannot render these messages: "
                            f"{_first_line(err)}")

    def to_json(self) -> str:
        return json.dumps({"template": self.template, "tokens": self.tokens, "end_of_turn": list(self.end_of_turn),
                           "source": self.source}, indent=2)

    @classmethod
    def from_json(cls, path: Path) -> ChatTemplate:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(raw["template"], dict(raw["tokens"]), tuple(raw["end_of_turn"]), raw.get("source", ""))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path} is not a chat template written by `lmlab import-hf` ({err}); restore or "
                            "delete it.")


def _first_line(err: Exception) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: its text, or an AddedToken's {"content": ...}."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) and value else None


def _read_template(folder: Path) -> tuple[str, Path] | None:
    """The folder's chat template and the file it is in: chat_template.jinja (transformers 4.43 and later write it),
    else tokenizer_config.json's chat_template (text, or a list of named ones, of which "default" is used)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8"), jinja
        except UnicodeDecodeError:
            raise UserError(f"{jinja} is not UTF-8 text; download the model's files again.")
    config = folder / "tokenizer_config.json"
    raw = _config(config).get("chat_template")
    if isinstance(raw, list):
        named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
        raw = named.get("default")
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw.strip():
        raise UserError(f"{config}: chat_template is not a template's text (nor a list naming a \"default\" one); "
                        "fix the file, or remove chat_template to import the model without one.")
    return raw, config


def _config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def read_chat_template(folder: Path, tokenizer: Tokenizer) -> ChatTemplate | None:
    """The chat template of a Hugging Face folder, checked by rendering one exchange (a template that cannot is
    refused with its own error), with the special tokens it may print and its end-of-turn token; None when the
    folder has none."""
    found = _read_template(Path(folder))
    if found is None:
        return None
    template, path = found
    settings = _config(Path(folder) / "tokenizer_config.json")
    tokens = {name: text for name in TOKEN_NAMES if (text := _token_text(settings.get(name))) is not None}
    if tokenizer.eot_token is not None:
        tokens.setdefault("eos_token", tokenizer.eot_token)
    try:
        _compile(template)
    except jinja2.TemplateSyntaxError as err:
        raise UserError(f"{path}: the chat template is not valid Jinja (line {err.lineno}: {err.message}); fix it, or "
                        "remove it to import the model without one.")
    chat = ChatTemplate(template, tokens, (), str(path))
    rendered = chat.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE}], False)
    after = rendered[rendered.rfind(PROBE) + len(PROBE):].lstrip() if PROBE in rendered else ""
    # The longest special token the text after the assistant's message starts with (none: the eos ends a turn).
    specials = sorted((t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special),
                      key=len, reverse=True)
    end = next((t for t in specials if after.startswith(t)), None)
    return ChatTemplate(template, tokens, (end,) if end else (), str(path))
