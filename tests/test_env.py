"""The environment report: the one dtype decision, and verdicts a person can act on."""

from __future__ import annotations

import types

import pytest
import torch

from helpers import env


class FakeCuda:
    """torch.cuda as a machine with one GPU of the given compute capability."""

    def __init__(self, capability, name="Tesla T4"):
        self.capability, self.name = capability, name

    def is_available(self):
        return True

    def get_device_capability(self, index=0):
        return self.capability

    def get_device_name(self, index=0):
        return self.name

    def is_bf16_supported(self):  # what torch says on a T4: True, through emulation
        return True


@pytest.fixture
def gpu(monkeypatch):
    def use(capability, name="Tesla T4"):
        fake = types.SimpleNamespace(cuda=FakeCuda(capability, name), float16=torch.float16,
                                     bfloat16=torch.bfloat16, float32=torch.float32,
                                     dtype=torch.dtype)
        monkeypatch.setattr(env, "torch", fake)
    return use


def test_t4_trains_in_float16_although_torch_says_bf16_is_supported(gpu):
    gpu((7, 5))
    assert env.compute_dtype() == torch.float16
    assert env.precision_flags(torch.float16) == {"bf16": False, "fp16": True}
    assert "7.5 < 8.0" in env.dtype_reason(torch.float16)


def test_ampere_and_later_train_in_bfloat16(gpu):
    gpu((8, 0), "NVIDIA A100")
    assert env.compute_dtype() == torch.bfloat16
    # bf16 runs natively: no autocast (it would turn GPT-NeoX's stream into float32)
    assert env.precision_flags(torch.bfloat16) == {"bf16": False, "fp16": False}
    assert not env.uses_autocast(torch.bfloat16) and env.uses_autocast(torch.float16)


def test_cpu_trains_in_float32_with_no_mixed_precision_flag():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert env.compute_dtype() == torch.float32
    assert env.precision_flags(torch.float32) == {"bf16": False, "fp16": False}


def test_explicit_dtype_and_bad_value():
    assert env.compute_dtype("float16") == torch.float16
    with pytest.raises(ValueError, match="auto, bfloat16, float16 or float32"):
        env.compute_dtype("half")


def test_selftest_says_what_to_install_when_bitsandbytes_has_no_cuda_library(monkeypatch):
    import bitsandbytes.cextension as cext

    class ErrorHandlerMockBNBNativeLibrary:  # what bitsandbytes loads when it finds none
        _name = ""

    monkeypatch.setattr(cext, "lib", ErrorHandlerMockBNBNativeLibrary())
    result = env.bitsandbytes_selftest("cuda")
    assert not result["ok"]
    assert "no CUDA library" in result["error"] and "pip install -U bitsandbytes" in result["advice"]
    rep = {"bitsandbytes": result, "requirements": [], "gpus": [], "colab": False}
    assert env.verdict(rep).startswith("bitsandbytes has no CUDA library")


def test_selftest_runs_a_real_4bit_matmul_here():
    result = env.bitsandbytes_selftest()
    assert result["ok"], result
    assert 0.05 < result["relative_error"] < 0.15


def test_verdicts():
    ok = {"ok": True}
    no_gpu = {"bitsandbytes": ok, "requirements": [], "gpus": [], "colab": True}
    assert "Runtime > Change runtime type > T4 GPU" in env.verdict(no_gpu)
    missing = {"bitsandbytes": ok, "gpus": [], "colab": False,
               "requirements": [{"package": "peft", "installed": None}]}
    assert env.verdict(missing) == "missing packages: pip install peft"
    gpu = {"bitsandbytes": ok, "requirements": [], "colab": False, "compute_dtype": "float16",
           "gpus": [{"name": "Tesla T4", "total_bytes": 15.8e9, "capability": "7.5"}]}
    assert env.verdict(gpu) == ("ready for 4-bit training on Tesla T4 (16 GB, capability 7.5, "
                                "float16)")


def test_report_and_metrics_are_complete():
    rep = env.report()
    m = env.metrics(rep)
    assert m["cpu_cores"] >= 1 and m["bnb_selftest_ok"] == 1
    assert all(isinstance(v, (int, float)) for v in m.values())
    assert "Verdict:" in env.show(rep)
