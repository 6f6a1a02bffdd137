"""The tests' fake CPU kinds. In the suite's own process `tests.helpers.fake_cpu` puts `answering(kind)` in place of
`lmlab.core.peak.cpu_native`; a command a test starts gets the same fake through this file: the tests put its folder
on the child's PYTHONPATH and the kind in LMLAB_TEST_CPU_KIND (conftest.py), and Python imports it at start-up as
`sitecustomize`, which puts the fake in place as lmlab.core.peak is first imported. Nothing outside tests/ reads the
variable; nothing is imported before the process asks for lmlab, so a command starts as it does for a user."""

from __future__ import annotations

import importlib.machinery
import os
import sys
from collections.abc import Callable

KIND_VARIABLE = "LMLAB_TEST_CPU_KIND"

# The kinds of CPU lmlab meets, by what oneDNN answers of them: a native bf16 matmul, a native fp16 one.
CPU_KINDS = {"avx2": (False, False), "avx512-bf16": (True, False), "amx-bf16": (True, False), "amx-fp16": (True, True)}
# The vectors ATen's own kernels use on each (torch.backends.cpu.get_cpu_capability): an AMX CPU's are AVX-512's, its
# tiles oneDNN's. What they read follows their width (tests/test_quantize.py fakes it apart, for its int8 kernel).
VECTORS = {"avx2": "AVX2", "avx512-bf16": "AVX512", "amx-bf16": "AVX512", "amx-fp16": "AVX512"}


def answering(kind: str) -> Callable[[object], bool]:
    """`cpu_native` as a CPU of `kind` answers it: every dtype native but the 16-bit ones it lacks."""
    import torch

    native = dict(zip((torch.bfloat16, torch.float16), CPU_KINDS[kind]))
    return lambda dtype: native.get(dtype, True)


class _FakeOnImport:
    """A finder that hands Python lmlab.core.peak's own spec, its loader putting the fake in once the module ran."""

    def __init__(self, kind: str):
        self.kind = kind

    def find_spec(self, name, path, target=None):
        if name != "lmlab.core.peak":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module) -> None:
            run(module)
            module.host_cpu_native = module.cpu_native  # what tests.helpers.HOST_CPU gives a host_cpu test
            module.cpu_native = answering(self.kind)

        spec.loader.exec_module = exec_module
        return spec


if __name__ == "sitecustomize" and (kind := os.environ.get(KIND_VARIABLE)):
    assert kind in CPU_KINDS, f"{KIND_VARIABLE}={kind!r}; the tests fake {', '.join(CPU_KINDS)}"
    sys.meta_path.insert(0, _FakeOnImport(kind))
