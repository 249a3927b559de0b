"""helpers.norms: the lean RMSNorm gives transformers' numbers, forward and backward, keeps less
for the backward, and leaves alone a norm it does not reproduce."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import norms


def _tiny(family: str, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    config = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family](
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_the_lean_norm_gives_transformers_loss_and_gradients(family, dtype):
    own = _tiny(family, dtype)
    for p in own.parameters():  # the norms' weights train too here, so their gradient is checked
        p.data.normal_(0, 0.5) if p.dim() == 1 else None
    lean = copy.deepcopy(own)
    note = norms.install(lean)
    assert "lean RMSNorm on 5 norms" in note and lean.uses_lean_norms
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (own, lean):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]  # the same forward, operation for operation
    # within 1e-5 (float32) of each parameter's largest gradient, where that is at least a
    # thousandth of the model's largest: a parameter with far smaller gradients sums terms as
    # large as the others' that cancel, and carries their rounding
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    largest = max(p.grad.abs().max().item() for p in own.parameters())
    for (name, a), b in zip(own.named_parameters(), lean.parameters()):
        scale = max(a.grad.abs().max().item(), 1e-3 * largest)
        assert (a.grad - b.grad).abs().max().item() <= tol * scale, name


def test_a_norm_that_computes_otherwise_keeps_its_own_forward():
    class OffsetRMSNorm(torch.nn.Module):  # Gemma's form: the weight is stored minus one
        def __init__(self, width):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(width))
            self.eps = 1e-6

        def forward(self, x):
            xf = x.float()
            out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return (out * (1.0 + self.weight.float())).to(x.dtype)

    model = torch.nn.Sequential(OffsetRMSNorm(8))
    note = norms.install(model)
    assert "none of this model's norms" in note and "OffsetRMSNorm" in note
    assert not getattr(model, "uses_lean_norms", False)
    assert "forward" not in model[0].__dict__


def test_install_twice_remove_and_no_grad():
    model = _tiny("llama", torch.float32)
    norms.install(model)
    assert norms.install(model) == "lean RMSNorm: already installed"
    norm = model.model.norm
    x = torch.randn(1, 3, 64)
    with torch.no_grad():  # without gradients the module's own forward runs
        assert torch.equal(norm(x), norm.lean_norm_own_forward(x))
    norms.remove(model)
    assert "forward" not in norm.__dict__ and not getattr(model, "uses_lean_norms", False)


def test_what_the_backward_keeps():
    """Saved for the backward per token: the input and one float32 number (the own norm keeps a
    float32 copy of the input, 4 bytes a value)."""
    norm = _tiny("llama", torch.bfloat16).model.norm
    x = torch.randn(1, 1000, 64, dtype=torch.bfloat16, requires_grad=True)
    kept = {}
    for lean in (False, True):
        saved = {}

        def pack(t):
            saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if lean:
                norms.LeanRMSNorm.apply(x, norm.weight, norm.variance_epsilon)
            else:
                norm(x)
        kept[lean] = sum(saved.values()) - norm.weight.numel() * 2
    assert kept[True] == 1000 * (64 * 2 + 4)  # x itself and the float32 rsqrt
    assert kept[False] >= 1000 * 64 * 4  # the float32 copy at least
