"""Per-example attention in packed rows (helpers.attention): the boundaries, the plumbing through
transformers' attention interface (on CPU with the kernel's contract computed by SDPA), and on a
GPU torch's varlen kernel against transformers' own block mask."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPTJConfig, GPTNeoXConfig, LlamaConfig
from transformers.masking_utils import find_packed_sequence_indices

from helpers import attention

GPU = torch.cuda.is_available()


def _positions(*rows):
    """Packed rows from example lengths; a 0 is one pad token (position 0, as the collator pads)."""
    out = []
    for lengths in rows:
        out.append([p for n in lengths for p in (range(n) if n else [0])])
    assert len({len(r) for r in out}) == 1
    return torch.tensor(out)


def test_segments_start_at_each_restart_each_pad_and_each_row():
    pos = _positions([3, 2, 4, 0, 0], [5, 4, 0, 0])
    seg = attention.segments(pos)
    assert seg.starts.dtype == torch.int32
    assert seg.starts.tolist() == [0, 3, 5, 9, 10, 11, 16, 20, 21, 22]
    assert (seg.longest, seg.batch, seg.seq) == (5, 2, 11)
    one_row = attention.segments(torch.arange(6)[None], batch=3)  # shared positions: 3 rows
    assert one_row.starts.tolist() == [0, 6, 12, 18] and one_row.longest == 6


def test_the_mask_is_the_one_transformers_builds_from_the_positions():
    pos = _positions([3, 2, 4, 0, 0], [5, 4, 0, 0], [11])
    doc = find_packed_sequence_indices(pos)
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    theirs = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]
    assert torch.equal(attention.Segments.mask(attention.segments(pos)), theirs)


def _kernel_by_sdpa(q, k, v, starts, longest, scale=None):
    """The varlen kernel's contract, computed by SDPA one example at a time."""
    assert longest == int((starts[1:] - starts[:-1]).max())
    return attention.reference(q, k, v, starts, scale).to(q.dtype)


MODELS = {
    "gpt-neox": lambda: GPTNeoXConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=128,
                                      rotary_pct=0.25, max_position_embeddings=64),
    "llama-gqa": lambda: LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=128, max_position_embeddings=64),
}
# GPT-J goes through transformers' attention interface from 5.24 on (earlier, its own attention
# with the mask: test_a_model_outside_the_interface_keeps_the_mask)
if getattr(AutoModelForCausalLM.from_config(GPTJConfig(vocab_size=8, n_embd=8, n_layer=1, n_head=2,
                                                       rotary_dim=2, n_positions=8)).__class__,
           "_supports_attention_backend", False):
    MODELS["gpt-j"] = lambda: GPTJConfig(vocab_size=97, n_embd=64, n_layer=2, n_head=4,
                                         rotary_dim=8, n_positions=64, bos_token_id=0,
                                         eos_token_id=0)


def _lora(config, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device, dtype)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                             lora_dropout=0.0, init_lora_weights=False))
    return model


def _packed_batch(device="cpu"):
    pos = _positions([7, 5, 9, 3, 0], [12, 11, 0, 0], [25])
    ids = torch.randint(3, 97, pos.shape, generator=torch.Generator().manual_seed(1))
    return ids.to(device), pos.to(device)


def _forward_backward(model, ids, pos):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, position_ids=pos, use_cache=False)
    loss = out.logits.float().square().mean()
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
             if p.requires_grad}
    return out.logits.detach().float(), grads


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_packed_rows_through_the_kernel_equal_transformers_block_mask(arch, monkeypatch):
    """The installed path (hook, segments, no mask, the kernel per layer) gives the logits and
    LoRA gradients that transformers' own packed mask gives, and each example's logits equal
    that example run alone: on CPU, with the kernel's contract computed by SDPA."""
    monkeypatch.setattr(attention, "check_kernel", lambda *a: None)
    monkeypatch.setattr(attention, "varlen", _kernel_by_sdpa)
    monkeypatch.setattr(attention, "runs_varlen", lambda decoder, ids: True)
    calls = []
    real = attention.packed_attention
    monkeypatch.setattr(attention, "packed_attention",
                        lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    ours = _lora(MODELS[arch]())
    theirs = copy.deepcopy(ours)
    note = attention.use_packed_attention(ours)
    assert "variable-length flash kernel" in note, note
    assert ours.config._attn_implementation == attention.ATTENTION
    assert attention.use_packed_attention(ours) .startswith("packed rows: per-example")
    ids, pos = _packed_batch()
    logits, grads = _forward_backward(ours, ids, pos)
    assert calls and all(mask is None for mask in calls)  # no mask was built
    ref_logits, ref_grads = _forward_backward(theirs, ids, pos)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # each example alone (positions from 0, no neighbours) gives its packed logits
    seg = attention.segments(pos)
    flat_ids, flat_logits = ids.reshape(-1), logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        for a, b in zip(seg.starts[:-1].tolist(), seg.starts[1:].tolist(), strict=True):
            alone = theirs(input_ids=flat_ids[a:b][None], use_cache=False).logits[0].float()
            torch.testing.assert_close(flat_logits[a:b], alone, rtol=1e-5, atol=1e-5)


def test_a_model_outside_the_interface_keeps_the_mask(monkeypatch):
    """A model whose attention does not go through transformers' attention interface (GPT-J
    before transformers 5.24) is left as it is, and the note says why."""
    monkeypatch.setattr(attention, "check_kernel", lambda *a: None)
    model = _lora(MODELS["gpt-neox"]())
    lm = model.get_base_model()
    monkeypatch.setattr(type(lm), "_supports_attention_backend", False)
    before = lm.config._attn_implementation
    note = attention.use_packed_attention(model)
    assert "block mask" in note and "attention interface" in note, note
    assert lm.config._attn_implementation == before
    assert not getattr(lm, "uses_packed_attention", False)


def test_batches_with_a_mask_or_a_cache_keep_sdpa(monkeypatch):
    """Generation, left padding and any batch with an attention mask go through transformers'
    SDPA exactly as before: the same logits and generated tokens as the untouched model."""
    monkeypatch.setattr(attention, "check_kernel", lambda *a: None)
    monkeypatch.setattr(attention, "varlen", lambda *a, **k: pytest.fail("varlen called"))
    monkeypatch.setattr(attention, "runs_varlen", lambda decoder, ids: True)
    ours = _lora(MODELS["llama-gqa"]())
    theirs = copy.deepcopy(ours)
    attention.use_packed_attention(ours)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = theirs(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(input_ids=ids, **kw), theirs.generate(input_ids=ids, **kw))


def test_a_batch_the_kernel_cannot_take_gets_the_mask():
    """float32 (no autocast) or attention dropout: SDPA with the examples' block mask, the same
    result as each example alone."""
    pos = _positions([5, 9, 0, 0], [16])
    seg = attention.segments(pos)
    q, k, v = (torch.randn(2, h, 16, 8, generator=torch.Generator().manual_seed(h))
               for h in (4, 2, 2))
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 2, True, False
    attention._STATE.segments = seg
    try:
        out, _ = attention.packed_attention(module, q, k, v, None, scaling=0.3)
    finally:
        attention._STATE.segments = None
    flat = lambda t: t.transpose(1, 2).reshape(32, t.shape[1], 8)  # noqa: E731
    expected = attention.reference(flat(q), flat(k), flat(v), seg.starts, 0.3)
    torch.testing.assert_close(out.reshape(32, 4, 8), expected, rtol=1e-5, atol=1e-5)


def test_on_cpu_the_model_keeps_transformers_mask():
    model = _lora(MODELS["gpt-neox"]())
    note = attention.use_packed_attention(model)
    if not GPU:
        assert note.startswith("packed rows: transformers' block mask") and "CUDA" in note, note
        assert model.config._attn_implementation == "sdpa"
    assert attention.check_kernel("cpu", torch.bfloat16, 4, 4, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_the_kernel_on_the_gpu_equals_transformers_block_mask(arch):
    """On the GPU in bfloat16: the varlen kernel passes its check and gives the logits and LoRA
    gradients of transformers' masked SDPA within bfloat16's tolerance."""
    ours = _lora(MODELS[arch](), "cuda", torch.bfloat16)
    theirs = copy.deepcopy(ours)
    note = attention.use_packed_attention(ours)
    assert "variable-length flash kernel" in note, note
    ids, pos = _packed_batch("cuda")
    logits, grads = _forward_backward(ours, ids, pos)
    assert attention._STATE.segments is not None
    ref_logits, ref_grads = _forward_backward(theirs, ids, pos)
    scale = ref_logits.abs().max()
    assert float((logits - ref_logits).abs().max()) <= 2e-2 * float(scale)
    for name, g in ref_grads.items():
        worst = float((grads[name] - g).abs().max())
        assert worst <= 3e-2 * float(g.abs().max()) + 1e-6, (name, worst)
