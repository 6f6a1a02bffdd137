"""Docs that cannot rot. Every guide in docs/guides runs top to bottom at a tiny scale (the `docs-test` directives
in each guide say how it is shrunk: docs/README.md); every `lmlab` command anywhere in README.md and docs/ parses
with the real parser and sets only config keys that exist (in examples/*/README.md too); every link resolves; the
generated reference pages equal what the code makes of itself."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import io
import json
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.commands import build_parser
from lmlab.commands.reference import PAGES, SECTIONS
from tests.helpers import (
    ALPACA_TINY,
    FENCE,
    Block,
    blocks,
    hellaswag_items,
    script,
    write_corpus,
    write_tiny_gpt2,
    write_wikitext,
)
from tests.hosts import two_hosts

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GUIDES = sorted((DOCS / "guides").glob("*.md"))
PAGES_CHECKED = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted(DOCS.rglob("*.md")),
                 *sorted(ROOT.glob("examples/*/README.md"))]
PARSER = build_parser()  # parsing leaves it as it was: one serves every command checked


def lmlab_commands(block: Block) -> list[list[str]]:
    """The argument lists of every `lmlab` command in a bash block (after `lmlab`, `python -m lmlab` or
    `torchrun ... -m lmlab`), one per command of a pipeline or list."""
    found = []
    text = re.sub(r"<<'?(\w+)'?\n.*?\n\1\n", "\n", block.text, flags=re.S)  # a here-document is a file's text
    for line in text.replace("\\\n", " ").splitlines():
        if not re.search(r"(^|\s)lmlab\s", line):
            continue
        line = re.sub(r"\s\d?(>>?|<)(&\d|\s*[^\s&|;]+)", " ", line)  # `> file`, `2>&1`: the shell's, not the command's
        lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;<>")
        lexer.whitespace_split, lexer.commenters = True, "#"
        words, command = list(lexer), []
        for word in words + [";"]:
            if word and set(word) <= set("|&;"):
                if (args := lmlab_args(command)) is not None:
                    found.append(args)
                command = []
            else:
                command.append(word)
    return found


def lmlab_args(words: list[str]) -> list[str] | None:
    """The arguments of one simple command if it runs lmlab (`lmlab ...`, `python -m lmlab ...`, `torchrun ... -m
    lmlab ...`, after any VAR=value), else None."""
    while words and re.match(r"^\w+=", words[0]):
        words = words[1:]
    if words[:1] == ["lmlab"]:
        return words[1:]
    if words[:1] in (["python"], ["python3"], ["torchrun"]) and "-m" in words:
        rest = words[words.index("-m") + 1:]
        rest = rest[1:] if rest[:1] == ["--"] else rest
        return rest[1:] if rest[:1] == ["lmlab"] else None
    return None


def check_command(args: list[str]) -> str | None:
    """Why `lmlab ARGS` would be refused by its parser, or names a preset (configs/NAME.toml) or a config key that
    does not exist, or None."""
    missing = [arg for arg in args if re.fullmatch(r"configs/[\w.-]+\.toml", arg) and not (ROOT / arg).exists()]
    if missing:
        return f"{missing[0]}: no such preset in configs/"
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
            parsed = PARSER.parse_args(args)
    except SystemExit as exit_:
        return None if exit_.code == 0 else err.getvalue().strip()
    for item in getattr(parsed, "set", None) or []:
        section, _, name = item.partition("=")[0].partition(".")
        fields = {f.name for f in dataclasses.fields(SECTIONS[section])} if section in SECTIONS else set()
        if name.split(".")[0] not in fields:
            return f"--set {item}: no config key {section}.{name} (docs/reference/config.md lists them)"
    return None


def all_blocks() -> list[Block]:
    return [block for page in PAGES_CHECKED for block in blocks(page)]


def test_every_lmlab_command_in_the_docs_parses_and_sets_keys_that_exist():
    checked, wrong = 0, []
    for block in all_blocks():
        if block.lang != "bash":
            continue
        for args in lmlab_commands(block):
            checked += 1
            if (why := check_command(args)) is not None:
                wrong.append(f"{block.where}: lmlab {shlex.join(args)}\n    {why}")
    assert checked > 50, f"only {checked} lmlab commands found in README.md and docs/"
    assert wrong == [], "\n".join(wrong)


def test_every_fence_says_its_language():
    """An untagged block would escape the command check: commands are ```bash, output ```text."""
    untagged = [block.where for block in all_blocks() if not block.lang]
    assert untagged == [], f"fences without a language (bash, text, python, toml, ...): {untagged}"


def test_the_command_check_catches_a_renamed_option_and_an_unknown_key():
    assert check_command(["train", "configs/gpt2-small.toml", "--budget", "5m"]) is None
    assert "--bugdet" in check_command(["train", "c.toml", "--bugdet", "5m"])
    assert "no config key train.lerning_rate" in check_command(["train", "c.toml", "--set", "train.lerning_rate=1"])
    assert "invalid choice" in check_command(["trian", "c.toml"])
    assert "no such preset" in check_command(["train", "configs/wikitext-word-cpu.toml"])
    assert resolves("lmlab.core.errors.UserError") and not resolves("lmlab.errors.UserError")
    block = Block(ROOT / "README.md", 1, "bash", "lmlab runs runs | head\nFOO=1 python -m lmlab plan c.toml \\\n"
                  "  --chinchilla && echo done\ncat > a.txt <<'EOF'\nlmlab x\nEOF\ngit clone x lmlab && cd lmlab\n"
                  "torchrun --nproc_per_node=2 -m -- lmlab train c.toml --run runs/a\ngit clone <url> lmlab\n"
                  "lmlab runs > runs.txt 2>&1\n")
    assert lmlab_commands(block) == [["runs", "runs"], ["plan", "c.toml", "--chinchilla"],
                                     ["train", "c.toml", "--run", "runs/a"], ["runs"]]


def test_append_and_replace_shrink_a_command_where_it_stands():
    block = Block(ROOT / "x.md", 1, "bash", "lmlab train c.toml --run runs/a | tail -3\nlmlab serve r --port 8000 &&"
                  " echo ok\nlmlab train c.toml   # a comment\n", replaces=[("8000", "{port}")],
                  appends=[("lmlab train", "--set train.max_iters=2")])
    assert block.to_run(1234).splitlines() == ["lmlab train c.toml --run runs/a --set train.max_iters=2 | tail -3",
                                               "lmlab serve r --port 1234 && echo ok",
                                               "lmlab train c.toml --set train.max_iters=2 # a comment"]


@functools.cache
def anchors(page: Path) -> set[str]:
    """The #anchors GitHub makes from a page's headings (lowercase, punctuation dropped, spaces as hyphens)."""
    made: dict[str, int] = {}
    inside = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            inside = not inside
        if inside or not (heading := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower().replace("`", "")).replace(" ", "-")
        made[slug] = made.get(slug, -1) + 1
    return {slug if n == 0 else f"{slug}-{i}" for slug, n in made.items() for i in range(n + 1)} | set(made)


def test_every_link_in_readme_and_docs_resolves():
    broken = []
    for page in PAGES_CHECKED:
        text = re.sub(r"^(`{3,}).*?^\1\s*$", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s):, mailto:: not followed offline
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading makes #{anchor})")
    assert broken == [], "\n".join(broken)


def test_every_file_and_test_the_docs_name_exists():
    """A path such as `lmlab/train/budget.py`, `configs/x.toml` or `tests/test_x.py::test_y` (the guarantees
    table names the tests that hold each promise) must name a file, and a test in it, that exist."""
    missing = []
    for page in PAGES_CHECKED:
        text = page.read_text(encoding="utf-8")
        for path, tests in re.findall(r"`((?:lmlab|tests|benchmarks|configs|examples|docs)/[\w/.\-]*\w)((?:::\w+)?)`",
                                      text):
            if not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
            elif tests and f"def {tests[2:]}(" not in (ROOT / path).read_text(encoding="utf-8"):
                missing.append(f"{page.relative_to(ROOT)}: {path}{tests}")
        for test in re.findall(r"`::(test_\w+)`", text):  # `::test_y` after a named file: anywhere in tests/
            if not any(f"def {test}(" in f.read_text(encoding="utf-8") for f in (ROOT / "tests").glob("test_*.py")):
                missing.append(f"{page.relative_to(ROOT)}: ::{test}")
    assert missing == [], "named in the docs but not in the tree: " + ", ".join(missing)


def resolves(dotted: str) -> bool:
    """Whether `lmlab.a.b.C` names a module, or a module's attribute, that exists."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(found, name):
                return False
            found = getattr(found, name)
        return True
    return False


def test_every_module_and_name_the_docs_name_exists():
    """`lmlab.core.errors.UserError` in a page must import; `lmlab.models` is the plugins' entry point group."""
    named = {(page, name) for page in PAGES_CHECKED
             for name in re.findall(r"`(lmlab(?:\.\w+)+)`", page.read_text(encoding="utf-8"))}
    missing = [f"{page.relative_to(ROOT)}: {name}" for page, name in sorted(named)
               if name != "lmlab.models" and not resolves(name)]
    assert len(named) > 3 and missing == [], missing


@pytest.mark.parametrize("columns", [None, "40", "300"])
@pytest.mark.parametrize("name", sorted(PAGES))
def test_the_generated_reference_is_up_to_date_whatever_the_terminals_width(name, columns, monkeypatch):
    if columns:
        monkeypatch.setenv("COLUMNS", columns)
    page = DOCS / "reference" / name
    assert page.exists() and page.read_text(encoding="utf-8") == PAGES[name](), (
        f"docs/reference/{name} differs from the code it documents: run `make docs` and commit it")


# --- the guides, run ---

@pytest.fixture(scope="session")
def fixtures(tmp_path_factory) -> Path:
    """The files docs/README.md promises a guide's test run: small, generated, offline."""
    tiny = tmp_path_factory.mktemp("docs") / "tiny"
    corpus = write_corpus(tiny / "corpus", n_docs=8, speeches=80)
    with open(tiny / "corpus.jsonl", "w", encoding="utf-8") as out:
        for doc in sorted(corpus.glob("*.txt")):
            out.write(json.dumps({"text": doc.read_text(encoding="utf-8")}) + "\n")
    write_wikitext(tiny / "wikitext")
    rows = hellaswag_items(random.Random(0), 12)
    (tiny / "hellaswag.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (tiny / "alpaca.json").write_bytes(ALPACA_TINY.read_bytes())
    write_tiny_gpt2(tiny / "gpt2", corpus)
    return tiny


def reader_folder(folder: Path, fixtures: Path) -> dict[str, str]:
    """A reader's folder (configs/, examples/ and the fixtures in tiny/) and the environment of their shell."""
    for name in ("configs", "examples"):
        (folder / name).symlink_to(ROOT / name)
    (folder / "tiny").symlink_to(fixtures)
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "80"}


@pytest.mark.slow
@pytest.mark.parametrize("guide", GUIDES, ids=[g.stem for g in GUIDES])
def test_the_guide_runs_top_to_bottom(guide, fixtures, tmp_path):
    env = reader_folder(tmp_path, fixtures)
    (tmp_path / ".guide.sh").write_text(script(guide, tmp_path), encoding="utf-8")
    done = subprocess.run(["bash", ".guide.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        said = done.stderr.rsplit(">>> docs-test: ", 1)
        where = said[1].split("\n", 1)[0] if len(said) == 2 else guide.name
        pytest.fail(f"the block at {where} failed (status {done.returncode}):\n{done.stdout[-3000:]}\n"
                    f"{said[-1][-3000:]}")


RECIPES = [page for page in PAGES_CHECKED if any(block.hosts for block in blocks(page))]


@pytest.mark.slow
@pytest.mark.parametrize("page", RECIPES, ids=[page.stem for page in RECIPES])
def test_the_multi_host_recipe_runs_on_two_hosts(page, fixtures, tmp_path):
    """The blocks a page marks `on node0` or `on node0 node1` run in order on two test hosts (network namespaces
    joined by a virtual link: tests/hosts.py), each on the hosts it names at once, in a folder they share."""
    env = {**reader_folder(tmp_path, fixtures), "OMP_NUM_THREADS": "1"}  # two hosts on the test's cores
    with two_hosts() as hosts:
        for n, block in enumerate(block for block in blocks(page) if block.hosts):
            runs = {}
            for name in block.hosts.split():  # each host's output in a file: a pipe read after the other's fills
                with open(tmp_path / f".{name}.{n}.log", "w", encoding="utf-8") as log:
                    runs[name] = hosts.popen(hosts.names.index(name), ["bash", "-c", f"set -euo pipefail\n"
                                             f"{block.to_run(0)}"], cwd=tmp_path, env=env, stdout=log,
                                             stderr=subprocess.STDOUT)
            for name, run in runs.items():
                if run.wait(timeout=600):
                    out = (tmp_path / f".{name}.{n}.log").read_text(encoding="utf-8")
                    pytest.fail(f"the block at {block.where} failed on {name} (status {run.returncode}):\n"
                                f"{out[-3000:]}")
