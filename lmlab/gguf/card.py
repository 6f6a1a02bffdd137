"""The model card beside an exported GGUF file (NAME.md) and an Ollama Modelfile (NAME.Modelfile): what the file
holds, and how to run it in llama.cpp, Ollama and LM Studio.

Ollama puts a chat's message into the Modelfile's TEMPLATE and stops at its `stop` strings. The template is the
prompt `lmlab serve` builds for a one-message chat (`generate.chat_prompt`: an imported instruct model's chat
template, a fine-tuned run's prompt format, else a `user: ... assistant:` transcript) with the message replaced by
Ollama's `{{ .Prompt }}`, and the stops are what ends lmlab's reply there, with the end-of-text token.
"""

from __future__ import annotations

from pathlib import Path

from lmlab.core.fileio import atomic_write_text
from lmlab.gguf.vocab import Vocab
from lmlab.inference.generate import chat_prompt
from lmlab.run.rundir import LoadedRun
from lmlab.writeup.document import Block, Code, Heading, Paragraph, Table, code, plain, to_markdown

MESSAGE = "\x00lmlab-message\x00"  # stands for the user's message while the prompt is rendered
# A stop string as a Modelfile writes it, in double quotes: escapes for quotes, backslashes and line breaks.
STOP_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t"})

def card_paths(out: Path) -> tuple[Path, Path]:
    """The model card and the Modelfile written beside `out`."""
    return out.with_suffix(".md"), out.with_suffix(".Modelfile")


def modelfile(out: Path, run: LoadedRun) -> str:
    """The Modelfile of `out`: its TEMPLATE (Go template text), its stop strings and the context length."""
    prompt = chat_prompt(run, [("user", MESSAGE)])
    before, _, after = prompt.text.partition(MESSAGE)
    template = before.replace("{{", "{{ \"{{\" }}") + "{{ .Prompt }}" + after.replace("{{", "{{ \"{{\" }}")
    stops = [*prompt.stop, run.tokenizer.eot_token]  # the end-of-text token is vocab.eos's; a char run has none
    lines = [f"FROM ./{out.name}", f'TEMPLATE """{template}"""',
             *(f'PARAMETER stop "{stop.translate(STOP_ESCAPES)}"' for stop in dict.fromkeys(stops)
               if stop is not None),
             f"PARAMETER num_ctx {run.config.model.block_size}"]
    return "\n".join(lines) + "\n"


def write_card(out: Path, run: LoadedRun, arch: str, vocab: Vocab, kind: str) -> None:
    """NAME.md and NAME.Modelfile beside the GGUF file `out`."""
    card, model_file = card_paths(out)
    cfg, name, file = run.config.model, out.stem, out.name
    tokenizer = ("the run's characters (llama.cpp's `rwkv` tokenizer: one token per character)"
                 if vocab.model == "rwkv" else f"byte-level BPE, pre-tokenizer {code(vocab.pre)}")
    ends = f"{code(run.tokenizer.eot_token)} (id {vocab.eos})" if vocab.eos is not None else \
        "none (a char model has no end-of-text token: generation runs to its length, as `lmlab sample` does)"
    template = "its chat template (`tokenizer.chat_template`)" if run.chat_template else "no chat template"
    # A prompt the run can read: a char model knows only its corpus' characters.
    prompt = "ROMEO:" if not run.tokenizer.unseen("ROMEO:") else next(
        (c for c in sorted(run.tokenizer.vocab) if c.isalpha()), "")
    facts = [("architecture", f"`{arch}`, {cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads, "
                              f"context {cfg.block_size}"),
             ("parameters", f"{run.model.num_params():,}"), ("weights", kind),
             ("tokenizer", f"{code(run.tokenizer.spec)}: {tokenizer}, {len(vocab.tokens):,} tokens"),
             ("end of text", ends), ("chat", template)]
    blocks: list[Block] = [
        Paragraph(f"Exported by `lmlab export-gguf` from run {code(run.run.path)}, checkpoint {run.checkpoint} "
                  f"(step {run.step})."),
        Table(["", ""], [list(fact) for fact in facts]),  # a pipe in a cell (`<|endoftext|>`) escaped, as tables need
        Heading("llama.cpp"),
        Code(f'llama-cli -m {file} -p "{prompt}" -n 200 --temp 0.8\nllama-server -m {file} --port 8080', ""),
        Paragraph("From Python (`pip install llama-cpp-python`):"),
        Code(f'from llama_cpp import Llama\nllm = Llama("{file}", n_ctx={cfg.block_size})\n'
             f'print(llm("{prompt}", max_tokens=200, temperature=0.8)["choices"][0]["text"])', "python"),
        Heading("Ollama"),
        Paragraph(f"{code(model_file.name)} (beside this card) holds the prompt template and stop strings of a "
                  "chat, as `lmlab serve`\nputs a message to this run:"),
        Code(f"ollama create {name} -f {model_file.name}\nollama run {name}", ""),
        Heading("LM Studio"),
        Code(f"lms import {file}", ""),
        Paragraph(f"or copy {code(file)} to {code(f'~/.lmstudio/models/lmlab/{name}/')}, then load it from the model "
                  "list."),
    ]
    atomic_write_text(model_file, modelfile(out, run))
    atomic_write_text(card, to_markdown(plain(name), blocks))
