"""`make demo` in a fresh copy of the checkout builds the venv a new user gets (the pinned torch and lmlab with the
extras the README's tour uses, none of the test extras; a 20-second budget), and the README's tour runs in it end
to end: every block from the 60-second tour on, as tests/test_docs.py runs a guide, shrunk by the README's
`docs-test` directives; the server answers a completion, and llama.cpp loads the GGUF file export-gguf writes and
continues a prompt with it.

Nothing is downloaded: pip installs from a folder of wheels made from the test venv's own installed distributions
(their files as each one's RECORD lists them), with `PIP_NO_INDEX`, so the Makefile's pip commands run as they are
and resolve lmlab's dependencies as a user's pip would, from what this machine already has. `llama-cli` is played
by llama.cpp's Python binding (llama-cpp-python, a test extra), which loads the file with llama.cpp's own code."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import Distribution, distribution, version
from pathlib import Path

import pytest

from tests.helpers import CPU_KIND_HOOK, ROOT, closure, script

LLAMA_CLI = '''#!{python}
"""llama-cli -m FILE -p PROMPT -n N, through llama.cpp's Python binding: the prompt and N tokens greedily."""
import argparse

from llama_cpp import Llama

parser = argparse.ArgumentParser()
parser.add_argument("-m", required=True)
parser.add_argument("-p", default="")
parser.add_argument("-n", type=int, default=-1)
args = parser.parse_args()
model = Llama(args.m, n_ctx=0, verbose=False)
print(args.p + model(args.p, max_tokens=args.n, temperature=0)["choices"][0]["text"])
'''


def fresh_copy(target: Path) -> Path:
    """The checkout as a clone of it holds it, its uncommitted edits included: the files git tracks or would
    track, none it ignores (no .venv, data, runs or caches)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


def repack(dist: Distribution, folder: Path) -> Path:
    """A wheel of an installed distribution: its files as RECORD lists them (not the scripts pip wrote from its
    entry points, nor what pip added: INSTALLER, REQUESTED, direct_url.json), under the tag its WHEEL file names."""
    tags = [line.split(": ", 1)[1].split("-") for line in dist.read_text("WHEEL").splitlines()
            if line.startswith("Tag: ")]
    tag = "-".join(".".join(dict.fromkeys(part[i] for part in tags)) for i in range(3))  # py2.py3-none-any
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    info = next(f.parts[0] for f in dist.files if f.parts[0].endswith(".dist-info"))
    added = {f"{info}/{n}" for n in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    path, record = folder / f"{name}-{dist.version}-{tag}.whl", []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as wheel:
        for file in dist.files:
            if file.parts[0] == ".." or "__pycache__" in file.parts or str(file) in added:
                continue
            data = Path(file.locate()).read_bytes()
            wheel.writestr(str(file), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{file},sha256={digest},{len(data)}")
        wheel.writestr(f"{info}/RECORD", "\n".join(record + [f"{info}/RECORD,,"]) + "\n")
    return path


def wheelhouse(folder: Path) -> Path:
    """Wheels of everything `make demo` installs: torch, lmlab's dependencies and its serve and gguf extras, and
    setuptools, which builds lmlab."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    folder.mkdir()
    for name in closure([*project["dependencies"], *extras["serve"], *extras["gguf"], "torch", "setuptools"]):
        repack(distribution(name), folder)
    return folder


@pytest.mark.host_cpu  # a new user's machine, as it is
@pytest.mark.slow
def test_make_demo_in_a_fresh_copy_then_the_readme_tour(tmp_path):
    repo = fresh_copy(tmp_path / "lmlab")
    wheels = wheelhouse(tmp_path / "wheels")
    bin_ = tmp_path / "bin"  # what the user has on PATH besides the venv: llama.cpp's llama-cli
    bin_.mkdir()
    (bin_ / "llama-cli").write_text(LLAMA_CLI.format(python=sys.executable))
    (bin_ / "llama-cli").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    # PIP_NO_COMPILE: Python compiles what the demo imports as it imports it, not all of torch's files up front.
    # PYTHONPATH: the suite's CPU kind (tests/cpu_kind), which imports nothing until lmlab is imported.
    env |= {"PATH": "/usr/bin:/bin", "COLUMNS": "80", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels),
            "PIP_NO_COMPILE": "1", "PYTHONPATH": str(CPU_KIND_HOOK)}
    made = subprocess.run(["make", "demo", f"PYTHON={sys._base_executable}", f"TORCH=torch=={version('torch')}",
                           "DEMO_BUDGET=20s"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    assert "--- a 500-character sample from runs/demo-" in made.stdout
    # The run's figure, its last checkpoint scored on the val split, is what it says last before the sample.
    said = made.stdout.split("--- a 500-character sample")[0].split("\nfinal val ")
    assert len(said) == 2 and re.match(r"\d\.\d{4}( ± \d\.\d{4} \(standard error\))?: the last checkpoint", said[1])
    venv = repo / ".venv" / "bin"
    installed = subprocess.run([venv / "python", "-c", "import importlib.util as u; print([m for m in ('fastapi', "
                                "'uvicorn', 'prometheus_client', 'gguf', 'pytest', 'transformers', 'llama_cpp') "
                                "if u.find_spec(m)])"], capture_output=True, text=True, env=env)
    assert installed.stdout.strip() == "['fastapi', 'uvicorn', 'prometheus_client', 'gguf']", installed.stderr

    env["PATH"] = f"{venv}{os.pathsep}{bin_}{os.pathsep}{env['PATH']}"  # `source .venv/bin/activate`
    text = script(ROOT / "README.md", repo)
    (repo / ".tour.sh").write_text(text, encoding="utf-8")
    done = subprocess.run(["bash", ".tour.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reply = done.stdout[done.stdout.index('{"id"'):]  # curl's answer, which ends without a line break
    answer = json.JSONDecoder().raw_decode(reply)[0]
    assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] == 40
    assert "\nROMEO:" in done.stdout[done.stdout.index("wrote exported/gpt.gguf"):]  # llama-cli's continuation
    from llama_cpp import Llama

    model = Llama(str(repo / "exported" / "gpt.gguf"), n_ctx=0, verbose=False)
    vocab = json.loads((repo / "runs" / "gpt" / "dataset.json").read_text())["vocab_size"]
    assert model.n_vocab() == vocab and model("ROMEO:", max_tokens=8, temperature=0)["usage"]["completion_tokens"]

    # An extra the demo does not install is named with the pip command of this checkout and venv.
    answers = repo / "answers.jsonl"
    answers.write_text(json.dumps({"instruction": "Say hi.", "output": "hi", "model_answer": "hello"}) + "\n")
    judged = subprocess.run(["lmlab", "judge", "--answers", "answers.jsonl", "--endpoint", "http://127.0.0.1:9/v1",
                             "--model", "j"], cwd=repo, env=env, capture_output=True, text=True)
    assert (judged.returncode, judged.stderr) == (2, "error: lmlab judge needs openai, which is not installed; "
                                                      "install it with `pip install -e '.[judge]'`.\n")


@pytest.mark.parametrize("gpu, given, device", [
    (False, [], "cpu"),  # a laptop: the CPU, as it always was (a Mac's MPS too)
    (True, [], "auto"),  # a machine with an NVIDIA GPU: lmlab's auto, which takes it where its torch can use it
    (True, ["DEVICE=cpu"], "cpu"),  # the laptop demo on a GPU machine
], ids=["no gpu", "a gpu", "DEVICE=cpu on a gpu"])
def test_make_demo_trains_on_the_gpu_where_the_machine_has_one_unless_told_cpu(tmp_path, gpu, given, device):
    """The same two commands on any machine: the demo's device is the GPU's where nvidia-smi is on the PATH."""
    bin_ = tmp_path / "bin"  # the PATH: the clock the run's name reads, and nvidia-smi where the machine has a GPU
    bin_.mkdir()
    (bin_ / "date").symlink_to(shutil.which("date"))
    if gpu:
        (bin_ / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3'\n")
        (bin_ / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "DEVICE"} | {"PATH": str(bin_)}
    done = subprocess.run([shutil.which("make"), "-n", "demo", *given], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    train = next(line for line in done.stdout.splitlines() if "lmlab train configs/" in line)
    assert "shakespeare-char-modern-cpu.toml --run runs/demo-2" in train and f" --device {device} " in train
