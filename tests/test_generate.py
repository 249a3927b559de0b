"""helpers.generate, helpers.adapters and helpers.merge on tiny GPT-NeoX models on CPU: generation
(notebook 05), the adapter check before peft loads it and the verified merge (notebook 06)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPTNeoXConfig

from helpers import generate as gen, adapters, merge
from helpers import models
from helpers.config import Config

PROMPTS = ["The only", "Love is patient and", "A friend", "Time"]
EOS, PAD = "<|endoftext|>", "<|pad|>"
CORPUS = ["The only way to do great work is to love what you do.",
          "Love is patient, love is kind.", "A friend is someone who knows all about you.",
          "Time is money.", "Life is what happens while you are busy making other plans."]


# --------------------------------------------------------------------------- fixtures


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=PAD)


def _config(hidden=64, vocab=300):
    return GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=4 * hidden, max_position_embeddings=128,
                         vocab_size=vocab, tie_word_embeddings=False, bos_token_id=0,
                         eos_token_id=0, pad_token_id=1)


def load_4bit(path):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant,
                                                 device_map={"": "cpu"}, dtype=torch.float32)
    models.cpu_safe(model)
    return model


def load_16bit(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _save_adapter(base_path, out, seed):
    """A LoRA adapter trained (here: randomized) on the 4-bit base, as notebook 05 saves it."""
    from peft import LoraConfig, get_peft_model

    model = load_4bit(base_path)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Paths and tokenizer: base (hidden 64), other (hidden 96), wide_vocab (hidden 64, vocab 320),
    and an adapter for base and for other."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("generate")
    tok = _tokenizer()
    paths = {}
    for name, config in {"base": _config(), "other": _config(hidden=96),
                         "wide_vocab": _config(vocab=320)}.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
    paths["adapter"] = _save_adapter(paths["base"], root / "adapter", seed=1)
    paths["other_adapter"] = _save_adapter(paths["other"], root / "other_adapter", seed=2)
    return {"paths": paths, "tokenizer": tok, "root": root}


def load_checked(base, adapter):
    """The adapter on ``base`` as notebook 06 loads it: checked, then peft's from_pretrained."""
    adapters.check_adapter(base, adapter)
    return PeftModel.from_pretrained(base, adapter)


@pytest.fixture(scope="module")
def tuned(tiny):
    """The adapter loaded on the 4-bit base (as notebook 06 does)."""
    return load_checked(load_4bit(tiny["paths"]["base"]), tiny["paths"]["adapter"])


def eos_chain_model(tok, prompts, chain):
    """A model that writes ``chain`` after any of ``prompts`` and then EOS: attention and MLP
    outputs are zeroed, so the last hidden state is the current token's embedding, and the head
    maps each token's (normalized) embedding to its successor."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config())
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            for lin in (layer.attention.dense, layer.mlp.dense_4h_to_h):
                lin.weight.zero_()
                lin.bias.zero_()
        emb = model.gpt_neox.embed_in.weight
        head = model.get_output_embeddings().weight
        head.zero_()
        lasts = {tok(p)["input_ids"][-1] for p in prompts}
        steps = [(t, chain[0]) for t in lasts] + list(zip(chain, chain[1:] + [tok.eos_token_id]))
        for t, nxt in steps:
            u = model.gpt_neox.final_layer_norm(emb[t])
            head[nxt] += 10 * u / u.norm()
    return model.eval()


# --------------------------------------------------------------------------- generation


def test_greedy_is_deterministic_and_batching_changes_nothing(tiny, tuned):
    tok = tiny["tokenizer"]
    assert tok.padding_side == "right"
    first = gen.generate(tuned, tok, PROMPTS, max_new_tokens=12)
    again = gen.generate(tuned, tok, PROMPTS, max_new_tokens=12)
    one_by_one = [gen.generate(tuned, tok, [p], max_new_tokens=12)[0] for p in PROMPTS]
    assert first == again == one_by_one
    assert tok.padding_side == "right"  # left padding only while generating
    assert len(first) == len(PROMPTS) and all(isinstance(t, str) for t in first)
    assert first.prompts == PROMPTS
    assert all(n <= 12 for n in first.new_tokens)
    for text, ends, n in zip(first, first.ends_with_eos, first.new_tokens):
        assert ends or n == 12  # stopped by EOS, or ran out of tokens


def test_stops_at_eos_and_returns_only_new_text(tiny):
    tok = tiny["tokenizer"]
    chain = [100, 101, 102]
    model = eos_chain_model(tok, PROMPTS, chain)
    out = gen.generate(model, tok, PROMPTS, max_new_tokens=10)
    assert list(out) == [tok.decode(chain)] * len(PROMPTS)
    assert out.ends_with_eos == [True] * len(PROMPTS) and out.new_tokens == [3] * len(PROMPTS)
    assert out.eos_rate == 1.0
    cut = gen.generate(model, tok, PROMPTS[:2], max_new_tokens=2)
    assert list(cut) == [tok.decode(chain[:2])] * 2 and cut.ends_with_eos == [False, False]


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tiny, tuned):
    tok = tiny["tokenizer"]
    state = torch.get_rng_state()
    a = gen.generate(tuned, tok, PROMPTS[:2], do_sample=True, seed=3, max_new_tokens=15)
    assert torch.equal(state, torch.get_rng_state())
    b = gen.generate(tuned, tok, PROMPTS[:2], do_sample=True, seed=3, max_new_tokens=15)
    c = gen.generate(tuned, tok, PROMPTS[:2], do_sample=True, seed=4, max_new_tokens=15,
                     temperature=1.5, top_p=1.0)
    assert a == b and a != c
    with pytest.raises(ValueError, match="temperature"):
        gen.generate(tuned, tok, PROMPTS, do_sample=True, temperature=0)


def test_streaming_prints_what_it_returns(tiny, tuned, capsys):
    tok = tiny["tokenizer"]
    out = gen.generate(tuned, tok, PROMPTS[:2], max_new_tokens=8, stream=True)
    printed = capsys.readouterr().out
    assert out == gen.generate(tuned, tok, PROMPTS[:2], max_new_tokens=8)
    for prompt, text in zip(PROMPTS[:2], out):
        assert (prompt + text).strip() in printed


def test_disable_adapter_gives_the_base_outputs(tiny, tuned):
    tok = tiny["tokenizer"]
    base, after = gen.base_and_tuned(tuned, tok, PROMPTS, max_new_tokens=10)
    plain = gen.generate(load_4bit(tiny["paths"]["base"]), tok, PROMPTS, max_new_tokens=10)
    assert base == plain
    assert after == gen.generate(tuned, tok, PROMPTS, max_new_tokens=10)
    assert after != base  # the adapter changes what the model writes
    with pytest.raises(TypeError, match="peft model"):
        gen.base_and_tuned(load_16bit(tiny["paths"]["base"]), tok, PROMPTS)


def test_side_by_side_is_a_table_with_eos_marks():
    left = gen.Generations(["a\nb", "c"], [True, False], [3, 40], ["p1", "p2"])
    view = gen.side_by_side(["p1", "p2"], left, ["<b>", " d "], titles=("base", "tuned"))
    assert list(view.columns) == ["prompt", "base", "tuned"]
    assert list(view["base"]) == ["a \u23ce b [EOS]", "c [...]"]  # one line per output
    assert list(view["tuned"]) == ["<b>", "d"]  # plain strings carry no mark
    text = view.to_string()
    assert "p2" in text and "c [...]" in text
    assert "&lt;b&gt;" in view.to_html()
    with pytest.raises(ValueError, match="one output per prompt"):
        gen.side_by_side(["p1"], left, ["x"])


def _quotes_file(tmp_path, n=30):
    rows = [{"quote": f"{w} is the {k}th thing that matters most", "author": f"Author {k}"}
            for k, w in zip(range(n), CORPUS * n)]
    path = tmp_path / "quotes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_default_prompts_are_held_out_examples_laid_out_as_in_training(tiny, tmp_path):
    from helpers import data, formats

    path, rows = _quotes_file(tmp_path)
    cfg = dataclasses.replace(Config(), dataset=str(path), eval_fraction=0.2)
    prompts = gen.default_prompts(cfg, n=4)
    _, held_out, _ = data.split_rows(cfg)
    wholes = [f"{r['quote']} ({r['author']})" for r in held_out]
    assert len(prompts) == 4 and len(prompts.references) == 4
    assert [p + r for p, r in zip(prompts, prompts.references)] == wholes[:4]
    quoted = dataclasses.replace(cfg, template="Quote: {quote}")
    assert all(p.startswith("Quote: ") for p in gen.default_prompts(quoted))
    instr = dataclasses.replace(Config(), dataset=str(path), data_format="instruction")
    with pytest.raises(formats.DatasetError, match="instruction"):  # no such columns
        gen.default_prompts(instr)


def test_prompts_are_laid_out_in_the_format_and_keep_the_closing_newline(tiny):
    tok = tiny["tokenizer"]
    cfg = Config()
    assert gen.default_prompts(dataclasses.replace(cfg, prompts="Hello | World|")) == \
        ["Hello", "World"]
    assert gen.default_prompts(dataclasses.replace(cfg, template="Quote: {quote}",
                                                   prompts="Love is|Quote: Time")) == \
        ["Quote: Love is", "Quote: Time"]
    instr = dataclasses.replace(cfg, data_format="instruction",
                                prompts="Say hi. | ### Instruction:\nSay hi.\n\n### Response:")
    laid = gen.default_prompts(instr)
    assert laid.references is None
    assert laid == ["### Instruction:\nSay hi.\n\n### Response:\n"] * 2  # by hand: newline back
    chat = dataclasses.replace(cfg, data_format="chat", prompts="Hi there|<|user|>\nyo\n<|assistant|>")
    with pytest.raises(ValueError, match="tokenizer"):
        gen.default_prompts(chat)
    assert gen.default_prompts(chat, tok) == ["<|user|>\nHi there\n<|assistant|>\n",
                                              "<|user|>\nyo\n<|assistant|>\n"]


def test_a_prompt_that_starts_with_bos_gets_no_second_one(tiny):
    tok = _tokenizer()
    tok.bos_token = PAD  # a BOS distinct from EOS, as Llama's tokenizers have
    seen = []

    class Recorder(torch.nn.Module):
        device = torch.device("cpu")
        training = False
        generation_config = None

        def generate(self, input_ids, **kw):
            seen.append(input_ids[0].tolist())
            return torch.cat([input_ids, torch.zeros_like(input_ids[:, :1])], 1)

    gen.generate(Recorder(), tok, [PAD + "Time"], max_new_tokens=1)
    assert seen[0] == tok(PAD + "Time", add_special_tokens=False)["input_ids"]


def test_form_check_fails_what_an_untuned_model_writes():
    cfg = dataclasses.replace(Config(), data_format="instruction")
    check = gen.form_check(cfg, examples=["The plural of cat is cats.", "After 4 comes 5."],
                           vocabulary_examples=["The plural of dog is dogs.", "Cats. Dogs."])
    assert check.markers == ("### Instruction:", "### Input:", "### Response:")
    assert (check.min_words, check.max_words, check.max_lines) == (2, 9, 1)
    prompt = "### Instruction:\nSay it.\n\n### Response:\n"
    assert check.failure(prompt, "The plural of dog is dogs.", True) == ""
    assert "EOS" in check.failure(prompt, "The plural of dog is dogs.", False)
    assert check.failure(prompt, "  ", True) == "empty"
    assert "new turn" in check.failure(prompt, "Dogs.\n\n### Instruction:\nMore", True)
    assert check.failure(prompt, "dog " * 9, True) == ""
    assert "words" in check.failure(prompt, "dog " * 10, True)
    # a short sentence of its own, stopped by chance: not the dataset's words
    assert "words the dataset" in check.failure(prompt, "The following are not used.", True)
    assert check.failure(prompt, "The plural of mouse is mice.", True) == ""  # 4 of 6 known
    assert "lines" in check.failure(prompt, "Dogs.\nCats.", True)
    quotes = gen.form_check(Config(), examples=["Time is money. (Benjamin Franklin)"],
                            vocabulary_examples=[])
    assert quotes.failure("Time", " is money. (Benjamin Franklin)", True) == ""
    assert "template" in quotes.failure("Time", " is money.", True)


def test_chat_markers_come_from_the_template(tiny):
    tok = tiny["tokenizer"]
    chat = dataclasses.replace(Config(), data_format="chat")
    assert gen.layout_markers(chat, tok) == ("<|system|>", "<|user|>", "<|assistant|>")
    im = _tokenizer()
    im.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                        "assistant\n{% endif %}")
    assert gen.layout_markers(chat, im) == ("<|im_start|>system", "<|im_end|>",
                                             "<|im_start|>user", "<|im_start|>assistant")


def test_scores_against_references():
    assert gen.exact_match(" After 4 comes 5.\n", "After 4  comes 5.") == 1.0
    assert gen.exact_match("After 4 comes 6.", "After 4 comes 5.") == 0.0
    assert gen.token_f1("After 4 comes 6.", "After 4 comes 5.") == pytest.approx(0.75)
    assert gen.token_f1("the the cat", "the cat") == pytest.approx(0.8)
    assert gen.token_f1("", "x") == 0.0 and gen.token_f1("", "") == 1.0
    cfg = dataclasses.replace(Config(), data_format="instruction")
    prompts = gen.Prompts(["p1", "p2"], ["After 4 comes 5.", "The plural of cat is cats."])
    tuned = gen.Generations(["After 4 comes 5.", "The plural of cat is cat."], [True, True],
                            [5, 7], prompts)
    base = gen.Generations(["After 4 comes 5.", "x"], [False, True], [40, 1], prompts)
    import unittest.mock as mock

    with mock.patch("helpers.data.held_out_examples",
                    return_value=[("p", "After 4 comes 5."), ("p", "The plural of cat is cats.")]):
        figures = gen.score(cfg, None, prompts, base=base, tuned=tuned)
    assert figures["tuned_form_rate"] == 1.0 and figures["base_form_rate"] == 0.0
    assert figures["tuned_exact_match"] == 0.5 and figures["base_exact_match"] == 0.5
    assert figures["tuned_token_f1"] == pytest.approx((1 + 5 / 6) / 2, abs=1e-4)
    assert figures["base_eos_rate"] == 0.5
    with pytest.raises(ValueError, match="other prompts"):
        gen.score(cfg, None, gen.Prompts(["q1", "q2"]), tuned=tuned)


def test_model_card_names_local_data_by_file_name(tmp_path):
    from types import SimpleNamespace

    from helpers.checkpoints import model_card

    (tmp_path / "my data.jsonl").write_text("{}\n")
    (tmp_path / "base").mkdir()
    cfg = dataclasses.replace(Config(), dataset=str(tmp_path / "my data.jsonl"),
                              model=str(tmp_path / "base"))
    trainer = SimpleNamespace(model=SimpleNamespace(peft_config={}),
                              args=SimpleNamespace(learning_rate=1e-3))
    metrics = dict.fromkeys(("train_steps", "micro_batch", "grad_accum", "eval_loss_before",
                             "eval_loss_after", "perplexity_before", "perplexity_after",
                             "train_loss_final", "train_tokens_seen"), 1)
    card = model_card(cfg, trainer, {**metrics, "num_processes": 1})
    assert str(tmp_path) not in card
    assert "| dataset | my data.jsonl |" in card and "# LoRA adapter for base" in card
    hub = model_card(dataclasses.replace(cfg, dataset="owner/quotes", model="org/model-7b"),
                     trainer, {**metrics, "num_processes": 1})
    assert "| dataset | owner/quotes |" in hub and "| base model | org/model-7b |" in hub


# --------------------------------------------------------------------------- loading an adapter


def test_missing_adapter_names_the_files(tiny, tmp_path):
    base = load_16bit(tiny["paths"]["base"])
    with pytest.raises(FileNotFoundError, match="adapter_config.json and "
                                                "adapter_model.safetensors"):
        adapters.check_adapter(base, tmp_path / "nowhere")
    half = tmp_path / "half"
    half.mkdir()
    (half / "adapter_config.json").write_text(
        (tiny["paths"]["adapter"] / "adapter_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="missing adapter_model.safetensors"):
        adapters.check_adapter(base, half)


def test_adapter_for_another_base_is_refused_with_the_reason(tiny):
    paths = tiny["paths"]
    # hidden 96 vs 64: the shapes say so, even with the name check off
    with pytest.raises(adapters.AdapterMismatch) as err:
        adapters.check_adapter(load_4bit(paths["base"]), paths["other_adapter"],
                               check_base_name=False)
    msg = str(err.value)
    assert "gpt_neox.layers.0.attention.query_key_value" in msg
    assert "4 x 96" in msg and "Linear4bit 64 -> 192" in msg
    # another vocabulary with the same layer shapes: the recorded base name says so
    wide = load_16bit(paths["wide_vocab"])
    with pytest.raises(adapters.AdapterMismatch, match="trained on base"):
        adapters.check_adapter(wide, paths["adapter"])
    assert adapters.check_adapter(wide, paths["adapter"], check_base_name=False)["r"] == 4
    # the same base in 16-bit (name and shapes agree) passes and loads
    settings = adapters.check_adapter(load_16bit(paths["base"]), paths["adapter"])
    assert settings["lora_layers"] == 8 and settings["lora_alpha"] == 8
    loaded = load_checked(load_16bit(paths["base"]), paths["adapter"])
    assert not loaded.training
    with pytest.raises(ValueError, match="already carries an adapter"):
        adapters.check_adapter(loaded, paths["adapter"])


def test_adapter_target_missing_from_the_base(tiny, tmp_path):
    import shutil

    bad = tmp_path / "renamed"
    shutil.copytree(tiny["paths"]["adapter"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    adapters.check_adapter(load_16bit(tiny["paths"]["base"]), bad)  # the weights fit the base
    with pytest.raises(ValueError, match="Target modules .*not found"):  # peft names them
        PeftModel.from_pretrained(load_16bit(tiny["paths"]["base"]), bad)


# --------------------------------------------------------------------------- merging


def test_merge_into_reloaded_base_agrees_and_reloads(tiny, tuned, tmp_path):
    paths, tok = tiny["paths"], tiny["tokenizer"]
    out = tmp_path / "merged"
    result = merge.merge_adapter(lambda: load_16bit(paths["base"]), paths["adapter"],
                               tokenizer=tok, prompts=PROMPTS, out_dir=out,
                               quantized_model=tuned, max_new_tokens=12)
    print(result)
    assert result.source == merge.SOURCE_RELOADED and result.dtype == "float32"
    a = result.vs_same_base
    assert a["max_abs_diff"] < 1e-4 and a["top1_agreement"] == 1.0
    assert result.adapter_effect > 100 * a["max_abs_diff"]  # the adapter matters; merge error not
    assert result.vs_4bit is not None and result.vs_4bit["max_abs_diff"] > a["max_abs_diff"]
    assert result.generation_matches and result.merged_text == result.reference_text
    assert result.reload_max_abs_diff < 1e-6
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not list(tmp_path.glob("*.partial"))
    figures = merge.merge_metrics(result)
    for key in ("merge_max_abs_logit_diff", "merge_top1_agreement",
                "merge_max_abs_logit_diff_vs_4bit", "merge_top1_agreement_vs_4bit",
                "merged_generation_matches", "merged_size_bytes"):
        assert key in figures
    assert figures["merged_generation_matches"] == 1
    assert figures["merged_size_bytes"] == (out / "model.safetensors").stat().st_size
    assert "merge_cpu_rss_bytes_after_merge" in figures
    stages = [r.stage for r in result.memory.records]
    assert stages[:3] == ["load 16-bit base", "attach adapter", "reference outputs"]
    # a fresh load of the saved folder writes what the adapter on the same 16-bit base writes
    merged = load_16bit(out)
    assert gen.generate(merged, tok, PROMPTS, max_new_tokens=12) == result.reference_text


def test_merge_in_bfloat16_is_checked_against_bfloat16_rounding(tiny):
    paths, tok = tiny["paths"], tiny["tokenizer"]
    result = merge.merge_adapter(
        lambda: AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.bfloat16),
        paths["adapter"], tokenizer=tok, prompts=PROMPTS, max_new_tokens=8)
    print(result)
    assert result.dtype == "bfloat16" and result.tolerance == merge.MERGE_TOLERANCE[torch.bfloat16]
    assert 0 < result.vs_same_base["max_rel_diff"] < result.tolerance["rtol"]


def test_the_notebook_steps_give_what_merge_adapter_gives(tiny, tuned, tmp_path):
    """Notebook 06 spells the merge out; merge_adapter runs the same steps in one call."""
    paths, tok = tiny["paths"], tiny["tokenizer"]
    check = merge.MergeCheck(tok, PROMPTS, max_new_tokens=12)
    base16 = check.base_16bit(lambda: load_16bit(paths["base"]), quantized_model=tuned)
    peft16 = load_checked(base16, paths["adapter"])
    with pytest.raises(RuntimeError, match="call reference"):
        check.verify(base16)
    check.reference(peft16, quantized_model=tuned)
    merged = peft16.merge_and_unload()
    with pytest.raises(RuntimeError, match="call verify"):
        check.save(merged, tmp_path / "early")
    check.verify(merged)
    check.save(merged, tmp_path / "merged")
    reloaded = check.reload()
    one_call = merge.merge_adapter(lambda: load_16bit(paths["base"]), paths["adapter"],
                                   tokenizer=tok, prompts=PROMPTS, out_dir=tmp_path / "again",
                                   quantized_model=tuned, max_new_tokens=12)
    steps, whole = merge.merge_metrics(check), merge.merge_metrics(one_call)
    for key in ("merge_max_abs_logit_diff", "merge_top1_agreement", "merge_adapter_effect_max_abs",
                "merge_max_abs_logit_diff_vs_4bit", "merged_generation_matches",
                "merged_size_bytes", "merge_dequantized"):
        assert steps[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-7), key
    assert gen.generate(reloaded, tok, PROMPTS, max_new_tokens=12) == check.reference_text


def test_a_corrupted_merge_is_refused_and_nothing_is_saved(tiny, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    paths, tok = tiny["paths"], tiny["tokenizer"]
    real = LoraModel.merge_and_unload

    def noisy(self, *args, **kwargs):
        merged = real(self, *args, **kwargs)
        with torch.no_grad():
            w = merged.gpt_neox.layers[1].mlp.dense_4h_to_h.weight
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        return merged

    monkeypatch.setattr(LoraModel, "merge_and_unload", noisy)
    out = tmp_path / "merged"
    with pytest.raises(merge.MergeMismatch, match="Nothing was saved") as err:
        merge.merge_adapter(lambda: load_16bit(paths["base"]), paths["adapter"], tokenizer=tok,
                            prompts=PROMPTS, out_dir=out, max_new_tokens=8)
    assert err.value.figures["max_rel_diff"] > err.value.tolerance["rtol"]
    assert err.value.figures["adapter_effect"] > err.value.figures["max_abs_diff"] / 100
    print("corrupted merge:", err.value.figures)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_dequantized_path_when_only_the_4bit_model_exists(tiny, tmp_path):
    paths, tok = tiny["paths"], tiny["tokenizer"]
    q4 = load_4bit(paths["base"])
    plain = merge.dequantize_model(q4)
    assert not any(type(m).__name__ == "Linear4bit" for m in plain.modules())
    assert any(type(m).__name__ == "Linear4bit" for m in q4.modules())  # the 4-bit model stays
    assert plain.gpt_neox.layers[0].attention.query_key_value.weight.dtype == torch.float32
    assert "quantization_config" not in plain.config.to_dict()
    # the dequantized weights are what the 4-bit layers compute with
    same = merge.compare_logit_sets(merge.logits_for(q4, tok, PROMPTS),
                                    merge.logits_for(plain, tok, PROMPTS))
    assert same["max_abs_diff"] < 1e-4 and same["top1_agreement"] == 1.0
    # a peft model's copy is its base, without the adapter
    base_of_tuned = merge.dequantize_model(load_checked(load_4bit(paths["base"]), paths["adapter"]))
    assert not isinstance(base_of_tuned, PeftModel)
    assert not any("lora_" in n for n, _ in base_of_tuned.named_parameters())

    def no_weights():
        raise FileNotFoundError("no 16-bit weights for this model")

    result = merge.merge_adapter(no_weights, paths["adapter"], tokenizer=tok, prompts=PROMPTS,
                               out_dir=tmp_path / "merged", quantized_model=q4,
                               max_new_tokens=10)
    print(result)
    assert result.source == merge.SOURCE_DEQUANTIZED == "dequantized from 4-bit"
    assert any("dequantized the 4-bit model instead" in n for n in result.notes)
    assert result.vs_same_base["max_abs_diff"] < 1e-4
    assert result.vs_same_base["top1_agreement"] == 1.0
    # merged from the dequantized base, it matches the adapter on the 4-bit base too
    assert result.vs_4bit["max_abs_diff"] < 1e-3 and result.vs_4bit["top1_agreement"] == 1.0
    assert result.generation_matches
    assert merge.merge_metrics(result)["merge_dequantized"] == 1
    # with no loader at all, the same
    again = merge.merge_adapter(None, paths["adapter"], tokenizer=tok, prompts=PROMPTS[:1],
                              quantized_model=q4, max_new_tokens=4)
    assert again.source == merge.SOURCE_DEQUANTIZED and again.out_dir is None
    with pytest.raises(ValueError, match="no 16-bit base"):
        merge.merge_adapter(None, paths["adapter"], tokenizer=tok, prompts=PROMPTS)


def test_dequantize_a_model_repacked_for_cpu_inference(tiny):
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this processor has no AVX512-BF16: bitsandbytes never repacks here")
    tok = tiny["tokenizer"]
    q4 = AutoModelForCausalLM.from_pretrained(
        tiny["paths"]["base"], device_map={"": "cpu"}, dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.float32))
    layer = q4.gpt_neox.layers[0].attention.query_key_value
    enc = tok("Time", return_tensors="pt")
    with torch.no_grad():
        expected = q4(**enc).logits  # in train mode: computed from the usual layout
    q4.eval()
    with torch.no_grad():  # the trap: an eval forward without grad repacks (no cpu_safe here)
        q4(**enc)
    assert layer.weight.quant_state.packing_format_for_cpu
    plain = merge.dequantize_model(q4)
    with torch.no_grad():
        got = plain(**enc).logits
    # the same model, up to the bf16 rounding of the block scales the repacking does (about 0.4%
    # per weight; a wrong layout would scramble the weights and move logits by their own size)
    same = merge.compare_logit_sets([expected[0]], [got[0]])
    assert same["max_rel_diff"] < 1e-2 and same["top1_agreement"] == 1.0
    assert got.abs().max() > 0.1


@pytest.mark.gpu
def test_merge_on_the_gpu_in_bfloat16(tiny, tmp_path):
    paths, tok = tiny["paths"], tiny["tokenizer"]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    q4 = AutoModelForCausalLM.from_pretrained(paths["base"], quantization_config=quant,
                                              device_map={"": 0}, dtype=torch.bfloat16)
    tuned_gpu = load_checked(q4, paths["adapter"])
    first = gen.generate(tuned_gpu, tok, PROMPTS, max_new_tokens=10)
    assert first == gen.generate(tuned_gpu, tok, PROMPTS, max_new_tokens=10)
    result = merge.merge_adapter(None, paths["adapter"], tokenizer=tok, prompts=PROMPTS,
                               out_dir=tmp_path / "merged", quantized_model=tuned_gpu,
                               max_new_tokens=10)
    print(result)
    assert result.source == merge.SOURCE_DEQUANTIZED and result.dtype == "bfloat16"
    assert result.device.startswith("cuda")
    assert result.vs_same_base["max_rel_diff"] < result.tolerance["rtol"]
    assert result.reload_max_abs_diff < 0.05  # the same bf16 weights (kernels may differ)


# --------------------------------------------------------------------------- a short fine-tune


def test_a_short_instruction_fine_tune_writes_in_the_form_and_the_base_does_not(tmp_path):
    """The embedded model tuned for 80 steps on tests/data/instructions.jsonl (notebook 05's
    path, helpers.train.train_from_config; about a minute on two CPU cores): from held-out
    prompts and from PROMPTS (plain, and one laid out by hand without its closing newline), the
    tuned model answers in the dataset's form and the untuned base does not (measured on CPU:
    tuned 8/8 and 5/5, base 0/8 and 0/5)."""
    from pathlib import Path

    from helpers import loading, train
    from helpers.config import make_config

    data_file = Path(__file__).parent / "data" / "instructions.jsonl"
    cfg = make_config(RUN_DIR=str(tmp_path), DATASET=str(data_file), DATA_FORMAT="instruction",
                      MAX_STEPS=80, SAVE_STEPS=100)
    result = train.train_from_config(cfg, verbose=False)
    model, tokenizer = result.trainer.model, loading.load_tokenizer(cfg.model)
    held_out = gen.default_prompts(cfg, tokenizer, n=8)
    given = gen.default_prompts(dataclasses.replace(
        cfg, prompts="Give the opposite of the word: dark|Name the capital city of Spain.|Which "
                     "number comes after 12?|Write the plural of the noun: lamp|### Instruction:"
                     "\nGive the opposite of the word.\n\n### Input:\nslow\n\n### Response:"))
    for prompts in (held_out, given):
        base, tuned = gen.base_and_tuned(model, tokenizer, prompts, max_new_tokens=40)
        figures = gen.score(cfg, tokenizer, prompts, base=base, tuned=tuned)
        assert figures["tuned_form_rate"] >= 0.75, (list(tuned), figures)
        assert figures["base_form_rate"] <= 0.125, (list(base), figures)
        assert all(t.strip() for t in tuned)  # never the empty answer of a stripped layout
    assert figures.get("tuned_exact_match") is None  # PROMPTS have no references
