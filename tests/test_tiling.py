"""helpers.tiling: the MLP run a chunk of tokens at a time gives the same loss and LoRA gradients
as untiled, with and without checkpointing and offload, LoRA dropout included; it saves what the
estimator says; TILED_MLP 'auto' decides by the budget, after ACTIVATION_OFFLOAD."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from helpers import budget, estimator, offload, shapes, tiling
from helpers.config import PARAMETERS, Config, ConfigError, make_config
from test_losses import BUILDERS, batch, trainable, with_lora

torch.set_num_threads(1)
FAMILIES = ["llama", "tiny-neox (4-bit)"]  # Llama with grouped key/value heads; GPT-NeoX 4-bit
CHUNK = 16  # tokens per chunk: 2 rows x 8 positions, so 48 positions make 6 chunks
ROWS, SEQ = 2, 48


def step(model, inputs, labels):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, labels=labels, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in trainable(model)]


def assert_same(a, b):
    (loss0, grads0), (loss1, grads1) = a, b
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=0)
    assert len(grads0) == len(grads1) > 0
    for g0, g1 in zip(grads0, grads1, strict=True):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["plain", "checkpointing", "checkpointing + offload"])
def test_tiled_step_equals_the_untiled_one(family, mode):
    """Loss and every LoRA gradient (B away from zero) at a sequence six chunks long equal the
    untiled step's (float32 on CPU); without the block checkpoint, under it (non-reentrant, so
    the chunks' checkpoints nest in it), and with the activations offloaded too."""
    model = with_lora(BUILDERS[family]())
    if mode == "plain":
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if "offload" in mode:
        offload.install(model)
    inputs, labels = batch(model, rows=ROWS, seq=SEQ)
    untiled = step(model, inputs, labels)
    stats = tiling.install(model, CHUNK)
    assert tiling.install(model, 4 * CHUNK) is stats and model.uses_tiled_mlp  # twice: no change
    assert stats.mlps == model.config.num_hidden_layers == len(tiling.decoder_mlps(model))
    tiled = step(model, inputs, labels)
    assert_same(untiled, tiled)
    chunks = SEQ // (CHUNK // ROWS)
    # each MLP tiled in the forward (and again in the block's recomputation), its chunks run
    # again in the backward
    assert stats.calls >= stats.mlps and stats.chunk_runs >= 2 * chunks * stats.mlps
    calls = stats.calls
    tiling.remove(model)
    assert not getattr(model, "uses_tiled_mlp", False)
    assert_same(untiled, step(model, inputs, labels))
    assert stats.calls == calls  # removed: nothing tiled any more


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_dropout_draws_the_same_masks_when_a_chunk_is_recomputed(family, monkeypatch):
    """With LoRA dropout 0.1 a tiled step draws its masks chunk by chunk, so it is compared with
    the same chunks run without their checkpoints (nothing recomputed): equal loss and gradients
    mean each recomputation replayed its forward's random numbers. Recomputing with fresh random
    numbers (``preserve_rng_state=False``) gives other gradients: the comparison can fail."""
    model = with_lora(BUILDERS[family](), dropout=0.1)
    inputs, labels = batch(model, rows=ROWS, seq=SEQ)
    tiling.install(model, CHUNK)

    def seeded(seed=0):
        torch.manual_seed(seed)
        return step(model, inputs, labels)

    recomputed = seeded()
    monkeypatch.setattr(tiling, "checkpoint", lambda fn, part, use_reentrant: fn(part))
    kept = seeded()
    assert_same(kept, recomputed)
    monkeypatch.setattr(tiling, "checkpoint", functools.partial(checkpoint,
                                                                preserve_rng_state=False))
    fresh = seeded()
    torch.testing.assert_close(fresh[0], kept[0], rtol=1e-5, atol=0)  # the same forward
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(kept[1], fresh[1]))


@pytest.mark.parametrize("family", FAMILIES)
def test_no_grad_forwards_are_tiled_and_evaluation_with_grad_is_not(family):
    """Without gradients (the held-out loss, a long prompt) the chunks run one after another and
    the logits equal the untiled ones (float32 on CPU, summation order aside); in evaluation
    mode with gradients, and for inputs of one chunk, the MLP's own forward runs."""
    model = with_lora(BUILDERS[family]())
    inputs, labels = batch(model, rows=ROWS, seq=SEQ)
    model.eval()
    with torch.no_grad():
        before = model(**inputs, labels=labels).logits
    stats = tiling.install(model, CHUNK)
    for mode in ("eval", "train"):
        model.train(mode == "train")
        runs = stats.chunk_runs
        with torch.no_grad():
            after = model(**inputs, labels=labels).logits
        if mode == "eval":
            torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
        # every MLP split into SEQ / (CHUNK / ROWS) chunks, each run once (nothing recomputed)
        assert stats.chunk_runs - runs == stats.mlps * SEQ // (CHUNK // ROWS)
    calls = stats.calls
    model.eval()
    model(**inputs, labels=labels).loss.backward()
    assert stats.calls == calls
    model.train()
    short = {k: v[:, :CHUNK // ROWS] for k, v in inputs.items()}  # one chunk long: not split
    model(**short, labels=labels[:, :CHUNK // ROWS]).loss.backward()
    with torch.no_grad():
        model(**short)
    assert stats.calls == calls


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of the distinct storages that autograd saves for backward (parameters left out)."""

    def __init__(self):
        self.seen, self.bytes = set(), 0

        def pack(t):
            storage = t.untyped_storage()
            if not offload._is_parameter(t) and storage.data_ptr() not in self.seen:
                self.seen.add(storage.data_ptr())
                self.bytes += storage.nbytes()
            return t

        super().__init__(pack, lambda t: t)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiling_saves_the_mlp_intermediates_the_estimator_predicts(family):
    """Checkpointing off, what a forward saves with and without tiling: tiled, every MLP keeps
    nothing for the backward but its input (which torch's checkpoint saves for the chunks, and
    the untiled LoRA layers save too), so the difference is, per token and block, the
    estimator's MLP intermediates: the activation's and the product's inputs and LoRA's saves
    inside the MLP, gradients excluded. Both are byte counts of the same tensors, and they agree
    exactly on these models; the 1% leaves room for a version of transformers that keeps one
    more per-token statistic, while a missing or extra MLP-wide tensor (a quarter of the
    difference or more) fails."""
    model = with_lora(BUILDERS[family]())
    model.gradient_checkpointing_disable()
    inputs, labels = batch(model, rows=ROWS, seq=SEQ)
    saved = {}
    for tiled in (False, True):
        if tiled:
            tiling.install(model, CHUNK)
        hooks = SavedBytes()
        with hooks:
            out = model(**inputs, labels=labels, use_cache=False)
        out.loss.backward()
        saved[tiled] = hooks.bytes
    shape = shapes.shape_from_config(model.config)
    est = estimator.estimate(shape, seq_len=SEQ, micro_batch=ROWS, compute_dtype=torch.float32,
                             cuda_context=False, lora_r=4, lora_dropout=0.0, chunked_loss=False)
    per_token = est.activation_detail["mlp_saved_per_token"]
    expected = shape.layers * ROWS * SEQ * per_token
    assert saved[False] - saved[True] == pytest.approx(expected, rel=0.01), (saved, expected)


def test_the_estimator_tiles_the_recomputed_block():
    shape = shapes.as_shape("llama-3.1-8b")
    T = 32768
    common = dict(seq_len=T, micro_batch=1, lora_r=16, activation_offload=True)
    whole = estimator.estimate(shape, **common)
    tiled = estimator.estimate(shape, tiled_mlp=True, **common)
    chunk = estimator.MLP_CHUNK_TOKENS
    saved = whole.activation_detail["mlp_saved_per_token"]
    assert saved >= 3 * shape.intermediate * 2  # gate, up and their product's inputs at least
    h, ff = shape.hidden, shape.intermediate
    for name in ("the end of the recompute", "the MLP's backward"):
        # the MLP-wide tensors of every token past the first chunk go, one stream-wide tensor
        # (the chunks' gradients for the MLP's input, gathered) comes
        # MLP-wide beside the saves: at the end of the recompute none (the product the output
        # projection reads is what its LoRA keeps, with the lean dropout that comes with the
        # offload), in the MLP's backward two gradients
        extra = 0 if "end" in name else 2 * ff * 2
        cut = (T - chunk) * (saved + extra) - T * h * 2
        assert (whole.activation_detail["block_moments"][name]
                - tiled.activation_detail["block_moments"][name]) == cut
    blocks = [e.breakdown()["block_recompute"] for e in (whole, tiled)]
    assert blocks == [max(e.activation_detail["block_moments"].values()) for e in (whole, tiled)]
    # tiled, the second norm's backward (attention side, float32 temporaries) is the highest
    assert max(tiled.activation_detail["block_moments"],
               key=tiled.activation_detail["block_moments"].get) == "the second norm's backward"
    assert whole.total_allocated - tiled.total_allocated == blocks[0] - blocks[1]  # block peak
    assert any("tiled MLP" in n for n in tiled.notes) and "tiled MLP" in tiled.text()
    short = dict(common, seq_len=chunk)  # one chunk: nothing changes
    assert (estimator.estimate(shape, tiled_mlp=True, **short).total_allocated
            == estimator.estimate(shape, **short).total_allocated)
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        estimator.estimate(shape, seq_len=T, gradient_checkpointing=False, tiled_mlp=True)
    fit = budget.largest_fit(shape, 16e9, seq_len=512, lora_r=16)
    assert fit["seq_len_tiled"] > fit["seq_len_offload"] > fit["seq_len"] > 0
    assert fit["micro_batch_tiled"] >= fit["micro_batch_offload"]


def config(**changes) -> Config:
    return dataclasses.replace(Config(), model="llama-3.1-8b", run_dir="", **changes)


def test_auto_turns_tiling_on_only_when_the_budget_needs_it():
    """At 32,768 tokens, a budget between the need with offload alone and with offload and
    tiling: 'auto' turns both on; with room for offload alone, tiling stays off; 'off' is
    refused with the way out."""
    shape = shapes.as_shape("llama-3.1-8b")
    settings = {**budget.config_settings(config()), "activation_offload": True}
    need = {on: estimator.estimate(shape, seq_len=32768, micro_batch=1, **{
        **settings, "tiled_mlp": on}).total_device for on in (False, True)}
    between = (need[False] + need[True]) / 2 / 1e9
    tight = config(max_length=32768, memory_budget_gb=between)
    est = budget.estimate_for_config(tight, shape)
    assert est.settings["activation_offload"] and est.settings["tiled_mlp"]
    assert "TILED_MLP" in est.notes[0] and "TILED_MLP = 'auto': on" in est.notes[1]
    assert budget.fits(est, between * 1e9)
    roomy = budget.estimate_for_config(config(max_length=32768,
                                              memory_budget_gb=need[False] / 1e9 + 0.5), shape)
    assert roomy.settings["activation_offload"] and not roomy.settings["tiled_mlp"]
    assert "TILED_MLP = 'auto': off, not needed" in roomy.notes[1]
    off = config(max_length=32768, memory_budget_gb=between, tiled_mlp="off")
    refused = budget.estimate_for_config(off, shape)
    assert not refused.settings["tiled_mlp"] and not refused.settings["activation_offload"]
    assert "would not fit even with it" in refused.notes[0]  # offload alone is not enough
    assert not budget.fits(refused, between * 1e9)
    assert "TILED_MLP = 'on' (or 'auto') would fit" in budget.verdict_text(refused,
                                                                          between * 1e9)

    def on_gpu(micro_batch, seq_len):
        return estimator.estimate(shape, seq_len=seq_len, micro_batch=micro_batch, **{
            **settings, "activation_offload": False}).total_device

    msg = budget._refusal(off, int(between * 1e9), on_gpu, on_gpu(1, 32768), need[False],
                          need[True])
    assert "TILED_MLP = 'on' or 'auto' would fit" in msg and "ACTIVATION_OFFLOAD" in msg
    assert budget.choose_tiling(config(memory_budget_gb=between), None)[0] is False
    assert "with TILED_MLP as well" in budget.longest_text(config(memory_budget_gb=16.0), shape)


def test_the_parameter():
    """TILED_MLP: auto by default, booleans read as on / off, 'on' only with checkpointing."""
    read = {value: make_config(TILED_MLP=value).tiled_mlp
            for value in (True, False, "yes", "0", "on", "auto")}
    assert read == {True: "on", False: "off", "yes": "on", "0": "off", "on": "on", "auto": "auto"}
    assert Config().tiled_mlp == "auto" and "TILED_MLP" in PARAMETERS
    assert make_config(TILED_MLP="auto", GRADIENT_CHECKPOINTING=False).tiled_mlp == "auto"
    for bad, says in (({"TILED_MLP": "on", "GRADIENT_CHECKPOINTING": False},
                       "needs GRADIENT_CHECKPOINTING"), ({"TILED_MLP": "half"}, "not one of")):
        with pytest.raises(ConfigError, match=says):
            make_config(**bad)


def test_use_tiled_mlp_says_what_it_did():
    model = with_lora(BUILDERS["llama"]())
    said = tiling.use_tiled_mlp(model, config(tiled_mlp="off"))
    assert said == "TILED_MLP = 'off': each MLP runs whole"
    assert tiling.use_tiled_mlp(model, config()).startswith("TILED_MLP = 'auto': off")
    assert not getattr(model, "uses_tiled_mlp", False)
    said = tiling.use_tiled_mlp(model, config(tiled_mlp="on"))
    assert said.startswith("TILED_MLP = 'on'") and "2 MLPs run 4,096 tokens" in said
    assert model.uses_tiled_mlp
    with pytest.raises(ValueError, match="TILED_MLP = 'off'"):
        tiling.install(torch.nn.Linear(2, 2))


@pytest.mark.gpu
def test_tiling_lowers_the_measured_peak_as_predicted():
    """A Llama-3.1-8B rehearsal at 16,384 tokens with the activations offloaded: the probe step's
    max_memory_allocated with the MLP whole and tiled, each within 10% of the estimator's."""
    from helpers import env, loading, lora, losses

    cfg = dataclasses.replace(Config(), model="rehearsal:llama-3.1-8b", max_length=16384,
                              run_dir="")
    model = loading.load_model(cfg.model, compute_dtype=cfg.compute_dtype)
    lora.prepare_for_training(model, True, False)
    model = lora.attach(model, cfg)
    losses.use_chunked_loss(model)
    offload.install(model)

    def peaks(tiled: bool) -> tuple:
        """(measured, predicted) peak allocated; the probe runs no optimizer step, so the
        prediction leaves the optimizer state out."""
        if tiled:
            tiling.install(model)
        got = budget.probe_step(model, 1, cfg.max_length, env.compute_dtype(cfg.compute_dtype))
        want = (budget.model_estimate(cfg, model, 1, cfg.max_length).total_allocated
                - budget.model_estimate(cfg, model, 1, 8).breakdown()["optimizer"])
        return got, want

    whole, tiled = peaks(False), peaks(True)
    assert tiled[0] < whole[0], (whole, tiled)
    assert whole[0] == pytest.approx(whole[1], rel=0.10), whole
    assert tiled[0] == pytest.approx(tiled[1], rel=0.10), tiled


def test_training_with_tiling_ends_with_the_same_adapter(tmp_path, monkeypatch):
    """notebook 05's path (helpers.train.train): TILED_MLP 'on' with chunks of 8 tokens (rows of
    32 tokens, micro-batch 4) trains to the adapter of 'off', and the notes say which."""
    from test_train import TEXTS, adapter_weights, build_tiny, config as train_config, run

    monkeypatch.setattr(estimator, "MLP_CHUNK_TOKENS", 8)
    tiny = build_tiny(tmp_path / "tiny")
    trained = {mode: run(tiny, train_config(tmp_path / mode, max_steps=3, save_steps=0,
                                            tiled_mlp=mode), train_texts=TEXTS)
               for mode in ("off", "on")}
    (off, _), (on, model) = trained["off"], trained["on"]
    assert model.tiled_mlp_stats.calls > 0 and model.tiled_mlp_stats.chunk_tokens == 8
    assert any(n.startswith("TILED_MLP = 'on'") for n in on.notes)
    assert [h["loss"] for h in on.history] == pytest.approx([h["loss"] for h in off.history],
                                                            rel=1e-5)
    before, after = adapter_weights(off.adapter_dir), adapter_weights(on.adapter_dir)
    assert before.keys() == after.keys()
    # tiled, each LoRA gradient is summed chunk by chunk (another float32 order), and Adam's
    # normalization lifts that rounding in the smallest gradients to about 1e-6 in three steps
    for name, weight in before.items():
        torch.testing.assert_close(after[name], weight, rtol=1e-4, atol=2e-6)
