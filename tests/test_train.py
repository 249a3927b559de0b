"""helpers.train on a tiny random GPT-NeoX in 4-bit on CPU (notebook 05)."""

from __future__ import annotations

import dataclasses
import json
import math
import types

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import (TrainerCallback,
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GPTNeoXConfig,
    PreTrainedTokenizerFast,
)

from helpers import env, lora, losses
from helpers import train as T, budget, callbacks, checkpoints
from helpers.config import Config

SUBJECTS = ["sky", "grass", "sun", "night", "sea", "fire", "ice", "stone", "rain", "snow",
            "wind", "sand", "moon", "leaf", "river", "cloud"]
VALUES = ["blue", "green", "bright", "dark", "deep", "hot", "cold", "hard", "wet", "white",
          "loud", "dry", "pale", "thin", "long", "grey"]
TEXTS = [f"the {s} is {v}." for s, v in zip(SUBJECTS, VALUES)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model of :func:`build_tiny`, once per test module."""
    torch.set_num_threads(1)
    return build_tiny(tmp_path_factory.mktemp("tiny-neox"))


def build_tiny(root):
    """A random 2-layer GPT-NeoX (hidden 64) and a byte-level BPE tokenizer with distinct EOS and
    pad tokens, saved as safetensors in ``root``. The frozen head is scaled up so that LoRA in the
    blocks can reach confident predictions (a pretrained model's head can; a random one of std
    0.02 cannot)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>")
    fast.save_pretrained(root)
    config = GPTNeoXConfig(vocab_size=len(fast), hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=256,
                           max_position_embeddings=128, eos_token_id=fast.eos_token_id,
                           bos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a random head of std 0.02 caps the logits near 1: widen it
        model.get_output_embeddings().weight.mul_(10.0)
    model.save_pretrained(root)
    return root


def tokenizer_of(tiny):
    return PreTrainedTokenizerFast.from_pretrained(tiny)


def config(tmp_path, **changes) -> Config:
    values = {"run_dir": str(tmp_path / "run"), "model": "tiny-neox", "lora_r": 8,
              "lora_alpha": 16, "lora_dropout": 0.0, "max_length": 32, "micro_batch": 4,
              "grad_accum": 1, "optimizer": "adamw_torch", "learning_rate": 3e-3,
              "lr_schedule": "cosine", "warmup_steps": 2, "max_steps": 8, "save_steps": 4,
              "gradient_checkpointing": True}
    values.update(changes)
    return dataclasses.replace(Config(), **values)


def peft_model(tiny, cfg, seed=0):
    """The tiny model in NF4 with double quantization on CPU, prepared, with LoRA attached."""
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=quant,
                                                 device_map={"": "cpu"}, dtype=torch.float32)
    lora.prepare_for_training(model, cfg.gradient_checkpointing, False)
    torch.manual_seed(seed)
    return lora.attach(model, cfg)


def rows(tokenizer, texts):
    """Unpadded rows: every token labelled, EOS included."""
    out = {"input_ids": [], "labels": []}
    for t in texts:
        ids = tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
        out["input_ids"].append(ids)
        out["labels"].append(list(ids))
    return Dataset.from_dict(out)


class Collator:
    """Right padding with the pad id, attention mask 0 and label -100 on padding."""

    def __init__(self, tokenizer):
        self.pad = tokenizer.pad_token_id

    def __call__(self, features):
        width = max(len(f["input_ids"]) for f in features)
        n = len(features)
        batch = {"input_ids": torch.full((n, width), self.pad),
                 "attention_mask": torch.zeros((n, width), dtype=torch.long),
                 "labels": torch.full((n, width), -100)}
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            batch["input_ids"][i, :k] = torch.tensor(f["input_ids"])
            batch["attention_mask"][i, :k] = 1
            batch["labels"][i, :k] = torch.tensor(f["labels"])
        return batch


def collator_for(tokenizer):
    try:
        from helpers.data import CompletionCollator
    except ImportError:  # pragma: no cover
        return Collator(tokenizer)
    return CompletionCollator(tokenizer)


def run(tiny, cfg, callbacks=(), train_texts=TEXTS, eval_texts=TEXTS[:8], seed=0, **kw):
    tokenizer = tokenizer_of(tiny)
    model = peft_model(tiny, cfg, seed)
    result = T.train(cfg, model, tokenizer, rows(tokenizer, train_texts),
                     rows(tokenizer, eval_texts), collator_for(tokenizer),
                     callbacks=callbacks, live=False, **kw)
    return result, model


def adapter_weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


# --------------------------------------------------------------------------- arguments


def _fake_gpu_torch(capability):
    cuda = types.SimpleNamespace(is_available=lambda: True,
                                 get_device_capability=lambda index=0: capability)
    return types.SimpleNamespace(float32=torch.float32, float16=torch.float16,
                                 bfloat16=torch.bfloat16, dtype=torch.dtype, cuda=cuda)


@pytest.mark.parametrize("capability, requested, dtype, bf16, fp16", [
    ((8, 0), "auto", torch.bfloat16, False, False),  # A100 / H100: native bf16, no autocast
    ((7, 5), "auto", torch.float16, False, True),  # T4: fp16, never emulated bf16
    ((8, 0), "float32", torch.float32, False, False),
])
def test_precision_flags_follow_the_one_dtype_decision(tmp_path, monkeypatch, capability,
                                                       requested, dtype, bf16, fp16):
    monkeypatch.setattr(env, "torch", _fake_gpu_torch(capability))
    cfg = config(tmp_path, compute_dtype=requested)
    got = env.compute_dtype(cfg.compute_dtype)
    flags = env.precision_flags(got)
    assert got == dtype
    args = T.training_arguments(cfg, micro_batch=4)  # the dtype comes from the same decision
    assert (args.bf16, args.fp16) == (bf16, fp16) == (flags["bf16"], flags["fp16"])


def test_training_arguments_from_config(tmp_path):
    cfg = config(tmp_path, optimizer="paged_adamw_8bit", grad_accum=4, save_steps=5, seed=7)
    args = T.training_arguments(cfg, micro_batch=2)
    assert args.optim == "paged_adamw_8bit"
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 4)
    assert (args.max_steps, args.save_steps, args.logging_steps) == (8, 5, 1)
    assert args.output_dir.endswith("checkpoints")
    assert args.logging_nan_inf_filter is False  # a NaN must stay visible
    # transformers 5.2x names it activation_checkpointing, earlier releases gradient_checkpointing
    name = "activation" if hasattr(args, "activation_checkpointing_kwargs") else "gradient"
    assert getattr(args, f"{name}_checkpointing_kwargs") == {"use_reentrant": False}
    assert args.report_to == []  # "none": no external reporting
    assert (args.seed, args.data_seed) == (7, 7)
    flags = env.precision_flags(env.compute_dtype(cfg.compute_dtype))  # the one dtype decision
    assert args.use_cpu == (not torch.cuda.is_available())
    assert (args.bf16, args.fp16) == (flags["bf16"], flags["fp16"])  # CPU: float32, neither
    assert args.remove_unused_columns is False
    assert args.include_num_input_tokens_seen == "non_padding"  # the Trainer counts real tokens
    epochs = T.training_arguments(config(tmp_path, max_steps=0, epochs=2.0), 2)
    assert (epochs.max_steps, epochs.num_train_epochs) == (-1, 2.0)


def _notebook_cell(name: str, marker: str) -> str:
    from pathlib import Path

    nb = json.loads((Path(__file__).resolve().parent.parent / "notebooks" / name).read_text())
    found = [c["source"] for c in nb["cells"] if c["cell_type"] == "code"
             and marker in "".join(c["source"])]
    assert len(found) == 1, f"{name}: {len(found)} code cells contain {marker!r}"
    return "".join(found[0])


@pytest.mark.parametrize("changes", [{}, {"max_steps": 0, "epochs": 2.0, "save_steps": 0},
                                     {"learning_rate": 0.0, "grad_accum": 4}])
def test_the_notebook_builds_the_arguments_training_arguments_builds(tmp_path, tiny, changes):
    """Notebook 05's TrainingArguments cell, run on its inputs, gives exactly the arguments that
    helpers.train.training_arguments builds for the command line."""
    import helpers

    cfg = config(tmp_path, **changes)
    model = peft_model(tiny, cfg)
    dtype = env.compute_dtype(cfg.compute_dtype)
    scope = {"helpers": helpers, "cfg": cfg, "micro_batch": 2, "flags": env.precision_flags(dtype),
             "learning_rate": cfg.learning_rate or T.auto_learning_rate(model)}
    exec(_notebook_cell("05_paged_optimizer_training.ipynb", "TrainingArguments("), scope)
    expected = T.training_arguments(cfg, 2, dtype, model=model).to_dict()
    assert scope["args"].to_dict() == expected


# --------------------------------------------------------------------------- fit the card


def test_budget_too_small_is_refused_before_training(tmp_path, tiny):
    cfg = config(tmp_path, memory_budget_gb=8.0, max_length=128)
    model = peft_model(tiny, cfg)

    def estimate(micro_batch, seq_len):  # a pretend 7B model: 5 GB + 30 MB per token
        return int(5e9 + 3e7 * micro_batch * seq_len)

    with pytest.raises(budget.BudgetError) as err:
        budget.choose_micro_batch(cfg, model, estimate_fn=estimate)
    msg = str(err.value)
    assert "MEMORY_BUDGET_GB=8 is too small" in msg and "8.84 GB" in msg
    assert "MAX_LENGTH = 64 would fit" in msg  # (8e9 - 5e9) / 3e7 = 100 -> 64
    assert "at least 8.9 GB" in msg
    # train() refuses it the same way, before anything is trained
    tokenizer = tokenizer_of(tiny)
    with pytest.raises(budget.BudgetError):
        T.train(cfg, model, tokenizer, rows(tokenizer, TEXTS), None, collator_for(tokenizer),
                estimate_fn=estimate, live=False)
    assert checkpoints.latest_checkpoint(cfg.run_dir) is None


def test_a_sequence_longer_than_the_models_positions_is_refused_before_any_step(tmp_path, tiny):
    """tiny has 128 positions: MAX_LENGTH 256 is refused with the length that works, before a
    probe or a step (on a GPU, GPT-J's rotary table indexed past its end is a device-side assert
    that leaves the CUDA context unusable)."""
    cfg = config(tmp_path, max_length=256)
    model = peft_model(tiny, cfg)
    assert budget.positions(model) == 128
    for call in (lambda: budget.choose_micro_batch(cfg, model),
                 lambda: budget.probe_step(model, 1, 256)):
        with pytest.raises(budget.SequenceTooLongError, match="set MAX_LENGTH to at most 128"):
            call()
    budget.require_positions(model, 128)  # its own length is fine


def test_budget_from_the_real_estimator(tmp_path, tiny):
    model = peft_model(tiny, config(tmp_path, micro_batch=0))
    # 100 kB, not even the weights: refused by the parameter check (under 0.5 GB), and by the
    # budget for a caller that skips it, with the figure shown as given
    cfg = config(tmp_path, memory_budget_gb=0.0001, micro_batch=0)
    with pytest.raises(budget.BudgetError, match=r"MEMORY_BUDGET_GB=0\.0001 is too small"):
        budget.choose_micro_batch(cfg, model)
    roomy = config(tmp_path, memory_budget_gb=1.0, micro_batch=0)
    micro, notes = budget.choose_micro_batch(roomy, model)
    assert micro == budget.CPU_MICRO_BATCH and any("CPU" in n for n in notes)


def test_micro_batch_search_helpers():
    def est(b, s):
        return 1000 + 10 * b * s

    assert budget.largest_micro_batch(est, 1000 + 10 * 4 * 100, 100) == 4
    assert budget.largest_micro_batch(est, 999, 100) == 0
    assert budget.largest_seq_len(est, 1000 + 10 * 200, range(64, 513, 64)) == 192


# --------------------------------------------------------------------------- tokens per second


def test_tokens_per_second_counts_only_real_tokens(tmp_path, tiny):
    """Rows already padded to 32 with attention_mask 0: only the unpadded tokens count, over the
    2 micro-batches of each step (gradient accumulation)."""
    cfg = config(tmp_path, max_steps=4, save_steps=0, micro_batch=2, grad_accum=2)
    tokenizer = tokenizer_of(tiny)
    base = rows(tokenizer, TEXTS)
    lengths = [len(r) for r in base["input_ids"]]
    width = 32
    padded = Dataset.from_dict({
        "input_ids": [r + [tokenizer.pad_token_id] * (width - len(r)) for r in base["input_ids"]],
        "attention_mask": [[1] * len(r) + [0] * (width - len(r)) for r in base["input_ids"]],
        "labels": [r + [-100] * (width - len(r)) for r in base["labels"]]})

    def pass_through(features):
        return {k: torch.tensor([f[k] for f in features]) for k in features[0]}

    model = peft_model(tiny, cfg)
    result = T.train(cfg, model, tokenizer, padded, None, pass_through, live=False)
    steps = T._callback(result.trainer, callbacks.ThroughputCallback).steps
    assert len(steps) == 4 and all(s["tokens"] < 4 * width for s in steps)
    # every step is 2 x 2 whole rows; 16 rows = 4 steps: one epoch, each row once
    assert result.metrics["train_tokens_seen"] == sum(lengths)
    assert sum(s["tokens"] for s in steps) == sum(lengths)
    timed = steps[1:]
    expected = sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed)
    assert result.metrics["tokens_per_second"] == pytest.approx(expected)


def test_packed_rows_count_without_padding(tmp_path, tiny):
    """Packed rows (position_ids, no attention mask in the batch): the Trainer's count of real
    tokens leaves out the padding of the shorter rows, by the pad id the collator filled in."""
    cfg = config(tmp_path, max_steps=2, save_steps=0, micro_batch=4)
    tokenizer = tokenizer_of(tiny)
    base = rows(tokenizer, TEXTS[:8])
    packed = base.map(lambda r: {"position_ids": list(range(len(r["input_ids"])))})
    model = peft_model(tiny, cfg)
    result = T.train(cfg, model, tokenizer, packed, None, collator_for(tokenizer), live=False)
    assert "attention_mask" not in collator_for(tokenizer)([packed[0], packed[1]])
    assert result.metrics["train_tokens_seen"] == sum(len(r) for r in base["input_ids"])


# --------------------------------------------------------------------------- it learns


def test_eval_loss_falls_on_a_memorizable_dataset(tmp_path, tiny):
    cfg = config(tmp_path, max_steps=24, save_steps=8, optimizer="paged_adamw_8bit",
                 lora_r=16, lora_alpha=32, learning_rate=5e-3)
    result, _ = run(tiny, cfg)
    m = result.metrics
    assert m["eval_loss_after"] < 0.8 * m["eval_loss_before"]
    assert m["perplexity_after"] == pytest.approx(math.exp(m["eval_loss_after"]))
    assert m["train_loss_final"] < m["train_loss_first"]
    assert m["train_steps"] == 24 and m["micro_batch"] == 4
    assert "held-out loss" in result.summary()
    for key in ("eval_loss_before", "eval_loss_after", "train_loss_final", "tokens_per_second",
                "peak_gpu_bytes_train", "micro_batch", "perplexity_before", "perplexity_after",
                "train_steps", "train_tokens_seen", "train_seconds"):
        assert isinstance(m[key], (int, float)) and math.isfinite(m[key]), key
    # what was saved: the adapter with its card, the curve, complete checkpoints
    run_dir = tmp_path / "run"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    card = (run_dir / "adapter" / "README.md").read_text()
    assert "tiny-neox" in card and "eval loss after" in card
    assert (run_dir / "loss_curve.png").stat().st_size > 1000
    for step in (8, 16, 24):
        files = checkpoints.checkpoint_files(run_dir / "checkpoints" / f"checkpoint-{step}")
        assert all(files.values()), files
        assert (run_dir / "checkpoints" / f"checkpoint-{step}" / checkpoints.SIGNATURE).is_file()
    assert not list((run_dir / "checkpoints").glob("*/adapter_model.bin"))
    # history: one entry per step with loss, learning rate and grad norm; tokens of every step
    h = result.history
    assert [e["step"] for e in h] == list(range(1, 25))
    assert all({"loss", "learning_rate", "grad_norm"} <= set(e) for e in h)
    steps = T._callback(result.trainer, callbacks.ThroughputCallback).steps
    assert [s["step"] for s in steps] == list(range(1, 25)) and all(s["tokens"] > 0 for s in steps)
    assert sum(s["tokens"] for s in steps) == m["train_tokens_seen"]
    assert m["peak_cpu_rss_bytes_train"] > 0


def test_evaluate_loss_is_token_weighted(tmp_path, tiny):
    """Two batches of very different sizes: the loss is the mean over all label tokens."""
    cfg = config(tmp_path)
    tokenizer = tokenizer_of(tiny)
    model = peft_model(tiny, cfg)
    ds = rows(tokenizer, [TEXTS[0], TEXTS[1] + " " + TEXTS[2] + " " + TEXTS[3]])
    collate = collator_for(tokenizer)
    rng = torch.get_rng_state()
    loss, ppl = T.evaluate_loss(model, ds, collate, batch_size=1)
    # the training that follows draws its dropout from the same random state: left untouched
    assert torch.equal(torch.get_rng_state(), rng)
    sums, counts = [], []
    for i in range(2):
        b = collate([ds[i]])
        with torch.no_grad():
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        labels=b["labels"])
        n = int((b["labels"][:, 1:] != -100).sum())
        sums.append(float(out.loss) * n)
        counts.append(n)
    assert counts[0] != counts[1]
    assert loss == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert loss != pytest.approx((sums[0] / counts[0] + sums[1] / counts[1]) / 2, rel=1e-3)
    assert ppl == pytest.approx(math.exp(loss))


def test_evaluate_loss_never_holds_the_whole_rows_logits(tmp_path, tiny):
    """The held-out loss runs the head over one position per row plus the labelled positions, a
    chunk at a time (the chunk is shrunk here so that a row makes several): the whole row's
    logits, which at the longest sequences a card trains do not fit beside the model, never
    exist. The loss is the standard one (the model's own, within float32 summation order)."""
    cfg = config(tmp_path)
    tokenizer = tokenizer_of(tiny)
    model = peft_model(tiny, cfg)
    ds = rows(tokenizer, [" ".join(TEXTS), TEXTS[1]])
    collate = collator_for(tokenizer)
    head = model.get_output_embeddings()
    seen = []
    handle = head.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(losses, "chunk_tokens", lambda vocab: 5)
            loss, _ = T.evaluate_loss(model, ds, collate, batch_size=2)
    finally:
        handle.remove()
    b = collate([ds[0], ds[1]])
    labelled = int((b["labels"][:, 1:] != -100).sum())
    assert b["input_ids"].shape[1] > 5 and labelled > 5
    heads_rows = [math.prod(shape[:-1]) for shape in seen]
    assert max(heads_rows) <= 5 and sum(heads_rows) == labelled + 2  # + the last position of each
    model.eval()  # no dropout, as in evaluate_loss
    with torch.no_grad():
        own = model(**{k: v for k, v in b.items() if k != "labels"}, labels=b["labels"]).loss
    assert loss == pytest.approx(float(own), rel=1e-5)


def test_running_out_of_memory_in_the_held_out_loss_says_what_to_do(tmp_path, tiny, monkeypatch):
    """An out-of-memory error in the held-out loss becomes a BudgetError naming the rows and what
    to change, with the model's mode restored; after training it costs only that figure: the
    adapter is saved, the loss after is NaN and the notes say why."""
    cfg = config(tmp_path, max_steps=2, save_steps=0)
    tokenizer = tokenizer_of(tiny)
    model = peft_model(tiny, cfg)
    ds = rows(tokenizer, TEXTS[:4])
    summed = losses.summed_loss

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.57 GiB")

    monkeypatch.setattr(losses, "summed_loss", out_of_memory)
    model.train()
    with pytest.raises(budget.BudgetError, match=r"held-out loss on 2 row\(s\) of .* tokens: "
                       r"evaluate fewer rows at a time \(batch_size=1\)"):
        T.evaluate_loss(model, ds, collator_for(tokenizer), batch_size=2)
    assert model.training
    monkeypatch.setattr(losses, "summed_loss", summed)
    evaluate, calls = T.evaluate_loss, []

    def after_fails(*args, **kwargs):  # the second evaluation, after training, runs out
        calls.append(1)
        if len(calls) > 1:
            monkeypatch.setattr(losses, "summed_loss", out_of_memory)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(T, "evaluate_loss", after_fails)
    result, _ = run(tiny, cfg)
    assert len(calls) == 2
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert math.isnan(result.metrics["eval_loss_after"])
    assert not math.isnan(result.metrics["eval_loss_before"])
    assert any("held-out loss after training was not measured" in n for n in result.notes)


# --------------------------------------------------------------------------- chunked loss


@pytest.mark.parametrize("loss_kwargs", [True, False])
def test_chunked_loss_trains_like_the_standard_loss(tmp_path, tiny, monkeypatch, loss_kwargs):
    """Micro-batches of 2 rows of different lengths, 3 accumulated per step: the chunked loss (in
    chunks of 5 positions) logs the same losses and gradient norms and ends with the same
    adapter as the model's own loss. With ``loss_kwargs`` the Trainer passes num_items_in_batch
    (the token count over the accumulated micro-batches); without, each micro-batch's mean is
    divided by the accumulation steps - both as for the model's own loss."""
    calls = []
    chunked = losses.chunked_cross_entropy

    def counting(*args, **kwargs):
        calls.append((torch.is_grad_enabled(), kwargs.get("num_items_in_batch")))
        return chunked(*args, **kwargs)

    monkeypatch.setattr(losses, "chunked_cross_entropy", counting)
    monkeypatch.setattr(losses, "chunk_tokens", lambda vocab: 5)  # several chunks per batch
    if not loss_kwargs:
        make = T.make_trainer

        def no_loss_kwargs(*a, **kw):
            trainer = make(*a, **kw)
            trainer.model_accepts_loss_kwargs = False
            return trainer

        monkeypatch.setattr(T, "make_trainer", no_loss_kwargs)
    results = {}
    for on in (False, True):
        cfg = config(tmp_path / str(on), max_steps=4, save_steps=0, micro_batch=2, grad_accum=3,
                     lora_dropout=0.0, chunked_loss=on)
        result, _ = run(tiny, cfg, train_texts=[t + " and " + TEXTS[i % 5] * (i % 3)
                                                 for i, t in enumerate(TEXTS)] * 2)
        results[on] = result
    training = [n for grad, n in calls if grad]
    assert len(training) == 4 * 3
    assert all((n is not None) == loss_kwargs for n in training)
    assert len(calls) > len(training)  # the held-out losses go through it as well, both runs
    standard, chunked_run = results[False], results[True]
    for a, b in zip(standard.history, chunked_run.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-6)
    assert chunked_run.metrics["eval_loss_after"] == pytest.approx(
        standard.metrics["eval_loss_after"], rel=1e-5)
    wa, wb = adapter_weights(standard.adapter_dir), adapter_weights(chunked_run.adapter_dir)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)


def test_the_estimate_follows_chunked_loss(tmp_path, tiny, monkeypatch):
    from helpers import estimator

    seen = []
    estimate = estimator.estimate

    def recording(*args, **kwargs):
        seen.append(kwargs["chunked_loss"])
        return estimate(*args, **kwargs)

    from helpers import losses

    monkeypatch.setattr(budget, "estimate", recording)
    model = peft_model(tiny, config(tmp_path))
    for on in (False, True):
        if on:
            assert "chunked loss" in losses.use_chunked_loss(model)
        seen.clear()
        budget.default_estimate_fn(config(tmp_path), model)(1, 32)
        assert seen and set(seen) == {on}


# --------------------------------------------------------------------------- resume


class StopAfterStep(TrainerCallback):
    """Stops training after optimizer step ``step``, as an interruption would (the schedule stays
    that of the full run)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("optimizer, rank", [("adamw_torch", 8), ("paged_adamw_8bit", 64)])
def test_resume_matches_an_uninterrupted_run(tmp_path, tiny, optimizer, rank):
    """8 steps straight, versus: interrupted after step 5 (the last checkpoint is step 4, so step
    5 is lost and redone), then resumed. Same schedule, same data order, same final weights.
    Rank 64 makes every LoRA matrix >= 4096 values, the size from which bitsandbytes keeps the
    Adam states in 8 bits (smaller tensors get 32-bit states)."""
    common = {"max_steps": 8, "save_steps": 4, "optimizer": optimizer, "lora_dropout": 0.1,
              "lora_r": rank, "lora_alpha": rank}
    straight, _ = run(tiny, config(tmp_path / "a", **common))

    cfg = config(tmp_path / "b", **common)
    first, _ = run(tiny, cfg, callbacks=[StopAfterStep(5)])
    assert first.metrics["train_steps"] == 5
    assert checkpoints.latest_checkpoint(cfg.run_dir).name == "checkpoint-4"
    resumed, _ = run(tiny, dataclasses.replace(cfg, resume=True), seed=123)  # other LoRA init
    assert resumed.metrics["train_steps"] == 8 and resumed.metrics["resumed_from_step"] == 4

    a = adapter_weights(straight.adapter_dir)
    b = adapter_weights(resumed.adapter_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert resumed.metrics["train_loss_final"] == pytest.approx(
        straight.metrics["train_loss_final"], rel=1e-5)
    assert resumed.metrics["eval_loss_after"] == pytest.approx(
        straight.metrics["eval_loss_after"], rel=1e-5)
    # the schedule is the 8-step one in both: same learning rate at each resumed step
    lr_a = {e["step"]: e["learning_rate"] for e in straight.history}
    assert all(e["learning_rate"] == pytest.approx(lr_a[e["step"]]) for e in resumed.history)
    assert resumed.metrics["train_tokens_seen"] == straight.metrics["train_tokens_seen"]
    if optimizer == "paged_adamw_8bit":  # the 8-bit states were really used and restored
        state = torch.load(checkpoints.latest_checkpoint(cfg.run_dir) / "optimizer.pt", weights_only=True)
        quant = state["state"][0]["__bnb_optimizer_quant_state__"]
        assert quant["state1"].dtype == torch.uint8


def test_resume_with_more_steps_trains_at_the_new_schedule(tmp_path, tiny):
    """A finished 4-step run resumed with MAX_STEPS 8: every resumed step runs at the 8-step
    schedule's learning rate - the first one too, although the optimizer state saved at the end
    of the 4-step schedule carries its final rate - and the adapter moves on."""
    cfg = config(tmp_path / "r", max_steps=4, save_steps=4, warmup_steps=1)
    first, _ = run(tiny, cfg)
    before = {k: v.clone() for k, v in adapter_weights(first.adapter_dir).items()}
    more, _ = run(tiny, dataclasses.replace(cfg, resume=True, max_steps=8))
    assert more.metrics["resumed_from_step"] == 4 and more.metrics["train_steps"] == 8
    assert any("MAX_STEPS changed from 4 to 8" in n for n in more.notes)
    straight, _ = run(tiny, config(tmp_path / "s", max_steps=8, save_steps=4, warmup_steps=1))
    rates = {e["step"]: e["learning_rate"] for e in straight.history}
    resumed = {e["step"]: e["learning_rate"] for e in more.history}
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[k] == pytest.approx(rates[k]) and resumed[k] > 0 for k in resumed)
    after = adapter_weights(more.adapter_dir)
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, tiny):
    cfg = config(tmp_path, max_steps=4, save_steps=2)
    run(tiny, cfg, callbacks=[StopAfterStep(2)])
    for change, field in [({"lora_r": 4, "lora_alpha": 8}, "lora.r"),
                          ({"max_length": 16}, "max_length"),
                          ({"learning_rate": 1e-3}, "learning_rate")]:
        other = dataclasses.replace(cfg, resume=True, **change)
        with pytest.raises(checkpoints.ResumeError) as err:
            run(tiny, other)
        assert field in str(err.value) and "checkpoint-2" in str(err.value)
    # other data
    with pytest.raises(checkpoints.ResumeError, match="data.fingerprint"):
        run(tiny, dataclasses.replace(cfg, resume=True), train_texts=TEXTS[::-1])
    # a checkpoint without a signature is not trusted either
    (tmp_path / "run" / "checkpoints" / "checkpoint-2" / checkpoints.SIGNATURE).unlink()
    (tmp_path / "run" / "checkpoints" / checkpoints.SIGNATURE).unlink()
    with pytest.raises(checkpoints.ResumeError, match="no run_signature.json"):
        run(tiny, dataclasses.replace(cfg, resume=True))


def test_signature_differences_lists_fields():
    a = {"model": {"model": "x", "layers": 2}, "lora": {"r": 8}, "optimizer": "adamw_torch",
         "max_steps": 10}
    b = {"model": {"model": "y", "layers": 2}, "lora": {"r": 8}, "optimizer": "adamw_torch",
         "max_steps": 20}
    assert checkpoints.signature_differences(a, b) == ["model.model: checkpoint 'x', now 'y'"]


# --------------------------------------------------------------------------- the guard


def test_nan_guard_stops_and_explains(tmp_path, tiny):
    cfg = config(tmp_path, learning_rate=1e30, max_steps=6, save_steps=1, warmup_steps=0,
                 lr_schedule="constant", max_grad_norm=0.0)
    with pytest.raises(callbacks.TrainingStopped) as err:
        run(tiny, cfg)
    stop = err.value
    assert stop.kind == "nan" and 1 <= stop.step < 6
    text = str(stop)
    assert "Training stopped at step" in text and "LEARNING_RATE = 1e+30" in text
    assert "use 2e-4" in text
    # no checkpoint was written at the broken step, and the curve shows what happened
    last = checkpoints.latest_checkpoint(cfg.run_dir)
    assert last is None or int(last.name.split("-")[1]) < stop.step
    assert (tmp_path / "run" / "loss_curve.png").is_file()


def test_nan_guard_names_fp16_and_empty_batches():
    args = types.SimpleNamespace(fp16=True, learning_rate=2e-4, max_grad_norm=1.0)
    text = callbacks.explain_nan(args, 3, float("nan"), 0.0, {"step": 2, "loss": 2.5}, 0)
    assert "no label tokens" in text and "fp16 overflow" in text and "bfloat16" in text
    assert "last finite loss was 2.5 at step 2" in text


class ZeroLoss(TrainerCallback):
    """Multiplies the model's loss by 0 from step ``at`` on (a forward hook)."""

    def __init__(self, model, at):
        self.at, self.handle = at, None
        self.model = model

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.at and self.handle is None:
            def hook(module, inputs, output):
                output.loss = output.loss * 0.0
                return output
            self.handle = self.model.register_forward_hook(hook)


def test_zero_loss_guard_stops_and_explains(tmp_path, tiny):
    # the model's own loss, which ZeroLoss's forward hook zeroes
    cfg = config(tmp_path, max_steps=6, save_steps=0, chunked_loss=False)
    tokenizer = tokenizer_of(tiny)
    model = peft_model(tiny, cfg)
    with pytest.raises(callbacks.TrainingStopped) as err:
        T.train(cfg, model, tokenizer, rows(tokenizer, TEXTS), None, collator_for(tokenizer),
                callbacks=[ZeroLoss(model, at=3)], live=False)
    assert err.value.kind == "zero" and err.value.step == 3
    assert "exactly 0" in str(err.value) and "label tokens" in str(err.value)


def test_a_train_set_without_label_tokens_is_refused(tmp_path, tiny):
    cfg = config(tmp_path)
    tokenizer = tokenizer_of(tiny)
    ds = rows(tokenizer, TEXTS)
    masked = ds.map(lambda r: {"labels": [-100] * len(r["labels"])})
    with pytest.raises(ValueError, match="no label tokens"):
        T.train(cfg, peft_model(tiny, cfg), tokenizer, masked, None, collator_for(tokenizer),
                live=False)


# --------------------------------------------------------------------------- the figure


def test_loss_curve_figure(tmp_path):
    from helpers import plots

    history = [{"step": i, "loss": 3.0 / i, "learning_rate": 1e-4, "grad_norm": 0.5}
               for i in range(1, 21)]
    history.append({"step": 21, "loss": float("nan"), "learning_rate": 1e-4})
    fig = plots.loss_curve(history, eval_points=[(0, 3.2, "eval before")])
    assert len(fig.axes) == 3  # loss; learning rate with gradient norm on a twin axis
    path = plots.save(fig, tmp_path / "curve.png")
    assert path.stat().st_size > 1000
    json.dumps(history, default=str)


def test_live_curve_redraws_one_display(tmp_path, monkeypatch):
    shown = []

    class Handle:
        def update(self, obj):
            shown.append(("update", obj))

    def display(obj, display_id=False):
        shown.append(("display", obj))
        return Handle()

    monkeypatch.setattr(callbacks, "display", display)
    curve = callbacks.LossCurveCallback(tmp_path / "loss_curve.png", live=True, min_interval=0.0)
    args = types.SimpleNamespace(should_save=True)
    for step in range(1, 4):
        state = types.SimpleNamespace(global_step=step)
        curve.on_log(args, state, None, logs={"loss": 2.0 / step, "learning_rate": 1e-4,
                                              "grad_norm": 0.3})
    curve.on_log(args, state, None, logs={"train_runtime": 1.0})  # the summary: not a step
    curve.on_train_end(args, state, None)
    assert [kind for kind, _ in shown] == ["display", "update", "update", "update"]
    assert len(curve.history) == 3 and (tmp_path / "loss_curve.png").is_file()


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_training_again_without_resume_keeps_every_earlier_file(tmp_path, tiny):
    """A second training into a RUN_DIR with an earlier run's checkpoints and adapter, without
    RESUME: refused with the choices, every earlier file as it was; with START_OVER the earlier
    files move to previous-<time>/, byte for byte, and the new run's checkpoints are its own."""
    cfg = config(tmp_path, max_steps=4, save_steps=2)
    run(tiny, cfg, callbacks=[StopAfterStep(4)])
    run_dir = tmp_path / "run"
    before = _files(run_dir)
    assert "adapter/adapter_model.safetensors" in before
    with pytest.raises(checkpoints.ResumeError) as err:
        run(tiny, dataclasses.replace(cfg, max_steps=2, save_steps=1))
    text = str(err.value)
    assert "checkpoint-2, checkpoint-4" in text and "an adapter" in text
    assert "RESUME = True" in text and "another RUN_DIR" in text and "START_OVER = True" in text
    assert _files(run_dir) == before  # nothing deleted, nothing changed

    again, _ = run(tiny, dataclasses.replace(cfg, max_steps=2, save_steps=1, start_over=True))
    moved = [n for n in again.notes if n.startswith("START_OVER")]
    assert len(moved) == 1 and "checkpoints/" in moved[0] and "adapter/" in moved[0]
    previous = list(run_dir.glob("previous-*"))
    assert len(previous) == 1
    kept = _files(previous[0])
    assert all(kept[k] == v for k, v in before.items()
               if k.split("/")[0] in ("checkpoints", "adapter", "loss_curve.png"))
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    assert names == ["checkpoint-1", "checkpoint-2"]


def test_a_resumed_run_names_the_step_of_its_first_loss(tmp_path, tiny):
    cfg = config(tmp_path, max_steps=4, save_steps=2)
    run(tiny, cfg, callbacks=[StopAfterStep(2)])
    resumed, _ = run(tiny, dataclasses.replace(cfg, resume=True))
    assert resumed.metrics["train_loss_first_step"] == 3
    assert "(step 3) ->" in resumed.summary() and "first step)" not in resumed.summary()


def test_guard_lets_the_fp16_scaler_find_its_scale():
    """Under fp16 the scaler skips steps whose gradients overflow: a few are normal."""
    from transformers import TrainerControl

    def feed(fp16, grads):
        guard, control = callbacks.TrainingGuard(fp16_patience=3), TrainerControl()
        args = types.SimpleNamespace(fp16=fp16, learning_rate=2e-4, max_grad_norm=1.0)
        for step, grad in enumerate(grads, start=1):
            guard.on_log(args, types.SimpleNamespace(global_step=step), control,
                         logs={"loss": 5.0, "grad_norm": grad})
            if control.should_training_stop:
                return step, guard.problem
        return None, None

    inf = float("inf")
    assert feed(True, [inf, inf, 1.0, inf, inf, 0.9]) == (None, None)
    step, problem = feed(True, [inf, inf, inf, 1.0])
    assert step == 3 and "fp16 overflow" in problem
    step, problem = feed(False, [1.0, float("nan")])  # no scaler: stop at once
    assert step == 2 and "gradient norm nan" in problem


def test_unprobed_micro_batch_keeps_headroom(tmp_path, monkeypatch):
    """Under FSDP no probe confirms the choice before training, so the automatic micro-batch keeps
    15% of the budget for the estimator's error."""
    from helpers import env as E

    monkeypatch.setattr(E, "fsdp_active", lambda: True)
    monkeypatch.setattr(T.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(budget, "_enforce_budget", lambda budget, notes: None)
    cfg = config(tmp_path, memory_budget_gb=24.0, max_length=512, micro_batch=0)
    per_row = 1.4e9  # a fake estimate: 1.4 GB per row of 512 tokens
    model = T.torch.nn.Linear(2, 2)
    micro, notes = budget.choose_micro_batch(cfg, model, estimate_fn=lambda mb, seq: mb * per_row)
    assert micro == 8, notes  # 16 rows (22.4 GB) would fit 24 GB, but not 85% of it
    assert any("headroom" in n for n in notes)


def test_a_moved_run_directory_trains_from_its_local_model_and_data(tmp_path, tiny, monkeypatch,
                                                                   capsys):
    """The manifest records a local MODEL and DATASET relative to RUN_DIR, no path of this
    machine; ``python -m helpers.train RUN_DIR`` finds them after the folder holding the run,
    the model and the data was moved, from another current directory; the adapter names its
    base by the folder's name, and that base's check accepts it. A run directory moved without
    its data is refused, saying where the data was looked for."""
    import shutil

    from helpers import adapters, manifest
    from helpers.config import make_config

    project = tmp_path / "project"
    shutil.copytree(tiny, project / "models" / "tiny")
    (project / "data").mkdir()
    (project / "data" / "lines.jsonl").write_text(
        "".join(json.dumps({"line": t}) + "\n" for t in TEXTS))
    monkeypatch.chdir(project)
    cfg = make_config(RUN_DIR="runs/a", MODEL="models/tiny", DATASET="data/lines.jsonl",
                      DATA_FORMAT="text", TEXT_COLUMN="line", PACKING=False, MAX_LENGTH=32,
                      MICRO_BATCH=4, MAX_STEPS=2, WARMUP_STEPS=0, SAVE_STEPS=0,
                      EVAL_FRACTION=0.25, OPTIMIZER="adamw_torch", LORA_R=4)
    manifest.record_parameters(cfg.run_dir, cfg.as_parameters())  # as notebook 05 records them
    recorded = manifest.load(cfg.run_dir)["parameters"]
    assert (recorded["RUN_DIR"], recorded["MODEL"], recorded["DATASET"]) == (
        ".", "../../models/tiny", "../../data/lines.jsonl")
    assert str(tmp_path) not in manifest.path(cfg.run_dir).read_text()

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(project, moved)
    monkeypatch.chdir(tmp_path / "elsewhere")
    run_dir = moved / "runs" / "a"
    assert T.main([str(run_dir)]) == 0, capsys.readouterr().err
    assert manifest.load(run_dir)["train"]["status"] == "ok"
    adapter = run_dir / "adapter"
    settings = json.loads((adapter / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == "tiny"
    for file in [run_dir / "manifest.json", run_dir / "dataset_stats.json",
                 *(p for p in adapter.iterdir() if p.suffix != ".safetensors")]:
        assert str(tmp_path) not in file.read_text(), file.name
    base = AutoModelForCausalLM.from_pretrained(moved / "models" / "tiny")
    assert adapters.check_adapter(base, adapter)["base_model_name_or_path"] == "tiny"

    alone = tmp_path / "alone"
    shutil.move(run_dir, alone)
    assert T.main([str(alone)]) == 2
    said = capsys.readouterr().err
    assert "MODEL='../../models/tiny'" in said and "does not exist" in said
    assert str((tmp_path.parent / "models" / "tiny").resolve()) in said  # where it looked
