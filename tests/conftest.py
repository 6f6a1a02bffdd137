"""Shared fixtures: a small generated corpus, prepared datasets, tiny trained runs and a fake GPU (the plain
helpers are in tests/helpers.py)."""

from __future__ import annotations

import os
import time

# The tests read piped output at the width lmlab gives it (lmlab.commands.common: whole lines unless COLUMNS says
# otherwise), so a COLUMNS from the shell or the runner (pytest-xdist's workers get 80) must not fold them.
os.environ.pop("COLUMNS", None)
# The decode steps the tests compile are checked for what they compute, not for their speed: without Inductor's GEMM
# tuning each builds in a third to a half of the time (lmlab.inference.compiled.autotuned), here and in the commands
# the tests start.
os.environ["TORCHINDUCTOR_MAX_AUTOTUNE"] = "0"
# torch's OpenMP threads (libgomp) spin while they wait for each other by default, which on cores shared with the
# other worker (or anything else) stalls a tiny model's ops: a small model's 300 forward passes took 0.5 s alone and
# 20-50 s beside a twin on 2 cores, 0.6-1.2 s with passive waits. The tests check what the commands compute and
# choose, never their speed; set before torch is imported (libgomp reads it once), here and in the commands started.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from lmlab.core.config_toml import load_config  # noqa: E402
from lmlab.data.prepare import prepare  # noqa: E402
from lmlab.train.loop import Trainer  # noqa: E402
from lmlab.train.preflight import train_job  # noqa: E402
from tests.helpers import (  # noqa: E402
    ALPACA_TINY,
    SUITE_CPU,
    HostTwins,
    fake_cpu,
    forget_choices,
    write_config,
    write_corpus,
    write_tiny_gpt2,
    write_wikitext,
)

# Every test, its session's fixtures and the commands it starts answer lmlab's CPU capability checks as one kind of
# CPU on every host (tests.helpers.SUITE_CPU), so no verdict depends on the kind CI's machine is that day; a test of
# another kind's path fakes that kind (`fake_cpu`), and one marked `host_cpu` sees the host as it is.
fake_cpu(pytest.MonkeyPatch(), SUITE_CPU)

pytest_plugins = ["pytester"]  # tests/test_host_twins.py runs a suite of its own


def pytest_configure(config) -> None:
    config.pluginmanager.register(HostTwins(), "host-twins")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `cuda` run only where PyTorch sees a CUDA GPU; elsewhere they are skipped, saying why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"no CUDA GPU visible to torch {torch.__version__}; run them on a GPU machine "
                                   "(`make gpu-report` does)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory) -> Path:
    """The machine cache (lmlab.core.cache) of the tests, and of the commands they start, is their own. Its CPU peaks
    are measured for real first (a few more tries if the machine is busy), so the tests' runs do not each measure
    them again; on a machine that stays busy they stay busy (and give no MFU)."""
    import torch

    from lmlab.core.peak import measure_into_cache

    folder = tmp_path_factory.mktemp("cache")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    for dtype in (torch.float32, torch.bfloat16):
        for _ in range(3):
            if measure_into_cache(torch.device("cpu"), dtype).quiet:
                break
    return folder


@pytest.fixture(autouse=True)
def own_machine_cache(own_cache, monkeypatch) -> None:
    """Each test starts with no step timings or calibrations kept (lmlab.train.timing, lmlab.experiments.calibration),
    and no note of the cache's left unsaid by another test's command: a test's faked or damaged entries, or another
    test's shape's, are not read back; its own commands keep and read back theirs."""
    from lmlab.core import cache

    forget_choices()
    monkeypatch.setattr(cache, "_notes", {})


@pytest.fixture(autouse=True)
def a_command_per_process(monkeypatch) -> None:
    """A command run in the test's process (`main([...])`) starts as if its process started with the test: a budget
    counts the process's age (lmlab.core.busy.process_age), and a pytest worker's grows for the whole suite."""
    started = time.time()
    monkeypatch.setattr("lmlab.core.busy.process_age", lambda: time.time() - started)


@pytest.fixture(autouse=True)
def host_cpu(request, monkeypatch) -> None:
    """A test marked `host_cpu` sees the host's CPU as it is, not as `SUITE_CPU`, in its process and its commands."""
    if request.node.get_closest_marker("host_cpu") is not None:
        fake_cpu(monkeypatch, None)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def char_dataset(tmp_path_factory, corpus_dir) -> Path:
    target, _, _ = prepare([str(corpus_dir)], "char", name="tiny", out_dir=tmp_path_factory.mktemp("data"))
    return target


@pytest.fixture(scope="session")
def stable_root(tmp_path_factory) -> Path:
    """A folder holding `corpus/` and `data/tiny-char`, prepared from the relative path `corpus`: document names,
    which decide the split, are the paths as given, so this dataset is byte for byte the same on every machine
    and in every temporary folder (tests/data/legacy/trained was trained on it; the golden curve too)."""
    root = tmp_path_factory.mktemp("stable")
    here = os.getcwd()
    os.chdir(root)
    try:
        prepare([str(write_corpus(Path("corpus")).name)], "char", name="tiny", out_dir=Path("data"))
    finally:
        os.chdir(here)
    return root


@pytest.fixture(scope="session")
def writing_char_run(tmp_path_factory, char_dataset) -> Path:
    """A char run (GPT-2's shape, context 80) trained long enough that its greedy text has words, not only line
    breaks: what a continuation compared token for token, or shown on a page, needs."""
    from rich.console import Console

    from lmlab.core.config_toml import load_config
    from lmlab.train.loop import Trainer
    from lmlab.train.preflight import train_job

    root = tmp_path_factory.mktemp("writing")
    overrides = ["model.block_size=80", "train.max_iters=60", "train.eval_interval=60", "train.eval_iters=2",
                 "train.checkpoint_interval=60", "train.learning_rate=1e-2", "train.dtype=float32",
                 "train.compile=false"]
    config = load_config(write_config(root / "plays.toml", char_dataset), overrides)
    return Trainer(train_job(config, root / "plays", "cpu", console=Console(quiet=True))).run().run_dir


@pytest.fixture(scope="session")
def hf_gpt2(tmp_path_factory, corpus_dir) -> Path:
    return write_tiny_gpt2(tmp_path_factory.mktemp("hf") / "tiny-gpt2", corpus_dir)


@pytest.fixture(scope="session")
def imported_gpt2(tmp_path_factory, hf_gpt2) -> Path:
    """The tiny GPT-2 as an lmlab run, with its byte-level BPE tokenizer."""
    from lmlab.hf import import_hf

    return Path(import_hf(hf_gpt2, tmp_path_factory.mktemp("runs") / "tiny-gpt2")["run"])


@pytest.fixture(scope="session")
def wikitext_dataset(tmp_path_factory) -> Path:
    """The stand-in prepared as WikiText-2 is studied: words, the most frequent 300 and `<unk>`."""
    root = tmp_path_factory.mktemp("wikitext")
    target, _, _ = prepare([str(write_wikitext(root / "corpus"))], "word:300", name="wikitext", out_dir=root / "data")
    return target


CHROMIUM = "/usr/bin/chromium"
# As root Chromium needs --no-sandbox; the rest keep it off the network it would otherwise call (updates, sync).
FLAGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--disable-gpu", "--disable-quic", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium, driven by Playwright (no browser is downloaded): one for a test file's pages."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def fake_gpu(monkeypatch):
    """Makes torch.cuda report one GPU (what lmlab reads of it: availability, name, compute capability, the arch
    list of this torch build, the CUDA version, free and held memory), for the CUDA paths' decisions on a machine
    without one; `install(...)` with other figures changes it."""
    import torch

    def install(name: str = "NVIDIA A100-SXM4-80GB", capability: tuple[int, int] = (8, 0),
                arch: tuple[str, ...] = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"), cuda: str = "12.8",
                free: int = 70 * 2**30, total: int = 80 * 2**30, reserved: int = 0, allocated: int = 0) -> None:
        facts = {"is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
                 "get_device_name": lambda device=None: name, "get_device_capability": lambda device=None: capability,
                 "get_arch_list": lambda: list(arch), "mem_get_info": lambda device=None: (free, total),
                 "memory_reserved": lambda device=None: reserved, "memory_allocated": lambda device=None: allocated}
        for attribute, value in facts.items():
            monkeypatch.setattr(torch.cuda, attribute, value)
        monkeypatch.setattr(torch.version, "cuda", cuda)

    install()
    return install


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, char_dataset) -> Path:
    """A tiny char run trained 10 steps in float32 (its checkpoint at step 10): the run the commands' refusals and
    faults are tried on (tests that change it work on a copy)."""
    root = tmp_path_factory.mktemp("tiny")
    return Trainer(train_job(load_config(write_config(root / "tiny.toml", char_dataset, max_iters=10)), root / "run",
                   "cpu")).run().run_dir


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, imported_gpt2) -> Path:
    """The tiny GPT-2 fine-tuned one epoch on tests/data/alpaca_tiny.json: the instruct model the servers serve."""
    from lmlab.core.config import FinetuneConfig
    from lmlab.train.finetune import finetune

    run = tmp_path_factory.mktemp("runs") / "sft"
    finetune(imported_gpt2, run, FinetuneConfig(str(ALPACA_TINY), epochs=1, learning_rate=3e-3), device="cpu")
    return run


@pytest.fixture(scope="session")
def trained(tmp_path_factory, char_dataset) -> Path:
    """A tiny char run trained 20 steps (checkpoints at 10 and 20); tests that change it work on a copy."""
    root = tmp_path_factory.mktemp("trained")
    cfg = load_config(write_config(root / "tiny.toml", char_dataset, max_iters=20))
    return Trainer(train_job(cfg, root / "run", "cpu")).run().run_dir
