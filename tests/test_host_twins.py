"""The suite runs every CPU kind's path on every host: a test that skips for a capability the host lacks (native
bf16, fp16, AVX-512, AMX, a second core) fails unless it names a twin that fakes the capability
(`tests.helpers.HostTwins`), and the fakes answer lmlab's capability checks as each kind does."""

from __future__ import annotations

import pytest
import torch

from lmlab.core.peak import choose_dtype, matmul_size, native_kernel, peak_key
from lmlab.train.optim import orthogonal_dtype
from tests.cpu_kind.sitecustomize import CPU_KINDS
from tests.helpers import fake_cpu

CPU = torch.device("cpu")

SUITE = '''
import pytest

def test_faked():
    pass

@pytest.mark.twin("test_faked")
def test_named():
    pytest.skip("this CPU has no native bf16")

def test_unnamed():
    pytest.skip("needs AVX512-BF16")

@pytest.mark.twin("test_gone")
def test_named_wrong():
    pytest.skip("no AMX here")

def test_other_reason():
    pytest.skip("no /dev/full: a file every write to fails")

@pytest.mark.twin("tests/test_threads.py::test_on_faked_cores_the_threads_are_those_the_load_leaves")
def test_named_elsewhere():
    pytest.skip("one core: there is nothing to choose")
'''


def test_a_capability_skip_without_a_faked_twin_fails(pytester):
    pytester.makeconftest("from tests.helpers import HostTwins\n\n\ndef pytest_configure(config):\n"
                          "    config.pluginmanager.register(HostTwins())\n"
                          "    config.addinivalue_line('markers', 'twin(name): a faked twin')\n")
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(passed=1, skipped=3, failed=2)
    said = result.stdout.str()
    assert "test_unnamed skipped on this host's CPU (AVX512" in said and "mark it @pytest.mark.twin" in said
    assert "test_named_wrong skipped on this host's CPU (AMX" in said


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_each_cpu_kind_is_answered_as_that_kind_on_any_host(monkeypatch, kind):
    fake_cpu(monkeypatch, kind)
    bf16, fp16 = CPU_KINDS[kind]
    assert native_kernel(CPU, torch.bfloat16) is bf16 and native_kernel(CPU, torch.float16) is fp16
    assert native_kernel(CPU, torch.float32)
    assert orthogonal_dtype(CPU) == (torch.bfloat16 if bf16 else torch.float32)  # Muon's Newton-Schulz
    # A dtype without a native kernel is measured on a small matmul, named in its cache key.
    side = 2048 if fp16 else 256
    assert matmul_size(CPU, torch.float16) == side and matmul_size(CPU, torch.float32) == 2048
    assert (peak_key(CPU, torch.float16)["dtype"], peak_key(CPU, torch.float16)["matmul"]) == ("float16", side)
    if not bf16:  # auto needs no measurement where bf16 is emulated
        assert choose_dtype(CPU, "auto") == (torch.float32, "auto: float32 (cpu without native bf16)")
