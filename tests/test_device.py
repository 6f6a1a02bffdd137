"""Device choice (lmlab/core/device.py): the torch lmlab needs, and a CUDA GPU taken only where this torch build has
kernels for it and the driver runs it, checked with torch.cuda's answers faked where there is no GPU."""

import importlib
import json
import os
import re
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmlab.core.device import (
    TORCH_APIS,
    TORCH_BUILDS,
    TORCH_FLOOR,
    TORCH_RELEASE,
    check_torch,
    resolve_device,
    runs_on,
    wheel_for,
)
from lmlab.core.errors import UserError
from lmlab.core.peak import choose_dtype
from lmlab.run.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "\n".join(p.read_text() for p in (ROOT / "lmlab").rglob("*.py"))
CU128 = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")
CU126 = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")


def test_the_torch_floor_is_the_newest_api_lmlab_calls():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(re.fullmatch(r"torch>=(\d+)\.(\d+)", d) for d in dependencies if d.startswith("torch"))
    assert (int(floor[1]), int(floor[2])) == TORCH_FLOOR == max(TORCH_APIS.values()) == (2, 9)
    for api in TORCH_APIS:
        assert api.rsplit(".", 1)[-1] in SOURCE, f"{api} is listed but lmlab does not call it"
        if api == "enable_gqa":
            assert "enable_gqa" in F.scaled_dot_product_attention.__doc__
        else:
            module, _, name = api.rpartition(".")
            assert hasattr(importlib.import_module(module), name)  # this torch has it


def test_an_older_torch_is_refused_naming_what_it_lacks(monkeypatch):
    check_torch()
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu124")
    with pytest.raises(UserError, match=r"this is torch 2\.5\.1\+cu124, and lmlab needs 2\.9 or later \(for "
                                        r"torch\.optim\.Muon, torch\.distributed\.fsdp\.fully_shard, "
                                        r"torch\._inductor\.aoti_compile_and_package\)"):
        resolve_device("cpu")


@pytest.mark.parametrize("capability, arch, runs", [
    ((8, 6), ("sm_80",), True),  # a cubin runs on its major's later minors
    ((9, 0), ("sm_90a",), True), ((9, 1), ("sm_90a",), False),  # arch-specific: that capability alone
    ((12, 0), ("sm_80", "sm_90", "compute_90"), True),  # PTX: compiled by the driver for a later GPU
    ((12, 0), CU126, False), ((7, 0), CU128, False), ((7, 5), CU128, True), ((6, 1), CU126, True),
])
def test_a_build_runs_a_gpu_by_its_cubins_or_ptx(capability, arch, runs):
    assert runs_on(capability, list(arch)) is runs


def test_a_gpu_this_build_cannot_run_is_refused_naming_the_build_that_does(fake_gpu):
    fake_gpu(name="Tesla V100-SXM2-16GB", capability=(7, 0), arch=CU128)
    with pytest.raises(UserError, match=r"--device cuda: the GPU Tesla V100-SXM2-16GB \(compute capability 7\.0\) has "
                                        r"no kernels in this PyTorch .*built for sm_75 .* sm_120\); install PyTorch's "
                                        r"CUDA 12\.6 build.*whl/cu126"):
        resolve_device("cuda")
    fake_gpu(name="NVIDIA GeForce RTX 5090", capability=(12, 0), arch=CU126)
    with pytest.raises(UserError, match=r"CUDA 13\.0 build \(pip install torch==2\.13\.0 --index-url \S+/whl/cu130\), "
                                        r"which needs NVIDIA driver 580 or newer; with an older driver, its CUDA 12\.6 "
                                        r"build \(pip install torch==2\.13\.0 --index-url \S+/whl/cu126\)"):
        resolve_device("cuda")
    fake_gpu(name="Tesla T4", capability=(7, 5), arch=CU128)
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda")


def test_auto_passes_an_unusable_gpu_over_for_the_cpu_with_a_note(fake_gpu, capsys):
    fake_gpu(name="Tesla P100-PCIE-16GB", capability=(6, 0), arch=CU128)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    note = capsys.readouterr().err
    assert note.count("note: the GPU Tesla P100-PCIE-16GB (compute capability 6.0) has no kernels") == 1
    assert note.strip().endswith("computing on the CPU (--device cpu says so and hides this note).")


def test_a_driver_older_than_the_builds_cuda_is_named_as_the_cause(fake_gpu, monkeypatch):
    fake_gpu(cuda="12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040). Please update your GPU "
                           "driver by downloading and installing a new version from the URL: ...")

    monkeypatch.setattr(torch.cuda, "init", init)
    with pytest.raises(UserError, match=r"the NVIDIA driver is older than CUDA 12\.8, which this PyTorch .* was built "
                                        r"for \(it supports CUDA 11\.4\); update the driver \(580 or newer runs every "
                                        r"build\), or .*pip install torch==2\.13\.0 --index-url \S+/whl/cu126\)"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(UserError, match=r"is built without CUDA; install a CUDA build of torch"):
        resolve_device("cuda")


def texts():
    """Every text file of the checkout but the tests (not its runs, data or hidden folders)."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "data", "tests", "__pycache__")]
        for name in files:
            if name == "Makefile" or name.endswith((".md", ".py", ".toml", ".txt", ".sh", ".yml", ".yaml")):
                yield Path(folder) / name


def named_builds(text: str) -> list[tuple[str | None, str]]:
    """Each (torch version, CUDA build) a text names as a wheel index `whl/cuNNN` (the version None where the line
    pins none)."""
    found = []
    for line in text.splitlines():
        for build in re.finditer(r"whl/(cu\d+)", line):
            version = re.findall(r"torch==([\w.]+)", line[:build.start()])
            found.append((version[-1] if version else None, build[1]))
    return found


def test_every_torch_wheel_index_named_is_one_pytorch_publishes_for_that_torch():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^TORCH \?= torch==(\S+)$", makefile, re.M)[1] == TORCH_RELEASE  # the release the table holds
    named = {}
    for path in texts():
        for version, build in named_builds(path.read_text(errors="replace")):
            named.setdefault((version or TORCH_RELEASE, build), []).append(str(path.relative_to(ROOT)))
    for line in (wheel_for(capability) for capability in [(5, 0), (6, 1), (7, 0), (7, 5), (8, 6), (9, 0), (12, 0)]):
        assert re.search(r"pip install torch==\S+ --index-url https://download\.pytorch\.org/whl/cu\d+", line)
        for version, build in named_builds(line):
            named.setdefault((version, build), []).append("lmlab.core.device.wheel_for")
    assert ("2.13.0", "cu130") in named and ("2.13.0", "cu126") in named  # README and wheel_for name both
    for (version, build), where in named.items():
        assert build in TORCH_BUILDS.get(version, ()), f"torch {version} has no {build} build, named in {where}"
    for path in texts():  # a command that installs from PyTorch's index pins the torch it means
        for line in path.read_text(errors="replace").splitlines():
            if re.search(r"--index-url https://download\.pytorch\.org/whl/(cu|cpu)", line):
                assert re.search(r"torch==[\w.]+ --index-url", line), f"{path}: an unpinned torch: {line.strip()}"


def test_the_readme_and_makefile_say_which_build_the_torch_pin_installs_where_and_how_to_choose_each():
    """`torch==RELEASE` names a release, not a build: pip takes PyPI's wheel (CUDA on Linux) or one a local wheel
    folder holds (`+cpu`). The README and the Makefile say so, and name the index of each build to choose it."""
    pin = f"torch=={TORCH_RELEASE}"
    readme, makefile = (" ".join((ROOT / name).read_text().split()) for name in ("README.md", "Makefile"))
    for text in (readme, makefile):
        assert f'TORCH="{pin} --index-url https://download.pytorch.org/whl/cpu"' in text
        assert f'TORCH="{pin} --index-url https://download.pytorch.org/whl/cu130"' in text
    assert "On Linux from PyPI that is the CUDA build" in readme and f"`{TORCH_RELEASE}+cpu` is the CPU build" in readme
    assert "local wheel folder that holds the `+cpu` wheel" in readme
    assert f"from PyPI on Linux {pin} is the CUDA build" in makefile and "find-links holds a +cpu" in makefile


@pytest.mark.parametrize("capability, born, dtype", [
    ((7, 5), "bfloat16", torch.float32), ((7, 0), "bfloat16", torch.float32),  # T4, V100: no bf16, fp16 overflows
    ((7, 5), "float32", torch.float16), ((7, 5), None, torch.float16),  # fp16 with the scaler, as before
    ((8, 0), "bfloat16", torch.bfloat16), ((8, 6), "float32", torch.bfloat16),
])
def test_auto_takes_fp32_over_fp16_for_weights_born_in_bf16(fake_gpu, capability, born, dtype):
    fake_gpu(name="Tesla T4", capability=capability)
    chosen, why = choose_dtype(torch.device("cuda"), "auto", born)
    assert chosen == dtype
    if dtype == torch.float32:
        assert why == (f"auto: float32, not float16: these weights were trained in bfloat16, which this GPU (compute "
                       f"capability {capability[0]}.{capability[1]}) lacks, and their activations can overflow float16")
    assert choose_dtype(torch.device("cuda"), "float16", born)[0] == torch.float16  # as set, it is kept


@pytest.mark.slow
def test_a_runs_weights_dtype_is_what_it_trained_or_was_published_in(tmp_path, writing_char_run, imported_gpt2):
    assert RunDir(writing_char_run).weights_dtype() == "float32"  # trained on the CPU
    assert RunDir(imported_gpt2).weights_dtype() == "float32"
    events = [json.loads(line) for line in (imported_gpt2 / "metrics.jsonl").read_text().splitlines()]
    for published, recorded in [("bfloat16", "bfloat16"), (None, "bfloat16")]:  # None: imported before it was kept
        events[0]["origin"] = {**events[0]["origin"], "format": "huggingface qwen3", "dtype": published}
        run = tmp_path / f"qwen-{published}"
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        assert RunDir(run).weights_dtype() == recorded
    trained = tmp_path / "trained-bf16"
    trained.mkdir()
    lines = (writing_char_run / "metrics.jsonl").read_text().splitlines()
    resumed = {"event": "resume", "step": 1, "checkpoint": "step_000001", "dtype": "bfloat16"}
    (trained / "metrics.jsonl").write_text("\n".join([lines[0], json.dumps(resumed), *lines[1:]]) + "\n")
    assert RunDir(trained).weights_dtype() == "bfloat16"  # a resume on an A100 trained it in bf16
