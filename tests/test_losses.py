"""helpers.losses: the chunked causal-LM loss equals the model's own, in value and gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTJConfig, LlamaConfig, OPTConfig

from helpers import losses, lora, loading, units
from helpers import budget
from helpers.config import Config

torch.set_num_threads(1)
VOCAB = 300
LOSS_TOL = 1e-5
GRAD_TOL = 1e-6


def lora_config(**changes) -> Config:
    values = {"run_dir": "", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
              "lora_targets": "all-linear", "gradient_checkpointing": True}
    values.update(changes)
    return dataclasses.replace(Config(), **values)


def with_lora(model, seed=0, dropout=0.0):
    """LoRA on every linear layer, B initialized away from zero (so the gradients of A and B are
    both non-trivial), with non-reentrant checkpointing, as in training."""
    lora.prepare_for_training(model, True, False)
    model = lora.attach(model, lora_config(lora_dropout=dropout))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


def tiny_neox():
    """The tiny-neox rehearsal in 4-bit on CPU (float32 compute)."""
    return loading.load_model("rehearsal:tiny-neox", compute_dtype="float32", device="cpu")


def tiny_llama():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128))


def tiny_gptj():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GPTJConfig(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128))


BUILDERS = {"tiny-neox (4-bit)": tiny_neox, "llama": tiny_llama, "gptj": tiny_gptj}


@pytest.fixture(scope="module", params=list(BUILDERS))
def model(request):
    return with_lora(BUILDERS[request.param]())


def batch(model, rows=3, seq=19, seed=1):
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100  # a masked prompt
    labels[-1, 11:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[-1, 11:] = 0
    return {"input_ids": ids, "attention_mask": mask}, labels


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def reference(model, inputs, labels, **kw):
    """The model's own loss and LoRA gradients (in eval mode, where an installed chunked loss
    stands aside; without dropout and with deterministic checkpointing, the same values)."""
    model.eval()
    try:
        loss = model(**inputs, labels=labels, use_cache=False, **kw).loss
        return loss, torch.autograd.grad(loss, trainable(model))
    finally:
        model.train()


def chunked(model, inputs, labels, chunk, monkeypatch, **kw):
    """The training forward with the chunked loss installed, ``chunk`` positions at a time."""
    monkeypatch.setattr(losses, "chunk_tokens", lambda vocab: chunk)
    assert "chunked loss" in losses.use_chunked_loss(model)
    return model(**inputs, labels=labels, use_cache=False, **kw)


def test_the_families_are_supported(model):
    assert losses.unsupported_reason(model) is None


def test_the_body_feeds_the_head_its_last_hidden_state(model):
    """head(body's last_hidden_state) is the model's logits: what the chunked loss relies on."""
    inputs, _ = batch(model)
    seen = {}
    lm = losses.unwrap(model)

    def grab(_module, _args, out):
        seen["h"] = out[0]

    handle = getattr(lm, lm.base_model_prefix).register_forward_hook(grab)
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    handle.remove()
    with torch.no_grad():
        again = lm.get_output_embeddings()(seen["h"])
    torch.testing.assert_close(again, logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 7, 16, 56])
def test_loss_and_lora_gradients_equal_the_standard_loss(model, chunk, monkeypatch):
    inputs, labels = batch(model)
    ref, ref_grads = reference(model, inputs, labels)
    out = chunked(model, inputs, labels, chunk, monkeypatch)
    grads = torch.autograd.grad(out.loss, trainable(model))
    assert out.logits.shape[1] == 1  # the head ran on the last position only
    assert abs(out.loss.item() - ref.item()) <= LOSS_TOL
    assert any(g.abs().max() > 0 for g in ref_grads)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=GRAD_TOL)


@pytest.mark.parametrize("chunk", [3, 16])
def test_num_items_in_batch_divides_the_sum(model, chunk, monkeypatch):
    """As transformers does under gradient accumulation: the sum over label tokens divided by the
    count over all accumulated micro-batches (an int or a tensor)."""
    inputs, labels = batch(model)
    for n in (100, torch.tensor(57)):
        ref, ref_grads = reference(model, inputs, labels, num_items_in_batch=n)
        out = chunked(model, inputs, labels, chunk, monkeypatch, num_items_in_batch=n)
        assert out.logits.shape[1] == 1
        grads = torch.autograd.grad(out.loss, trainable(model))
        assert abs(out.loss.item() - ref.item()) <= LOSS_TOL
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=GRAD_TOL)


def test_chunked_cross_entropy_alone():
    """From hidden states and a biased head (GPT-J's has a bias), against F.cross_entropy on the
    full logits; no label tokens gives NaN, as the standard mean does."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[1, :4] = -100
    logits = head(hidden)[:, :-1].reshape(-1, 50)
    full = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    (g_full,) = torch.autograd.grad(full, hidden)
    for chunk in (1, 4, 5, 100):
        loss = losses.chunked_cross_entropy(hidden, labels, head, chunk_size=chunk)
        (g,) = torch.autograd.grad(loss, hidden)
        assert abs(loss.item() - full.item()) <= LOSS_TOL
        torch.testing.assert_close(g, g_full, rtol=1e-5, atol=1e-7)
    empty = torch.full_like(labels, -100)
    assert torch.isnan(losses.chunked_cross_entropy(hidden, empty, head))
    assert losses.chunked_cross_entropy(hidden, empty, head, num_items_in_batch=4).item() == 0


def test_chunk_tokens_by_vocabulary():
    assert units.chunk_tokens(128256) == 512  # Llama 3: 256 MiB of float32 logits per chunk
    assert units.chunk_tokens(50432) == 1024  # GPT-NeoX-20B
    assert units.chunk_tokens(300) == units.MAX_CHUNK_TOKENS
    assert units.chunk_tokens(10**9) == units.MIN_CHUNK_TOKENS


def test_other_models_keep_their_own_loss():
    torch.manual_seed(0)
    opt = AutoModelForCausalLM.from_config(OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
        word_embed_proj_dim=32, max_position_embeddings=64))
    assert "opt" in losses.unsupported_reason(opt)
    capped = tiny_llama()
    capped.config.final_logit_softcapping = 30.0
    assert "softcapping" in losses.unsupported_reason(capped)
    assert "keeps its own loss" in losses.use_chunked_loss(capped)
    assert "forward" not in vars(capped)
    adapted_head = lora.attach(tiny_llama(), lora_config(lora_targets="lm_head"))
    assert "not a plain" in losses.unsupported_reason(adapted_head)


def test_probe_step_uses_the_chunked_loss(monkeypatch):
    model = with_lora(tiny_llama())
    calls = []
    original = losses.chunked_cross_entropy

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(losses, "chunked_cross_entropy", counting)
    monkeypatch.setattr(losses, "chunk_tokens", lambda vocab: 8)
    assert budget.probe_step(model, 2, 16) == 0  # not installed: the model's own loss
    assert calls == []
    losses.use_chunked_loss(model)
    assert budget.probe_step(model, 2, 16) == 0  # CPU: no GPU peak to report
    assert calls == [1]
    assert budget.probe_step(model, 1, 8) == 0  # 8 positions: one chunk, the model's own loss
    assert calls == [1]
    assert all(p.grad is None for p in model.parameters())


def test_the_installed_loss_equals_the_models_own(monkeypatch):
    """use_chunked_loss: in training mode with labels the model's forward computes the chunked
    loss (the same value and LoRA gradients as its own, logits of the last position only); in
    eval mode, and without labels, it is the model's own forward (whole logits)."""
    monkeypatch.setattr(losses, "chunk_tokens", lambda vocab: 5)
    model = with_lora(tiny_llama())
    inputs, labels = batch(model)
    ref, ref_grads = reference(model, inputs, labels, num_items_in_batch=40)
    assert "5 at a time" in losses.use_chunked_loss(model)
    assert "5 at a time" in losses.use_chunked_loss(model)  # once is enough: not wrapped twice
    out = model(**inputs, labels=labels, use_cache=False, num_items_in_batch=40)
    grads = torch.autograd.grad(out.loss, trainable(model))
    assert out.logits.shape[1] == 1
    assert abs(out.loss.item() - ref.item()) <= LOSS_TOL
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=GRAD_TOL)
    model.eval()
    with torch.no_grad():
        evaluated = model(**inputs, labels=labels, use_cache=False)
    assert evaluated.logits.shape[1] == labels.shape[1]
    assert abs(evaluated.loss.item() - reference(model.train(), inputs, labels)[0].item()) \
        <= LOSS_TOL
