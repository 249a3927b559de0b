"""helpers.models: the embedded model, resolving and loading MODEL, rehearsals (notebook 02).

The embedded model is built once (cached under QLORA_SERIES_CACHE or ~/.cache/qlora-series,
about a minute on two CPU cores the first time); everything else uses tiny models on CPU.
"""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import embedded as embedded_model, env, formats, loading, models, rehearsal, tokens
from helpers.config import ConfigError

ENGLISH = "Return the number of bytes read, or None if the stream is closed.\n  Two spaces: é."


def _linear4bit():
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


@pytest.fixture(scope="module")
def embedded():
    """The embedded model's folder (built on first use, then cached)."""
    return embedded_model.embedded_path()


# ------------------------------------------------------------------------- the embedded model


def test_embedded_tokenizer_has_a_real_pad_token(embedded):
    tok = loading.load_tokenizer("embedded")
    assert tok.pad_token == tokens.PAD_TOKEN and tok.eos_token == tokens.EOS_TOKEN
    assert tok.pad_token_id != tok.eos_token_id
    assert {tok.pad_token, tok.eos_token} <= set(tok.all_special_tokens)
    assert tok.padding_side == "right"
    assert tok.model_max_length == embedded_model.EMBEDDED_RECIPE["context"]
    assert len(tok) == embedded_model.EMBEDDED_RECIPE["vocab_size"]


def test_embedded_tokenizer_round_trips_english(embedded):
    tok = loading.load_tokenizer("embedded")
    ids = tok(ENGLISH, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == ENGLISH
    assert len(ENGLISH) / len(ids) > 2.0  # real merges, not bytes
    assert tok.eos_token_id not in ids


def test_embedded_chat_template_renders_turns(embedded):
    tok = loading.load_tokenizer("embedded")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text == ("### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello."
                    + tok.eos_token)
    prompt = tok.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("### Assistant:\n") and text.startswith(prompt)
    # helpers.data finds the assistant turn with it, for response-only loss
    pieces, trained = formats.chat_pieces(chat, tok)
    assert trained == [False, True] and pieces[1] == "Hello." + tok.eos_token


def test_embedded_build_report_shows_learning(embedded):
    report = embedded_model.build_report(embedded)
    vocab = embedded_model.EMBEDDED_RECIPE["vocab_size"]
    assert report["version"] == embedded_model.EMBEDDED_VERSION and report["seed"] == 0
    assert report["initial_loss"] == pytest.approx(math.log(vocab), abs=0.3)  # uniform at start
    assert report["final_loss"] < math.log(vocab) - 2.5
    assert report["eval_loss_after"] < math.log(vocab) - 2.5
    assert report["final_loss"] < 0.7 * report["initial_loss"]
    curve = [point["loss"] for point in report["loss_curve"]]
    assert curve[-1] < curve[0] and len(curve) >= 10
    assert report["corpus"]["characters"] > 500_000
    assert report["tokens_seen"] > report["corpus"]["tokens"] / 2
    assert 0.5e6 < report["parameters"] < 3e6
    assert {"corpus", "tokenizer", "pretraining", "total"} <= set(report["seconds"])


def test_embedded_layout_is_a_hub_layout(embedded):
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "build_report.json"):
        assert (embedded / name).exists(), name
    config = json.loads((embedded / "config.json").read_text())
    assert config["model_type"] == "gpt_neox" and config["tie_word_embeddings"] is False
    for key in ("hidden_size", "intermediate_size"):
        assert config[key] % 64 == 0
    generation = json.loads((embedded / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 0 and generation["pad_token_id"] == 1


def test_built_files_load_in_transformers_4_and_5(tmp_path):
    folder = embedded_model.build_embedded(tmp_path / "m", seed=0, _steps=1)
    values = json.loads((folder / "tokenizer_config.json").read_text())
    assert values["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in folder.iterdir())  # shared cache
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(folder)).pad_token == tokens.PAD_TOKEN


def test_embedded_loads_in_4bit_and_generates(embedded):
    tok = loading.load_tokenizer("embedded")
    model = loading.load_model("embedded", device="cpu")
    linear4bit = _linear4bit()
    quantized = [m for m in model.modules() if isinstance(m, linear4bit)]
    assert len(quantized) == 4 * embedded_model.EMBEDDED_RECIPE["num_layers"]
    assert all(m.weight.dtype == torch.uint8 for m in quantized)
    assert not isinstance(model.get_output_embeddings(), linear4bit)
    assert all(m.support_avx512bf16_for_cpu is False for m in quantized)  # cpu_safe applied
    info = loading.describe(model)
    assert info["architecture"] == "GPTNeoXForCausalLM" and info["quant_type"] == "nf4"
    assert info["parameters"] == embedded_model.build_report(embedded)["parameters"]
    prompt = tok("Return the", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    new = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert sum(c.isalpha() for c in new) > 0.5 * len(new)  # words, not noise


def test_embedded_is_reused_not_rebuilt(embedded):
    stamp = (embedded / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = embedded_model.embedded_path()
    assert time.perf_counter() - start < 1.0
    assert again == embedded
    assert (embedded / "model.safetensors").stat().st_mtime_ns == stamp
    assert embedded_model.build_embedded(embedded) == embedded  # complete: reused
    assert (embedded / "model.safetensors").stat().st_mtime_ns == stamp


def test_build_is_deterministic_for_a_seed(tmp_path):
    caller_state = torch.get_rng_state()
    a = embedded_model.build_embedded(tmp_path / "a", seed=3, _steps=3)
    assert torch.equal(torch.get_rng_state(), caller_state)  # the caller's seed is untouched
    b = embedded_model.build_embedded(tmp_path / "b", seed=3, _steps=3)
    c = embedded_model.build_embedded(tmp_path / "c", seed=4, _steps=3)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    assert not list(tmp_path.glob(".*building*"))  # nothing half-built left behind
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert embedded_model.build_embedded(a, seed=3, _steps=3) == a  # the same build: reused
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp
    embedded_model.build_embedded(a, seed=3, _steps=4)  # another recipe in the folder: replaced
    assert embedded_model.build_report(a)["steps"] == 4
    assert not list(tmp_path.glob(".*old*"))


# ------------------------------------------------------------------------------------ resolve


def test_resolve_each_kind(tmp_path, embedded):
    assert models.resolve("embedded") == models.ModelSource(
        "embedded", embedded_model.EMBEDDED_VERSION, path=embedded)
    (tmp_path / "config.json").write_text("{}")
    local = models.resolve(str(tmp_path))
    assert local.kind == "local" and local.path == tmp_path.resolve()
    hub = models.resolve("EleutherAI/gpt-neox-20b")
    assert hub.kind == "hub" and hub.location == "EleutherAI/gpt-neox-20b"
    shipped = models.resolve("rehearsal:gpt-neox-20b")
    assert shipped.kind == "rehearsal" and shipped.path.name == "gpt-neox-20b.json"
    assert shipped.hub_id == "EleutherAI/gpt-neox-20b"
    other = models.resolve("rehearsal:Qwen/Qwen2.5-7B")
    assert other.kind == "rehearsal" and other.path is None and other.hub_id == "Qwen/Qwen2.5-7B"


def test_resolve_refuses_clearly(tmp_path):
    with pytest.raises(ConfigError, match="no rehearsal named 'gpt-5'"):
        models.resolve("rehearsal:gpt-5")
    with pytest.raises(FileNotFoundError, match="without config.json"):
        models.resolve(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        models.resolve(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="empty"):
        models.resolve("  ")


def test_hub_id_offline_says_what_to_choose(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not models.hub_reachable()
    start = time.perf_counter()
    with pytest.raises(models.ModelUnavailableError) as err:
        loading.load_tokenizer("EleutherAI/this-model-is-not-cached")
    message = str(err.value)
    assert "cannot reach the Hugging Face Hub" in message and "HF_HUB_OFFLINE" in message
    assert "MODEL='embedded'" in message and "rehearsal:gpt-neox-20b" in message
    with pytest.raises(ConfigError, match="rehearsal:tiny-neox"):
        loading.load_model("EleutherAI/this-model-is-not-cached", device="cpu",
                          tokenizer=_FakeTokenizer(vocab=300))
    assert time.perf_counter() - start < 30  # no waiting through the Hub client's retries


def test_hub_id_without_network_fails_fast(monkeypatch):
    """No HF_HUB_OFFLINE, but the Hub does not answer: only the local Hub cache is tried."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(models.ModelUnavailableError, match="not in the local Hub cache"):
        loading.load_model("EleutherAI/this-model-is-not-cached", device="cpu",
                          tokenizer=_FakeTokenizer(vocab=300))


def test_quantization_config():
    qc = models.quantization_config("fp4", double_quant=False, compute_dtype="bfloat16")
    assert qc.load_in_4bit and qc.bnb_4bit_quant_type == "fp4"
    assert qc.bnb_4bit_use_double_quant is False and qc.bnb_4bit_compute_dtype == torch.bfloat16
    default = models.quantization_config()
    assert default.bnb_4bit_quant_type == "nf4" and default.bnb_4bit_use_double_quant
    assert default.bnb_4bit_compute_dtype == models.env.compute_dtype()
    with pytest.raises(ConfigError, match="nf4"):
        models.quantization_config("int3")


# ----------------------------------------------------------------------------- a local folder


def _tiny_local(folder, with_pad: bool):
    """A tiny random GPT-NeoX and a byte-level tokenizer saved in the Hub layout."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] + (["<|pad|>"] if with_pad else [])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([ENGLISH] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>" if with_pad else None)
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(fast), hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128,
                           max_position_embeddings=64, eos_token_id=0, bos_token_id=0)
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return len(fast)


def test_local_folder_loads_in_4bit(tmp_path):
    _tiny_local(tmp_path, with_pad=True)
    model = loading.load_model(str(tmp_path), device="cpu")
    linear4bit = _linear4bit()
    assert sum(isinstance(m, linear4bit) for m in model.modules()) == 8
    assert model.is_loaded_in_4bit
    x = torch.tensor([[0, 5, 9, 12]])
    assert torch.isfinite(model(input_ids=x).logits).all()
    m16 = loading.load_16bit(str(tmp_path))
    assert not any(isinstance(m, linear4bit) for m in m16.modules())
    # the series' one dtype decision: float32 on CPU, the GPU's compute dtype on a GPU
    assert m16.get_input_embeddings().weight.dtype == env.compute_dtype()


def test_local_tokenizer_without_pad_gets_one_and_the_model_grows(tmp_path):
    rows = _tiny_local(tmp_path, with_pad=False)
    tok = loading.load_tokenizer(str(tmp_path))
    assert tok.pad_token == tokens.PAD_TOKEN and tok.pad_token_id != tok.eos_token_id
    assert len(tok) == rows + 1
    model = loading.load_model(str(tmp_path), device="cpu", tokenizer=tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id


def test_cpu_safe_keeps_training_possible_after_eval(tmp_path):
    """The bitsandbytes 0.50 trap: an eval forward repacks 4-bit weights on AVX512-BF16 CPUs,
    and training afterwards fails; load_model applies cpu_safe, which also undoes a repacking."""
    import peft

    _tiny_local(tmp_path, with_pad=True)
    model = loading.load_model(str(tmp_path), device="cpu")
    x = torch.tensor([[0, 5, 9, 12, 3]])
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    linear4bit = _linear4bit()
    for module in model.modules():  # as if cpu_safe had not run: let the repacking happen
        if isinstance(module, linear4bit):
            module.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        model(input_ids=x)
    models.cpu_safe(model)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if isinstance(m, linear4bit))
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear"))
    model.train()
    model(input_ids=x, labels=x).loss.backward()


# -------------------------------------------------------------------------------- rehearsals


def test_rehearsal_tiny_is_4bit_and_trains_with_lora():
    import peft

    model = rehearsal.build_rehearsal("tiny-neox", models.quantization_config(), device="cpu",
                                      seed=1)
    linear4bit = _linear4bit()
    head = model.get_output_embeddings()
    linears = [(n, m) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head]
    assert len(linears) == 8
    for _, module in linears:  # no 16-bit copy of any linear weight is left
        assert isinstance(module, linear4bit) and module.weight.dtype == torch.uint8
        assert module.weight.numel() * 2 == module.in_features * module.out_features
        assert module.weight.quant_state.quant_type == "nf4"
        assert module.weight.quant_state.nested  # double quantization
    # 16-bit layers take the compute dtype of the machine (float32 on CPU)
    assert not isinstance(head, linear4bit) and head.weight.dtype == env.compute_dtype()
    assert model.is_loaded_in_4bit and model.is_quantized
    assert model.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert model.hf_quantizer.is_trainable
    assert not [n for n, t in model.named_parameters() if t.is_meta]
    info = loading.describe(model)
    assert info["parameters"] == 362_240 and info["linear_4bit_layers"] == 8

    model = peft.prepare_model_for_kbit_training(model)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8,
                                                       target_modules="all-linear"))
    model.train()
    x = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=x, labels=x).loss
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(math.log(2048), abs=0.5)
    loss.backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert len(with_grad) == 16 and all("lora_" in n for n in with_grad)
    wrapped = loading.describe(model)  # a peft model is described by its base
    assert wrapped["architecture"] == "GPTNeoXForCausalLM" and wrapped["linear_4bit_layers"] == 8


def test_rehearsal_weights_are_seeded_and_match_their_16bit_twin():
    qc = models.quantization_config()
    a = rehearsal.build_rehearsal("tiny-neox", qc, device="cpu", seed=5)
    b = rehearsal.build_rehearsal("tiny-neox", qc, device="cpu", seed=5)
    c = rehearsal.build_rehearsal("tiny-neox", qc, device="cpu", seed=6)
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    wa, wb, wc = (dict(m.named_parameters())[name] for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    # the quantized weight is the 4-bit form of the unquantized rehearsal's weight
    import bitsandbytes.functional as bf

    full = dict(rehearsal.build_rehearsal("tiny-neox", device="cpu",
                                          seed=5).named_parameters())[name]
    deq = bf.dequantize_4bit(wa.data, wa.quant_state)
    assert deq.shape == full.shape
    assert (deq - full).abs().mean() < 0.1 * full.abs().mean()
    # rotary tables are real numbers, as in a model built normally
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(models.rehearsal_config("tiny-neox"))
    assert torch.allclose(a.gpt_neox.rotary_emb.inv_freq, fresh.gpt_neox.rotary_emb.inv_freq)


REAL_SIZES = {"gpt-neox-20b": 20.55e9, "gpt-j-6b": 6.05e9, "llama-3.1-8b": 8.03e9,
              "mistral-7b": 7.24e9, "llama-2-70b": 68.98e9}


@pytest.mark.parametrize("name", sorted(REAL_SIZES))
def test_rehearsal_configs_have_the_real_size(name):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    values = json.loads((models.CONFIGS_DIR / f"{name}.json").read_text())
    assert values["architectures"] and values["model_type"]
    config = AutoConfig.for_model(**values)
    shipped = models.rehearsal_config(name)
    assert type(shipped) is type(config) and shipped.vocab_size == config.vocab_size
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    assert type(skeleton).__name__ == values["architectures"][0]
    count = sum(p.numel() for p in skeleton.parameters())
    assert count == pytest.approx(REAL_SIZES[name], rel=0.03)
    for module in skeleton.modules():  # every 4-bit candidate splits into 64-value blocks
        if isinstance(module, torch.nn.Linear):
            assert module.in_features * module.out_features % 64 == 0


def test_rehearsal_list_matches_the_shipped_files():
    shipped = {p.stem for p in models.CONFIGS_DIR.glob("*.json")}
    assert shipped == set(models.REHEARSALS)
    choices = models.list_choices()
    assert all(f"rehearsal:{name}" in choices for name in models.REHEARSALS)
    assert models.resolve("rehearsal:gpt-j-6b").hub_id == "EleutherAI/gpt-j-6b"
    assert models.resolve("rehearsal:tiny-neox").hub_id is None


def test_rehearsal_loads_through_load_model():
    model = loading.load_model("rehearsal:tiny-neox", device="cpu",
                              tokenizer=_FakeTokenizer(vocab=2048))
    assert loading.describe(model)["name"] == "rehearsal:tiny-neox"
    assert model.config.pad_token_id == 1


class _FakeTokenizer:
    """Just what fit_embeddings reads."""

    def __init__(self, vocab):
        self.vocab, self.pad_token_id, self.eos_token_id = vocab, 1, 0

    def __len__(self):
        return self.vocab


def test_rehearsal_too_big_is_refused_before_anything_is_made(monkeypatch):
    monkeypatch.setattr(rehearsal, "_free_bytes", lambda dev: 4 * 2**30)
    with pytest.raises(models.ModelUnavailableError) as err:
        rehearsal.build_rehearsal("gpt-neox-20b", models.quantization_config(
            compute_dtype="bfloat16"), device="cpu")
    # NF4 with double quantization: 4.127 bits per linear weight, 16-bit embeddings and head
    assert "needs about 11.0 GiB" in str(err.value) and "rehearsal:gpt-j-6b" in str(err.value)


@pytest.mark.gpu
def test_rehearsal_builds_on_the_gpu():
    qc = models.quantization_config(compute_dtype="bfloat16")
    model = rehearsal.build_rehearsal("tiny-neox", qc, device="cuda")
    assert next(model.parameters()).device.type == "cuda"
    x = torch.randint(0, 2048, (1, 8), device="cuda")
    assert torch.isfinite(model(input_ids=x).logits.float()).all()


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_SERIES_CACHE", str(tmp_path))
    assert embedded_model.embedded_path(build=False) == tmp_path / embedded_model.EMBEDDED_VERSION
    monkeypatch.delenv("QLORA_SERIES_CACHE")
    assert str(embedded_model.embedded_path(build=False)) == os.path.expanduser(
        os.path.join("~", ".cache", "qlora-series", embedded_model.EMBEDDED_VERSION))
