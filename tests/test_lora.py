"""helpers.lora on tiny random models of five families, loaded in 4-bit on CPU (notebook 03)."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    Qwen2Config,
)

from helpers import lora
from helpers.config import Config, ConfigError

SMALL = {"vocab_size": 256, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}


def _configs() -> dict:
    return {
        "gpt_neox": GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=64, **SMALL),
        "gptj": GPTJConfig(n_embd=64, n_layer=2, n_head=4, n_inner=256, rotary_dim=16,
                           n_positions=64, **SMALL),
        "llama": LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=128,
                             max_position_embeddings=64, **SMALL),
        "qwen2": Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=128,
                             max_position_embeddings=64, **SMALL),
        "opt": OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
                         word_embed_proj_dim=64, max_position_embeddings=64, **SMALL),
    }


FAMILIES = list(_configs())

ATTENTION = {
    "gpt_neox": {"query_key_value", "dense"},
    "gptj": {"q_proj", "k_proj", "v_proj", "out_proj"},
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj"},
}
MLP = {
    "gpt_neox": {"dense_h_to_4h", "dense_4h_to_h"},
    "gptj": {"fc_in", "fc_out"},
    "llama": {"gate_proj", "up_proj", "down_proj"},
    "qwen2": {"gate_proj", "up_proj", "down_proj"},
    "opt": {"fc1", "fc2"},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family built with random weights, saved as safetensors; plus its parameter count."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for name, config in _configs().items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(root / name)
        out[name] = (root / name, sum(p.numel() for p in model.parameters()))
    return out


def load_4bit(saved, family, dtype=torch.bfloat16):
    """The family in NF4 + double quantization on CPU; non-quantized weights in ``dtype``."""
    path, _ = saved[family]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant,
                                                device_map={"": "cpu"}, dtype=dtype)


def batch(seed=0):
    ids = torch.randint(2, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def cfg(**changes) -> Config:
    values = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **changes}
    return dataclasses.replace(Config(), **values)


# --------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("family", FAMILIES)
def test_targets_per_family(saved, family):
    model = load_4bit(saved, family)
    assert set(lora.find_targets(model, "attention")) == ATTENTION[family]
    everything = lora.find_targets(model, "all-linear")
    assert set(everything) == ATTENTION[family] | MLP[family]
    assert lora.find_targets(model) == everything  # all-linear is the default
    assert "lm_head" not in everything

    rows = {r["name"]: r for r in lora.linear_layers(model)}
    assert rows["lm_head"]["block"] == "head" and rows["lm_head"]["dtype"] == "bfloat16"
    for name in ATTENTION[family]:
        assert rows[name]["block"] == "attention"
        assert rows[name]["dtype"] == "4-bit nf4" and rows[name]["count"] == 2
    for name in MLP[family]:
        assert rows[name]["block"] == "other"


def test_shapes_are_logical(saved):
    rows = {r["name"]: r for r in lora.linear_layers(load_4bit(saved, "llama"))}
    assert (rows["q_proj"]["d_in"], rows["q_proj"]["d_out"]) == (64, 64)
    assert rows["k_proj"]["shape"] == "64 x 32"  # 2 key/value heads of 16
    assert (rows["down_proj"]["d_in"], rows["down_proj"]["d_out"]) == (128, 64)


def test_explicit_names_and_unknown_name(saved):
    gptj = load_4bit(saved, "gptj")
    assert lora.find_targets(gptj, "q_proj, v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(ValueError) as err:  # the article's recipe on GPT-J
        lora.find_targets(gptj, "query_key_value")
    msg = str(err.value)
    assert "query_key_value" in msg
    for name in ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"):
        assert name in msg
    with pytest.raises(ValueError, match="q_proj"):
        lora.lora_config(cfg(lora_targets="query_key_value"), gptj)


def test_head_found_by_identity_in_16bit_tied_model(saved):
    """OPT ties its head to the embeddings; a 16-bit model has only nn.Linear layers."""
    path, _ = saved["opt"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = {r["name"]: r for r in lora.linear_layers(model)}
    assert rows["lm_head"]["block"] == "head" and rows["q_proj"]["dtype"] == "float32"
    assert "lm_head" not in lora.find_targets(model)


def test_ambiguous_short_name_gets_a_longer_suffix():
    """'dense' inside attention and outside it: the attention scope must name only the first."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(8, 8)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention, self.dense = Attention(), nn.Linear(8, 8)

    model = nn.Sequential(Block(), Block())
    names = lora.find_targets(model, "attention")
    assert names == ["attention.dense"]
    config = peft.LoraConfig(r=2, target_modules=names)
    wrapped = peft.get_peft_model(model, config)
    adapted = [p for p, m in wrapped.named_modules() if hasattr(m, "lora_A")]
    assert len(adapted) == 2 and all(p.endswith("attention.dense") for p in adapted)


# --------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("change, text", [
    ({"lora_r": 0}, "positive integer"),
    ({"lora_alpha": -1}, "must be positive"),
    ({"lora_dropout": 1.0}, r"\[0, 1\)"),
])
def test_bad_lora_values_refused_with_range(saved, change, text):
    model = load_4bit(saved, "gpt_neox")
    with pytest.raises(ConfigError, match=text):
        lora.lora_config(cfg(**change), model)


def test_lora_config_fields(saved):
    model = load_4bit(saved, "gpt_neox")
    config = lora.lora_config(cfg(lora_targets="attention"), model)
    assert config.r == 4 and config.lora_alpha == 8 and config.bias == "none"
    assert str(config.task_type).endswith("CAUSAL_LM")
    assert set(config.target_modules) == {"query_key_value", "dense"}


# --------------------------------------------------------------------------- preparation


def test_prepare_defaults(saved):
    model = load_4bit(saved, "gpt_neox")
    report = lora.prepare_for_training(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config.use_cache is False
    assert report["gradient_checkpointing"] and report["input_require_grads"]
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert report["bytes_after"] == report["bytes_before"]
    assert report["upcast_bytes_avoided"] == report["upcast_bytes_would_cost"] > 0


def test_upcast_costs_exactly_what_it_reports_and_matches_peft(saved):
    kept = load_4bit(saved, "llama")
    off = lora.prepare_for_training(kept, upcast_norms_and_head=False)
    assert kept.get_input_embeddings().weight.dtype == torch.bfloat16
    assert kept.get_output_embeddings().weight.dtype == torch.bfloat16

    cast = load_4bit(saved, "llama")
    on = lora.prepare_for_training(cast, upcast_norms_and_head=True)
    assert cast.get_input_embeddings().weight.dtype == torch.float32
    assert cast.get_output_embeddings().weight.dtype == torch.float32
    assert on["upcast_bytes_avoided"] == 0
    assert on["bytes_after"] - on["bytes_before"] == off["upcast_bytes_avoided"]

    reference = peft.prepare_model_for_kbit_training(load_4bit(saved, "llama"))
    assert ({n: p.dtype for n, p in cast.named_parameters()}
            == {n: p.dtype for n, p in reference.named_parameters()})


# --------------------------------------------------------------------------- count and train


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_count_equals_formula_and_it_trains(saved, family):
    model = load_4bit(saved, family)
    lora.prepare_for_training(model)
    before = lora.param_bytes(model)
    wrapped = lora.attach(model, cfg())
    report = lora.trainable_report(wrapped)
    t = report["totals"]
    assert t["bytes_before"] == before  # measured before attaching, not only derived
    assert t["equal"] and t["formula_count"] == t["trainable"] > 0
    assert t["lora_target_count"] == 2 * len(ATTENTION[family] | MLP[family])
    assert sum(r["trainable"] for r in report["rows"]) == t["trainable"]
    assert all(r["trainable"] == r["formula"] for r in report["rows"])
    # logical count: the 16-bit original's parameters plus the adapters
    assert t["total_params"] == saved[family][1] + t["trainable"]
    assert t["trainable_percent"] == pytest.approx(100 * t["trainable"] / t["total_params"])
    assert t["bytes_after"] - t["bytes_before"] == t["adapter_bytes"] == 4 * t["trainable"]
    assert all(p.dtype == torch.float32 for p in wrapped.parameters() if p.requires_grad)

    check = lora.gradient_check(wrapped, batch())
    assert check["ok"], check
    assert check["only_lora_grads"] and check["non_lora_with_grad"] == []
    assert check["base_4bit_unchanged"] and check["checked_4bit_weights"] == t["lora_target_count"]
    assert check["lora_B_grad_nonzero"] and check["lora_A_grad_zero"]  # B starts at zero
    assert check["lora_B_changed"]
    assert torch.isfinite(torch.tensor(check["loss"]))
    # the check leaves the adapters as it found them: B still zero
    assert all(not p.any() for n, p in wrapped.named_parameters() if "lora_B" in n)


def test_attention_scope_counts(saved):
    model = load_4bit(saved, "gpt_neox")
    lora.prepare_for_training(model)
    wrapped = lora.attach(model, cfg(lora_targets="attention", lora_r=8))
    t = lora.trainable_report(wrapped)["totals"]
    # 2 layers x r=8 x ((64 + 192) + (64 + 64))
    assert t["trainable"] == t["formula_count"] == 2 * 8 * (256 + 128)
    assert t["lora_target_count"] == 4


def test_gradient_check_catches_a_trainable_base_weight(saved):
    model = load_4bit(saved, "llama")
    lora.prepare_for_training(model)
    wrapped = lora.attach(model, cfg())
    wrapped.get_input_embeddings().weight.requires_grad_(True)
    check = lora.gradient_check(wrapped, batch())
    assert not check["ok"] and not check["only_lora_grads"]
    assert any("embed_tokens" in n for n in check["non_lora_with_grad"])
    with pytest.raises(ValueError, match="before|attach"):
        lora.prepare_for_training(wrapped)


def test_packed_hash_sees_one_changed_byte(saved):
    model = load_4bit(saved, "llama")
    before = lora._packed_hashes(model)
    name, weight = next((n, p) for n, p in model.named_parameters()
                        if type(p).__name__ == "Params4bit")
    weight.data.view(-1)[0] ^= 1
    after = lora._packed_hashes(model)
    assert len(before) > 0 and before.keys() == after.keys()
    assert [n for n in before if before[n] != after[n]] == [name]


def test_checkpointing_is_non_reentrant(saved):
    model = load_4bit(saved, "gptj")
    lora.prepare_for_training(model)
    funcs = [m._gradient_checkpointing_func for m in model.modules()
             if getattr(m, "gradient_checkpointing", False)]
    assert funcs and all(f.keywords.get("use_reentrant") is False for f in funcs)


def test_lora_computes_in_the_stream_dtype_with_float32_master_weights(tmp_path):
    """bf16 activations stay bf16 through the adapters (no float32 copy of the input), while the
    LoRA weights, and so their gradients, stay float32; in float32 nothing changes."""
    from helpers import config as C, lora, loading

    model = loading.load_model("rehearsal:tiny-neox", compute_dtype="bfloat16")
    cfg = C.make_config(RUN_DIR=str(tmp_path), MODEL="rehearsal:tiny-neox", LORA_DROPOUT=0.0)
    lora.prepare_for_training(model, False, False)
    peft_model = lora.attach(model, cfg)
    adapted = [m for m in peft_model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert adapted and all(type(m.lora_A["default"]) is lora.StreamDtypeLinear for m in adapted)
    seen = []
    hooks = [m.lora_B["default"].register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
             for m in adapted]
    ids = torch.randint(0, 100, (2, 16)).to(peft_model.device)  # on the GPU where there is one
    with torch.no_grad():  # make lora_B non-zero so gradients reach lora_A too
        for m in adapted:
            m.lora_B["default"].weight.normal_(0, 0.02)
    peft_model.train()
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16}
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in trainable)
    assert all(torch.isfinite(p.grad).all() for p in trainable)


def test_stream_dtype_linear_is_peft_linear_in_float32():
    torch.manual_seed(0)
    plain = torch.nn.Linear(8, 4)
    ours = torch.nn.Linear(8, 4)
    ours.load_state_dict(plain.state_dict())
    from helpers import lora

    ours.__class__ = lora.StreamDtypeLinear
    x = torch.randn(3, 8)
    assert torch.equal(plain(x), ours(x))
    assert list(ours.state_dict()) == ["weight", "bias"]
    half = ours(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and ours.weight.dtype == torch.float32


# --------------------------------------------------------------------------- lean LoRA dropout


def test_lean_dropout_is_dropout_with_the_mask_drawn_again():
    """Output and gradients of :class:`helpers.lora._DropoutThenLinear` equal a plain dropout
    with the same mask (float32), and the mask keeps values at 1 - p."""
    x = torch.randn(3, 40, 16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)
    p, seed = 0.25, 7
    out = lora._DropoutThenLinear.apply(x, w, p, seed)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = (out.detach(), x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    keep = lora._keep_mask(x.detach(), p, seed)
    ref = nn.functional.linear(x * keep / (1 - p), w)
    ref.backward(grad)
    for a, b in zip(got, (ref.detach(), x.grad, w.grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    kept = lora._keep_mask(torch.empty(200_000), p, 1).mean().item()
    assert kept == pytest.approx(1 - p, abs=0.005)
    assert torch.equal(lora._keep_mask(x, p, seed), keep)  # the same seed, the same mask


def test_lean_dropout_under_autocast_with_a_float32_stream():
    """A float32 stream under autocast (GPT-NeoX and GPT-J's LayerNorm in fp16/bf16 training):
    the forward multiplies in autocast's dtype, the backward in the gradient's, as a plain
    dropout and linear do."""
    x = torch.randn(2, 30, 16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)
    grads = []
    for lean in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if lean:
                out = lora._DropoutThenLinear.apply(x, w, 0.2, 5)
            else:
                keep = lora._keep_mask(x.detach(), 0.2, 5)
                out = nn.functional.linear(x * keep, w) * (1 / 0.8)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        grads.append((x.grad.clone(), w.grad.clone()))
        x.grad = w.grad = None
    for a, b in zip(*grads, strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def _llama_with_dropout(gradient_checkpointing):
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                      max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
        init_lora_weights=False))
    lora.compute_lora_in_stream_dtype(model)
    return model


def test_lean_dropout_on_a_model_keeps_its_adapters_and_its_checkpoints_agree():
    model = _llama_with_dropout(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    note = lora.use_lean_dropout(model)
    assert note.startswith("lean LoRA dropout on 14 adapters") and model.uses_lean_dropout
    assert lora.use_lean_dropout(model) == "lean LoRA dropout: already installed"
    after = model.state_dict()  # the adapters and what a save writes are unchanged
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():  # evaluation has no dropout
        torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)
    # a checkpoint's recompute draws the seeds its forward drew: the same loss and gradients as
    # without checkpointing
    results = []
    for checkpointing in (False, True):
        m = _llama_with_dropout(checkpointing)
        lora.use_lean_dropout(m)
        m.train()
        torch.manual_seed(3)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in m.parameters() if p.requires_grad]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # and dropout is really on: another seed, another loss
    torch.manual_seed(4)
    assert m(input_ids=ids, labels=ids).loss.item() != results[1][0]


def test_the_estimator_counts_lean_dropout_as_kept_inputs():
    from helpers import estimator

    common = dict(seq_len=8192, micro_batch=1, lora_r=16, lora_dropout=0.05)
    lean = estimator.estimate("llama-3.1-8b", activation_offload=True, **common)
    masks = estimator.estimate("llama-3.1-8b", activation_offload=True, lean_dropout=False,
                               **common)
    none = estimator.estimate("llama-3.1-8b", activation_offload=True,
                              **{**common, "lora_dropout": 0.0})
    per_tok = [e.activation_detail["per_token_per_block"]["lora"] for e in (lean, masks, none)]
    assert per_tok[0] == per_tok[2] < per_tok[1] - 60_000  # dropout outputs and masks gone
    assert lean.total_allocated < masks.total_allocated
