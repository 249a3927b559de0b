"""The environment: the one dtype decision, the package check, and verdicts a person can act on."""

from __future__ import annotations

import sys
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

    def get_device_properties(self, index=0):
        major, minor = self.capability
        return types.SimpleNamespace(name=self.name, total_memory=int(15.8e9), major=major,
                                     minor=minor)

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


def test_verdict_on_a_broken_4bit_matmul_says_what_to_do():
    text = env.verdict([], 0.6, torch.float32)
    assert text.startswith("the 4-bit matmul is off by 60.0%") and "python -m bitsandbytes" in text
    assert "off by nan" in env.verdict([], float("nan"), torch.float32)


def test_verdicts(gpu):
    missing = [{"package": "peft", "installed": None}]
    assert env.verdict(missing, 0.1, torch.float32) == "missing packages: pip install peft"
    gpu((7, 5))
    assert env.verdict([], 0.1, torch.float16) == ("ready for 4-bit training on Tesla T4 (16 GB, "
                                                  "capability 7.5, float16)")


def test_verdict_without_a_gpu_says_where_to_get_one(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert "Runtime > Change runtime type > T4 GPU" in env.verdict([], 0.1, torch.float32)


def test_requirements_and_machine_info_are_complete():
    rows = env.requirement_check()
    assert [r["package"] for r in rows] == list(env.KEY_PACKAGES)
    assert all(r["ok"] for r in rows), rows  # this environment is within the tested ranges
    info = env.machine_info()
    assert info["cpu_cores"] >= 1 and info["gpu_count"] == torch.cuda.device_count()
    assert info["cpu"] and info["platform"]
