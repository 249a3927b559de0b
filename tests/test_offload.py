"""helpers.offload: checkpointed activations in CPU memory give the same loss, gradients and
adapter as without; the estimator moves them to the host; ACTIVATION_OFFLOAD 'auto' decides by
the budget."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from helpers import budget, estimator, losses, offload, shapes
from helpers.config import Config, ConfigError, make_config
from test_losses import BUILDERS, batch, trainable, with_lora

torch.set_num_threads(1)


def step(model, inputs, labels):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, labels=labels, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in trainable(model)]


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("chunked", [False, True])
def test_offloaded_step_equals_the_plain_one(family, chunked, monkeypatch):
    """Loss and every LoRA gradient with the saved tensors copied out and back equal those of the
    plain step (float32 on CPU), with the model's own loss and the chunked one (chunks of 5)."""
    monkeypatch.setattr(losses, "chunk_tokens", lambda vocab: 5)
    model = with_lora(BUILDERS[family]())
    if chunked:
        assert "chunked loss" in losses.use_chunked_loss(model)
    inputs, labels = batch(model)
    loss0, grads0 = step(model, inputs, labels)
    stats = offload.install(model)
    assert offload.install(model) is stats and model.uses_activation_offload
    loss1, grads1 = step(model, inputs, labels)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=0)
    for a, b in zip(grads0, grads1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)
    layers = model.config.num_hidden_layers
    assert stats.tensors >= layers + 1  # every block's input, and what the loss saves
    assert stats.peak > 0 and stats.held == 0  # all of it let go after the backward
    stats.reset()
    with torch.no_grad():
        model(**inputs, labels=labels)
    model.eval()
    step(model, inputs, labels)  # eval mode: the model's own forward, nothing copied
    assert stats.tensors == 0


@pytest.mark.parametrize("family", ["tiny-neox (4-bit)", "llama"])
def test_host_bytes_match_the_estimate(family):
    """What the hooks hold on the host at the end of the forward against the estimator's
    ``host_bytes`` (block inputs, the final norm's input, log-softmax's output, the labels)."""
    model = with_lora(BUILDERS[family]())
    inputs, labels = batch(model)
    stats = offload.install(model)
    step(model, inputs, labels)
    rows, seq = inputs["input_ids"].shape
    est = estimator.estimate(shapes.shape_from_config(model.config), seq_len=seq,
                             micro_batch=rows, compute_dtype=torch.float32, cuda_context=False,
                             lora_r=4, lora_dropout=0.0, chunked_loss=False,
                             activation_offload=True)
    assert stats.peak == pytest.approx(est.host_bytes, rel=0.01)
    assert est.activation_detail["block_inputs"] == model.config.num_hidden_layers * rows * seq * 64 * 4


def test_estimator_moves_the_block_inputs_to_the_host():
    shape = shapes.as_shape("llama-3.1-8b")
    common = dict(seq_len=16384, micro_batch=1, lora_r=16, compute_dtype=torch.bfloat16)
    plain = estimator.estimate(shape, **common)
    moved = estimator.estimate(shape, activation_offload=True, **common)
    block = 16384 * shape.hidden * 2
    acts = [e.breakdown()["activations"] for e in (plain, moved)]
    assert acts[0] - acts[1] == (shape.layers - estimator.OFFLOAD_IN_FLIGHT) * block
    assert plain.host_bytes == 0 and moved.host_bytes >= shape.layers * block
    assert moved.total_device < plain.total_device
    assert "host memory (offloaded activations)" in moved.text()
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        estimator.estimate(shape, gradient_checkpointing=False, activation_offload=True,
                           **common)
    fit = budget.largest_fit(shape, 16e9, seq_len=512, lora_r=16)
    assert fit["seq_len_offload"] > fit["seq_len"] > 0
    assert fit["micro_batch_offload"] >= fit["micro_batch"]


def config(**changes) -> Config:
    return dataclasses.replace(Config(), model="llama-3.1-8b", run_dir="", **changes)


def test_auto_turns_offload_on_only_when_the_budget_needs_it():
    shape = shapes.as_shape("llama-3.1-8b")
    settings = budget.config_settings(config())
    need = {on: estimator.estimate(shape, seq_len=32768, micro_batch=1, **{
        **settings, "activation_offload": on}).total_device for on in (False, True)}
    between = (need[False] + need[True]) / 2 / 1e9
    tight = config(max_length=32768, memory_budget_gb=between)
    est = budget.estimate_for_config(tight, shape)
    assert est.settings["activation_offload"] and "'auto': on" in est.notes[0]
    assert budget.fits(est, between * 1e9)
    roomy = config(max_length=32768, memory_budget_gb=need[False] / 1e9 + 1)
    assert not budget.estimate_for_config(roomy, shape).settings["activation_offload"]
    off = config(max_length=32768, memory_budget_gb=between, activation_offload="off",
                 tiled_mlp="off")  # (tiling alone would make it fit: tests/test_tiling.py)
    refused = budget.estimate_for_config(off, shape)
    assert not refused.settings["activation_offload"]
    assert "ACTIVATION_OFFLOAD = 'on' (or 'auto') would fit" in budget.verdict_text(
        refused, between * 1e9)
    assert budget.choose_offload(config(memory_budget_gb=between), None)[0] is False
    assert "longest sequence" in budget.longest_text(config(memory_budget_gb=16.0), shape)


def test_the_parameter():
    assert make_config(ACTIVATION_OFFLOAD=True).activation_offload == "on"
    assert make_config(ACTIVATION_OFFLOAD="false").activation_offload == "off"
    assert Config().activation_offload == "auto"
    with pytest.raises(ConfigError, match="GRADIENT_CHECKPOINTING"):
        make_config(ACTIVATION_OFFLOAD="on", GRADIENT_CHECKPOINTING=False)
    with pytest.raises(ConfigError, match="not one of"):
        make_config(ACTIVATION_OFFLOAD="sometimes")


def test_training_with_offload_ends_with_the_same_adapter(tmp_path):
    """notebook 05's path (helpers.train.train) with ACTIVATION_OFFLOAD on and off."""
    from test_train import TEXTS, adapter_weights, build_tiny, config as train_config, run

    tiny = build_tiny(tmp_path / "tiny")
    results = {}
    for mode in ("off", "on"):
        cfg = train_config(tmp_path / mode, max_steps=3, save_steps=0, activation_offload=mode)
        result, model = run(tiny, cfg, train_texts=TEXTS)
        assert getattr(model, "uses_activation_offload", False) == (mode == "on")
        assert any(f"ACTIVATION_OFFLOAD = '{mode}'" in n for n in result.notes)
        results[mode] = result
    for a, b in zip(results["off"].history, results["on"].history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    wa, wb = (adapter_weights(results[m].adapter_dir) for m in ("off", "on"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_offload_lowers_the_measured_peak_as_predicted():
    """A GPT-J-6B rehearsal at its 2,048 positions: the probe step's max_memory_allocated with and
    without offload, each against the estimator, and the saving against the predicted one."""
    from helpers import env, loading, lora

    cfg = dataclasses.replace(Config(), model="rehearsal:gpt-j-6b", max_length=2048,
                              lora_dropout=0.0, run_dir="")
    model = loading.load_model(cfg.model, compute_dtype=cfg.compute_dtype)
    lora.prepare_for_training(model, True, False)
    model = lora.attach(model, cfg)
    losses.use_chunked_loss(model)
    dtype = env.compute_dtype(cfg.compute_dtype)
    measured, predicted = {}, {}
    for on in (False, True):
        if on:
            offload.install(model)
        measured[on] = budget.probe_step(model, 1, cfg.max_length, dtype)
        predicted[on] = budget.model_estimate(cfg, model, 1, cfg.max_length).total_allocated
        # the probe has no optimizer state: compare with what the estimate holds besides it
        predicted[on] -= budget.model_estimate(cfg, model, 1, 8).breakdown()["optimizer"]
    for on in (False, True):
        assert measured[on] == pytest.approx(predicted[on], rel=0.10), (on, measured, predicted)
    # the saving: the block inputs but those in flight, as predicted; measured on an H200 at
    # 2,048 tokens: 309 MB of 436 MB predicted (what holds the rest at the peak is not yet known)
    saved, expected = measured[False] - measured[True], predicted[False] - predicted[True]
    assert 0.5 * expected <= saved <= 1.1 * expected, (saved, expected)


def test_training_with_offload_and_lora_dropout_is_reproducible(tmp_path):
    """notebook 05's path with ACTIVATION_OFFLOAD on and LoRA dropout: the lean dropout is
    installed (and said), training runs, and the same seed gives the same losses and adapter
    (the masks come from seeds drawn from the seeded generator)."""
    from test_train import TEXTS, adapter_weights, build_tiny, config as train_config, run

    tiny = build_tiny(tmp_path / "tiny")
    results = []
    for attempt in ("a", "b"):
        cfg = train_config(tmp_path / attempt, max_steps=3, save_steps=0, lora_dropout=0.1,
                           activation_offload="on")
        result, model = run(tiny, cfg, train_texts=TEXTS)
        assert model.uses_activation_offload and model.uses_lean_dropout
        assert any("lean LoRA dropout on" in n for n in result.notes), result.notes
        assert all(math.isfinite(h["loss"]) for h in result.history)
        results.append(result)
    assert [h["loss"] for h in results[0].history] == [h["loss"] for h in results[1].history]
    wa, wb = (adapter_weights(r.adapter_dir) for r in results)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_host_must_hold_the_offloaded_activations(tmp_path, monkeypatch):
    """ACTIVATION_OFFLOAD on a host that cannot hold the activations: 'on' is refused before
    anything is installed, naming the MAX_LENGTH that fits; 'auto' stays off and says why; an
    automatic micro-batch is halved until the host holds its activations."""
    from test_train import build_tiny, config as train_config, peft_model

    tiny = build_tiny(tmp_path / "tiny")
    cfg = train_config(tmp_path, max_length=1024, activation_offload="on")
    model = peft_model(tiny, cfg)
    at = {n: budget.offload_host_need(cfg, model, 1, n) for n in (512, 1024)}
    assert 0 < at[512] < at[1024]
    room = (at[512] + at[1024]) // 2
    monkeypatch.setattr(budget, "host_room", lambda _cfg: room)
    with pytest.raises(budget.BudgetError, match="in host memory") as refused:
        offload.use_activation_offload(model, cfg)
    fits = budget.host_fit_length(cfg, model, room)
    assert 512 <= fits < 1024 and f"MAX_LENGTH = {fits}" in str(refused.value)
    assert budget.offload_host_need(cfg, model, 1, fits) <= room
    assert budget.offload_host_need(cfg, model, 1, fits + 128) > room
    assert not getattr(model, "uses_activation_offload", False)

    monkeypatch.setattr(budget, "choose_offload", lambda c, n: (True, "'auto': on"))
    auto = dataclasses.replace(cfg, activation_offload="auto")
    said = offload.use_activation_offload(model, auto)
    assert "'auto': off, the host cannot hold it" in said
    assert not getattr(model, "uses_activation_offload", False)

    short = dataclasses.replace(cfg, max_length=128, micro_batch=0)
    offload.install(model)
    per_row = budget.offload_host_need(short, model, 1)
    monkeypatch.setattr(budget, "host_room", lambda _cfg: 2 * per_row + per_row // 2)
    notes = []
    assert budget._host_capped(short, model, 8, notes) == 2
    assert "the host holds the offloaded activations of 2 rows" in notes[0]


def test_on_a_gpu_the_host_room_keeps_what_training_adds(monkeypatch):
    """The room for the offloaded activations is the host budget less what the process holds;
    on a GPU also less the growth measured beside the pinned copies during training: a runtime
    over its RAM is killed, losing the run."""
    from helpers import env

    monkeypatch.setattr(env, "host_rss", lambda: 2_000_000_000)
    monkeypatch.setattr(env, "host_memory", lambda: {"available": 50e9, "limit": 64e9})
    cfg = config(host_memory_budget_gb=12)
    assert budget.host_room(cfg) == 10_000_000_000 or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert budget.host_room(cfg) == 10_000_000_000 - budget.TRAINING_HOST_GROWTH
    monkeypatch.setattr(env, "host_memory", lambda: {"available": 5e9, "limit": 64e9})
    assert budget.host_room(cfg) == 5_000_000_000 - budget.TRAINING_HOST_GROWTH


def test_on_a_gpu_the_host_holds_pinned_sizes():
    """torch's pinned host allocator rounds each allocation up to a power of two: the estimate
    on a GPU counts every offloaded tensor so rounded, on CPU the tensors' own sizes."""
    shape = shapes.as_shape("llama-3.1-8b")
    kw = dict(seq_len=28928, activation_offload=True)
    exact = estimator.estimate(shape, cuda_context=False, **kw).host_bytes
    pinned = estimator.estimate(shape, cuda_context=True, **kw).host_bytes
    block = 28928 * shape.hidden * 2
    assert exact >= shape.layers * block
    assert pinned >= shape.layers * 2 ** math.ceil(math.log2(block)) > exact
    assert [estimator._pinned(n) for n in (0, 1, 4096, 4097)] == [0, 1, 4096, 8192]
