"""The streamed merge (helpers.streammerge, notebook 06) on CPU: equal to peft's merge_and_unload,
bounded in memory, refused before loading when over budget; the notebooks' memory peaks in the
manifest; notebook 06 alone trains only a short adapter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig

from helpers import adapters, env, loading, manifest, models, streammerge as sm
from helpers.merge import MergeMismatch

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["The only way to do great work", "Love is patient and", "Time is"]


@pytest.fixture(scope="module")
def tok():
    return loading.load_tokenizer("embedded")


def _lora(model, out, seed=1, **settings):
    """A LoRA adapter on ``model`` with random B (a trained one's update is as large), saved."""
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0,
                                                  **settings))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(out)
    return peft_model


def _base(tmp_path, config, tok, shard="60KB"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "base", max_shard_size=shard)
    tok.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _reference(base, adapter):
    """peft's own merge of the adapter into the base held whole."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def _neox(vocab):
    return GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256, max_position_embeddings=128, vocab_size=vocab,
                         tie_word_embeddings=False)


LORAS = {  # what the scale and the layout depend on
    "neox-rank-and-alpha-patterns": (_neox, dict(
        r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"dense_4h_to_h": 2},
        alpha_pattern={"query_key_value": 3})),
    "neox-rslora": (_neox, dict(r=8, lora_alpha=16, target_modules=["query_key_value", "dense"],
                                use_rslora=True)),
    "gpt2-fan-in-fan-out": (lambda vocab: GPT2Config(n_embd=64, n_layer=2, n_head=4,
                                                     vocab_size=vocab, n_positions=128), dict(
        r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
}


@pytest.mark.parametrize("case", sorted(LORAS))
def test_streamed_merge_equals_merge_and_unload(case, tok, tmp_path):
    make_config, settings = LORAS[case]
    base = _base(tmp_path, make_config(len(tok)), tok)
    assert (base / "model.safetensors.index.json").is_file()  # read shard by shard
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = _lora(model, tmp_path / "adapter", **settings)
    activations = adapters.capture_activations(peft_model, tok, TEXTS)
    assert activations and all(x.shape[0] <= 16 for x, _ in activations.values())

    plan = sm.plan_merge(str(base), tmp_path / "adapter", dtype=torch.float32, tokenizer=tok,
                         max_shard_bytes=100_000)
    print(plan)
    result = sm.stream_merge(plan, tmp_path / "merged", tokenizer=tok, activations=activations)
    print(result)
    assert result.layers_checked == len(activations) == plan.adapted
    assert result.layer_max_rel_diff < 1e-5
    out = tmp_path / "merged"
    assert len(result.files) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob("*.partial"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference = _reference(base, tmp_path / "adapter")
    ours, theirs = merged.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    update = max(float((theirs[k] - plain[k]).abs().max()) for k in theirs)
    assert update > 1e-2  # the adapter moved the weights
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_rehearsal_is_drawn_again_tensor_by_tensor(tok, tmp_path):
    """A rehearsal has no files: each 16-bit tensor is drawn again from its seed, as
    helpers.loading.load_16bit draws the whole model, and the merge equals peft's on it."""
    q4 = loading.load_model("rehearsal:tiny-neox", tokenizer=tok)
    peft_model = _lora(q4, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear")
    activations = adapters.capture_activations(peft_model, tok, TEXTS)
    plan = sm.plan_merge("rehearsal:tiny-neox", tmp_path / "adapter", tokenizer=tok)
    result = sm.stream_merge(plan, tmp_path / "merged", tokenizer=tok, activations=activations)
    # the 4-bit base's inputs against the 16-bit one: the merged layers still agree closely
    # float32 on CPU; in a GPU's 16-bit dtype the tolerance of that dtype
    limit = 1e-4 if plan.dtype == torch.float32 else sm.LAYER_TOLERANCE[plan.dtype]
    assert result.layers_checked == plan.adapted and result.layer_max_rel_diff < limit

    base16 = loading.load_16bit("rehearsal:tiny-neox", tokenizer=tok)
    plain = {k: v.detach().to("cpu", torch.float32).clone() for k, v in base16.state_dict().items()}
    reference = PeftModel.from_pretrained(base16, str(tmp_path / "adapter")).merge_and_unload()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    theirs = {k: v.to("cpu", torch.float32) for k, v in reference.state_dict().items()}
    # float32 on CPU; in a GPU's 16-bit dtype both merges round W + delta once to that dtype,
    # peft after rounding delta too: two roundings of the dtype apart at most
    eps = 0.0 if plan.dtype == torch.float32 else torch.finfo(plan.dtype).eps
    moved = 0.0
    for key, value in merged.state_dict().items():
        delta = float((theirs[key] - plain[key]).abs().max())
        moved = max(moved, delta)
        torch.testing.assert_close(value, theirs[key], rtol=1e-5 + 2 * eps,
                                   atol=1e-6 + 2 * eps * delta, msg=key)
    assert moved > 1e-3  # the adapter moved the weights


def test_over_budget_is_refused_before_anything_is_loaded(tok, tmp_path, monkeypatch):
    base = _base(tmp_path, _neox(len(tok)), tok)
    _lora(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter", r=4, lora_alpha=8,
          target_modules="all-linear")

    def no_reading(*args):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(sm, "_read", no_reading)
    budget = env.peak_host_rss() // 2
    with pytest.raises(sm.MergeBudgetError, match="Nothing was loaded") as err:
        sm.plan_merge(str(base), tmp_path / "adapter", host_budget=budget)
    print(err.value)
    assert "HOST_MEMORY_BUDGET_GB >= " in str(err.value)
    assert "embed_out.weight" in str(err.value)  # the largest tensor, named
    assert not (tmp_path / "merged").exists()


def test_a_layer_that_does_not_reproduce_the_adapter_stops_the_merge(tok, tmp_path):
    base = _base(tmp_path, _neox(len(tok)), tok)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = _lora(model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear")
    activations = adapters.capture_activations(peft_model, tok, TEXTS)
    key = "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"
    x, delta = activations[key]
    activations[key] = (x, 2 * delta)  # as if the scale were read wrong
    plan = sm.plan_merge(str(base), tmp_path / "adapter", dtype=torch.float32)
    with pytest.raises(MergeMismatch, match="dense_4h_to_h"):
        sm.stream_merge(plan, tmp_path / "merged", activations=activations)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()


PEAK_SCRIPT = """
import sys, torch
from helpers import env, streammerge as sm
torch.set_num_threads(1)
plan = sm.plan_merge(sys.argv[1], sys.argv[2], dtype=torch.float32, max_shard_bytes=50_000_000)
before = env.peak_host_rss(restart=True)
sm.stream_merge(plan, sys.argv[3])
print(before, env.peak_host_rss(), plan.output_bytes, plan.largest[1])
"""


def test_the_merge_holds_one_tensor_not_the_model(tok, tmp_path):
    """A 0.24 GB model in 50 MB shards: the merging process's resident memory rises by far less
    than the model's size (one tensor and its float32 sum at a time)."""
    config = GPTNeoXConfig(hidden_size=768, num_hidden_layers=8, num_attention_heads=12,
                           intermediate_size=3072, vocab_size=len(tok), tie_word_embeddings=False)
    base = _base(tmp_path, config, tok, shard="50MB")
    model = AutoModelForCausalLM.from_pretrained(base)
    _lora(model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear")
    del model
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(PEAK_SCRIPT), str(base),
                          str(tmp_path / "adapter"), str(tmp_path / "merged")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    before, peak, size, largest = map(int, run.stdout.split()[-4:])
    print(f"model {size / 1e6:.0f} MB; RSS {before / 1e6:.0f} -> peak {peak / 1e6:.0f} MB; "
          f"planned largest working set {largest / 1e6:.0f} MB")
    assert size > 200e6
    assert peak - before < size / 3
    assert peak - before < largest * 1.5 + 30e6  # the plan's working set, within slack


@pytest.mark.parametrize("tied", [False, True])
def test_a_local_folder_loads_in_4bit_as_from_pretrained_does(tied, tok, tmp_path, monkeypatch):
    """load_model reads a sharded folder one tensor at a time (no file mapped) and gives the model
    from_pretrained gives: the same weights, the same logits, generation config and name."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok) + 3,
                         tie_word_embeddings=tied)
    base = _base(tmp_path, config, tok, shard="40KB")
    assert len(list(base.glob("*.safetensors"))) > 2
    qc = models.quantization_config(compute_dtype=torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where load_model places it
    theirs = AutoModelForCausalLM.from_pretrained(base, quantization_config=qc, dtype=torch.float32,
                                                  device_map={"": device})
    models.cpu_safe(theirs)
    loading.fit_embeddings(theirs, tok)
    reads = []
    monkeypatch.setattr(loading, "_read", lambda *a: reads.append(a[2]) or READ(*a))
    ours = loading.load_model(str(base), tokenizer=tok, compute_dtype="float32")
    assert len(reads) == len(json.loads((base / "model.safetensors.index.json").read_text())[
        "weight_map"])
    assert ours.config.name_or_path == str(base)
    assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b) and sum(type(p).__name__ == "Params4bit"
                                    for p in ours.parameters()) == 14
    for key in b:
        assert torch.equal(a[key], b[key]), key
    ids = tok(TEXTS, return_tensors="pt", padding=True).to(device)
    with torch.no_grad():
        torch.testing.assert_close(ours(**ids).logits, theirs(**ids).logits, rtol=0, atol=0)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied


READ = loading._read
LOAD_PEAK_SCRIPT = """
import sys, torch
import bitsandbytes.functional as F
from transformers import AutoModelForCausalLM
from helpers import env, loading, models
torch.set_num_threads(1)
F.quantize_4bit(torch.randn(256, 256), quant_type="nf4")  # bitsandbytes' own memory, first
tok = loading.load_tokenizer(sys.argv[1])
before = env.peak_host_rss(restart=True)
if sys.argv[2] == "from_pretrained":
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32,
        quantization_config=models.quantization_config(compute_dtype=torch.float32),
        device_map={"": "cpu"})
else:
    model = loading.load_model(sys.argv[1], tokenizer=tok)
print(before, env.peak_host_rss(), model.get_memory_footprint())
"""


def test_loading_in_4bit_holds_one_tensor_not_the_folder(tok, tmp_path):
    """A 0.63 GB folder in 50 MB shards loaded in 4-bit: from_pretrained's resident memory rises
    by the whole folder (every shard mapped, every page read stays), load_model's by the 4-bit
    model and one tensor's quantization."""
    config = GPTNeoXConfig(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16,
                           intermediate_size=4096, vocab_size=len(tok), tie_word_embeddings=False)
    base = _base(tmp_path, config, tok, shard="50MB")
    folder = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    rises = {}
    for how in ("from_pretrained", "load_model"):
        run = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD_PEAK_SCRIPT), str(base),
                              how], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        before, peak, footprint = map(int, run.stdout.split()[-3:])
        rises[how] = peak - before
    print(f"folder {folder / 1e6:.0f} MB, 4-bit model {footprint / 1e6:.0f} MB; RSS rise while "
          + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in rises.items()))
    assert folder > 600e6 and footprint < folder / 5
    assert rises["from_pretrained"] > 0.8 * folder  # what this avoids, still there to avoid
    largest = 4096 * 1024 * 4
    assert rises["load_model"] < footprint + 4 * largest + 150e6  # and what loading imports
    assert rises["load_model"] < folder / 2


def test_the_manifest_records_each_notebooks_peaks(tmp_path):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    manifest.begin_notebook(tmp_path, "06_inference_and_merge", {},
                            {"gpu_bytes": 0, "host_bytes": 10**15})
    start = env.peak_host_rss()
    # 300 MB of fresh pages: mapped directly, since a process's malloc may serve a bytearray
    # from memory it already holds (then resident before the cell, and no new peak)
    shell.run_cell("import mmap; block = mmap.mmap(-1, 300_000_000)\n"
                   "for i in range(0, len(block), 4096): block[i] = 1").raise_error()
    entry = manifest.load(tmp_path)["notebooks"]["06_inference_and_merge"]
    shell.run_cell("block.close(); del block").raise_error()
    assert entry["budgets"]["host_bytes"] == 10**15
    assert entry["metrics"]["peak_host_rss_bytes"] > 300e6
    assert entry["metrics"]["peak_gpu_allocated_bytes"] == (
        env.gpu_peak_allocated() if torch.cuda.is_available() else 0)
    scoped = entry["metrics"]["peak_host_rss_from_notebook_start"]
    assert scoped == env.host_peak_is_scoped()
    # the next notebook starts from its own baseline where the platform can restart the mark
    manifest.begin_notebook(tmp_path, "01_environment_and_cuda", {}, {})
    shell.run_cell("x = 1").raise_error()
    later = manifest.load(tmp_path)["notebooks"]["01_environment_and_cuda"]["metrics"]
    if scoped:
        assert entry["metrics"]["peak_host_rss_bytes"] >= start + 290e6
        assert later["peak_host_rss_bytes"] < entry["metrics"]["peak_host_rss_bytes"] - 250e6
    else:  # the lifetime peak: never below what the earlier notebook reached
        assert later["peak_host_rss_bytes"] >= entry["metrics"]["peak_host_rss_bytes"]


def test_host_memory_is_detected():
    mem = env.host_memory()
    assert 0 < mem["available"] <= mem["limit"] <= mem["total"]
    assert env.host_budget_bytes(12.7) == int(12.7e9)
    assert env.host_budget_bytes() == mem["limit"]


def test_notebook_06_alone_trains_a_short_adapter(tmp_path, capsys):
    from helpers import config, train

    cfg = config.start("06_inference_and_merge", RUN_DIR=str(tmp_path), MAX_STEPS=200)
    folder = train.ensure_adapter(cfg)
    said = capsys.readouterr().out
    assert "training a short one first (20 steps" in said
    state = json.loads(next(tmp_path.glob("checkpoints/*/trainer_state.json")).read_text()) if (
        list(tmp_path.glob("checkpoints/*/trainer_state.json"))) else None
    metrics = manifest.load(tmp_path)["notebooks"]["06_inference_and_merge"]["metrics"]
    assert metrics["adapter_quick_steps"] == train.QUICK_ADAPTER_STEPS == 20
    assert state is None or state["global_step"] == 20
    assert (folder / "adapter_model.safetensors").is_file()
    assert train.ensure_adapter(cfg) == folder  # found the second time: nothing trained
    assert "training" not in capsys.readouterr().out
