"""GPU measurements of the series on rehearsal models (random weights of real architectures,
built directly in 4-bit), with the original recipe measured beside the series' defaults in the
same process, on the same card.

    python bench/gpu_suite.py gpt-j-6b gpt-neox-20b llama-3.1-8b [--steps 6] [--out DIR]

For each model, in order (each result is appended to ``DIR/suite.jsonl`` as soon as it exists,
so a run cut short keeps what it measured):

- ``build``: time, peak GPU memory and peak host RSS while building; the 4-bit footprint against
  the estimator's prediction.
- ``train``: LoRA (all-linear and attention), sequence 512, micro-batch 1 and 4, gradient
  checkpointing, paged_adamw_8bit, a few optimizer steps: peak ``max_memory_allocated`` against
  the estimate; trainable parameters per scope.
- ``defaults``: ``helpers.train.train`` exactly as notebook 05 runs it (micro-batch chosen from
  the estimator under MEMORY_BUDGET_GB, bf16 from the dtype decision, packing), on 512-token
  rows and on the embedded quotations packed into 512-token blocks; and the same with a
  non-paged optimizer.
- ``original``: the original recipe (peft's prepare_model_for_kbit_training with its fp32
  upcast, LoRA r=8 alpha=32 on the attention projections, batch 1 x accumulation 4,
  checkpointing, paged_adamw_8bit, the ``fp16`` flag) on the same rows and on unpacked quotes.
- ``longest``: the longest sequence at micro-batch 1 that trains under a budget, for the
  defaults (with the chunked loss of CHUNKED_LOSS) and for the original recipe (the model's own
  loss over the full logits): the estimator's answer, confirmed by a real step.
- ``longest-offload:GB`` / ``longest-tiled:GB``: the same under GB with the activations
  offloaded to CPU memory (ACTIVATION_OFFLOAD, which brings the lean RMSNorm of
  ``helpers.norms`` and the lean LoRA dropout of ``helpers.lora``), and with each MLP tiled as well (TILED_MLP); ``longest-own-norms:GB``:
  offloaded with transformers' own RMSNorm and peft's dropout, the A/B for the lean ones.
- ``merge``: the defaults' adapter merged into the 16-bit rehearsal, verified by logits.

Tokens per second count real tokens, with the first two steps left out as warm-up. Model FLOPs
utilization = 6 x parameters x tokens/s / the card's bf16 matmul rate measured at the start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import TrainerCallback  # noqa: E402

from helpers import budget as fitting, config, data, env, estimator, footprint, loading, lora, losses, shapes, train, units  # noqa: E402

OUT = Path(os.environ.get("OUT", "runs/gpu-suite"))
WORK = Path(os.environ.get("SUITE_WORK", "runs/gpu-suite-work"))  # checkpoints and adapters
ORIGINAL_TARGETS = {"gpt-neox-20b": ["query_key_value"], "gpt-j-6b": ["q_proj", "k_proj", "v_proj"],
                    "llama-3.1-8b": ["q_proj", "k_proj", "v_proj"], "tiny-neox": ["query_key_value"]}
BUDGETS = {"gpt-j-6b": 12, "gpt-neox-20b": 24, "llama-3.1-8b": 16, "tiny-neox": 1}


def emit(record: dict) -> None:
    record["time"] = time.strftime("%H:%M:%S")
    print(json.dumps(record), flush=True)
    with open(OUT / "suite.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def free() -> None:
    units.free()  # Python objects, the allocator's cache, the pinned host memory kept for reuse
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.reset_peak_memory_stats()


def matmul_rate() -> float:
    """The card's measured bf16 matmul rate (FLOP/s), 8192^3, best of 10."""
    if not torch.cuda.is_available():
        return 0.0
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 1e9
    for _ in range(10):
        torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    del a, b
    return 2 * 8192**3 / best


def random_rows(vocab: int, n: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (n, seq), generator=g).tolist()
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def quote_rows(cfg, tokenizer, packing: bool, steps: int | None = None):
    """The embedded quotations as notebook 04 prepares them (packed into 512-token blocks, or one
    per row). With ``steps``, the packed blocks repeated so that every one of ``steps`` + 1 steps
    is a full micro-batch of up to 16 rows: 72 blocks in batches of 16 leave an epoch's last
    step with 8 rows, and a half step in the timed ones lowers tokens/s (its fixed costs, the
    4-bit dequantization and the optimizer step, are a full step's), which full random rows
    never have."""
    c = dataclasses.replace(cfg, packing=packing, max_length=512, dataset="embedded",
                            eval_fraction=0.0)
    rows = data.prepare(c, tokenizer).train
    if steps is None:
        return rows
    from datasets import concatenate_datasets

    limit = fitting.AUTO_MICRO_BATCH_LIMIT
    reps = -(-limit * (steps + 1) // len(rows))
    whole = concatenate_datasets([rows] * reps)
    return whole.select(range(len(whole) // limit * limit))


def build(name: str):
    free()
    log = footprint.MemoryLog()
    with log.track("build"):
        t = time.perf_counter()
        model = loading.load_model(f"rehearsal:{name}")
        secs = time.perf_counter() - t
    rec = log.records[-1]
    shape = shapes.shape_from_config(model.config)
    est = estimator.estimate(shape, seq_len=512, micro_batch=1)
    largest = max(s.d_in * s.d_out for s in shape.linears)
    per_block = sum(s.d_in * s.d_out for s in shape.linears)
    emit({"kind": "build", "model": name, "seconds": round(secs, 1),
          "params": shape_params(shape),
          "footprint_bytes": model.get_memory_footprint(),
          "resident_bytes": footprint.footprint_totals(footprint.footprint_breakdown(model))["resident"],
          "predicted_footprint_bytes": est.footprint,
          "gpu_allocated_before_build": rec.gpu_allocated_before,
          "peak_gpu_bytes_build": rec.gpu_peak_allocated,
          "peak_gpu_bytes_build_above_before": rec.gpu_peak_allocated - rec.gpu_allocated_before,
          "one_layer_16bit_bytes": largest * 2,
          "one_block_16bit_bytes": per_block * 2,
          "peak_cpu_rss_bytes_build": rec.cpu_rss_peak, "cpu_rss_bytes_before": rec.cpu_rss_before})
    return model, shape


def timed_trainer_run(trainer):
    clock = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            clock.append((time.perf_counter(), state.num_input_tokens_seen))

    trainer.add_callback(Clock())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    (t0, n0), (t1, n1) = clock[1], clock[-1]
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    reserved = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0
    return {"tokens_per_second": round((n1 - n0) / (t1 - t0), 1),
            "step_seconds": round((t1 - t0) / (len(clock) - 2), 3),
            "peak_alloc_bytes": peak, "peak_reserved_bytes": reserved}


def measure_lora(model, shape, name, tokenizer, steps, rate):
    """Both scopes, micro-batch 1 and 4, sequence 512: peak vs estimate."""
    for scope in ("all-linear", "attention"):
        for mb in (1, 4):
            free()
            cfg = config.make_config(RUN_DIR=str(WORK / name), MODEL=f"rehearsal:{name}",
                                     LORA_TARGETS=scope, MAX_STEPS=steps, SAVE_STEPS=0,
                                     MICRO_BATCH=mb, LEARNING_RATE=2e-4, MAX_LENGTH=512)
            prep = lora.prepare_for_training(model, True, False)
            peft_model = lora.attach(model, cfg)
            rep = lora.trainable_report(peft_model)["totals"]
            rows = random_rows(shape.vocab, mb * (steps + 1), 512)
            losses.use_chunked_loss(peft_model)  # as notebook 05 trains (CHUNKED_LOSS)
            trainer = train.make_trainer(cfg, peft_model, tokenizer, rows,
                                         data.CompletionCollator(tokenizer), mb)
            try:
                r = timed_trainer_run(trainer)
            except Exception as err:  # record, go on
                r = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            est = estimator.estimate(shape, seq_len=512, micro_batch=mb, lora_r=16,
                                  lora_targets=scope, gradient_checkpointing=True)
            emit({"kind": "train", "model": name, "scope": scope, "micro_batch": mb,
                  "trainable_params": rep["trainable"], "lora_target_count":
                  rep["lora_target_count"], "upcast_bytes_avoided": prep["upcast_bytes_avoided"],
                  "predicted_peak_bytes": est.total_allocated, **r,
                  "mfu": mfu(shape, r.get("tokens_per_second"), rate)})
            del trainer
            model = own_loss(peft_model.unload())
            free()
    return model


def own_loss(model):
    """``model`` with its own loss again, where helpers.losses.use_chunked_loss replaced it."""
    model.__dict__.pop("forward", None)
    model.__dict__.pop("uses_chunked_loss", None)
    return model


def shape_params(shape) -> int:
    return shape.n_linear_params() + shape.n_16bit_params()


def mfu(shape, tokens_per_second, rate, seq_len: int = 0):
    """Model FLOPs utilization: 6 x parameters x tokens/s over the measured matmul ``rate``; with
    ``seq_len``, causal attention's FLOPs as well: per token and layer 2 x seq_len x the query
    width in the forward, four times over with the recompute and the backward (8 x seq_len x
    width), which at long sequences is more than the weights' 6 x parameters."""
    if not rate:
        return None
    per_token = 6 * shape_params(shape)
    if seq_len:
        per_token += 8 * seq_len * shape.heads * shape.head_dim * shape.layers
    return round(per_token * (tokens_per_second or 0) / rate, 3)


KERNEL_GROUPS = (  # (group, substrings of CUDA kernel names), first match wins
    ("4-bit dequantization", ("dequantize", "kdequant")),
    ("8-bit optimizer", ("optimizer", "adam", "koptimizer")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    ("matmul", ("gemm", "sm90", "cutlass", "xmma", "nvjet", "cublas", "splitk", "matmul")),
    ("copies and casts", ("copy", "cast", "fill", "cat", "memcpy", "memset")),
)


class ProfileSteps(TrainerCallback):
    """torch.profiler over optimizer steps [start, start + count): GPU kernel time by group and
    the top kernels, written to OUT/profile_<label>.txt and returned by :meth:`summary`."""

    def __init__(self, label: str, start: int = 3, count: int = 3):
        self.label, self.start, self.count, self.prof, self.result = label, start, count, None, {}

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.start and self.prof is None:
            torch.cuda.synchronize()
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self.prof is None or self.result or state.global_step < self.start + self.count:
            return
        torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        averages = self.prof.key_averages()
        kernels = [e for e in averages if str(getattr(e, "device_type", "")).endswith("CUDA")]

        def t(e):
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

        groups = {g: 0.0 for g, _ in KERNEL_GROUPS}
        groups["other (elementwise, norms, LoRA glue)"] = 0.0
        for e in kernels:
            name = e.key.lower()
            g = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)),
                     "other (elementwise, norms, LoRA glue)")
            groups[g] += t(e) / 1e6
        busy = sum(groups.values())
        top = sorted(kernels, key=t, reverse=True)[:25]
        self.result = {"steps": self.count, "wall_seconds": round(wall, 3),
                       "gpu_busy_seconds": round(busy, 3),
                       "groups_seconds": {g: round(v, 3) for g, v in groups.items()},
                       "top_kernels": [(e.key[:90], round(t(e) / 1e6, 4), e.count) for e in top]}
        with open(OUT / f"profile_{self.label}.txt", "w") as f:
            f.write(averages.table(sort_by="self_cuda_time_total", row_limit=60))


def defaults(model, shape, name, tokenizer, steps, rate, budget_gb, rows, label, optimizer=None,
             targets=None, params=None, profile=False):
    """notebook 05's train() with its defaults under a budget (``params``: other parameters)."""
    free()
    extra = {"OPTIMIZER": optimizer} if optimizer else {}
    if targets:
        extra["LORA_TARGETS"] = targets
    settings = {"RUN_DIR": str(WORK / f"{name}-{label}"), "MODEL": f"rehearsal:{name}",
                "MAX_STEPS": steps, "SAVE_STEPS": 0, "MAX_LENGTH": 512, "WARMUP_STEPS": 1,
                "MEMORY_BUDGET_GB": budget_gb, **extra, **(params or {})}
    cfg = config.make_config(**settings)
    lora.prepare_for_training(model, cfg.gradient_checkpointing, False)
    peft_model = lora.attach(model, cfg)
    prof = ProfileSteps(f"{name}-{label}") if profile and torch.cuda.is_available() else None
    env.peak_host_rss(restart=True)  # this run's host peak, against what the process held before
    rss_before = env.host_rss()  # what the host check of the offload subtracts from the budget
    try:
        res = train.train(cfg, peft_model, tokenizer, rows, None,
                          data.CompletionCollator(tokenizer),
                          callbacks=[prof] if prof else [], live=False,
                          verbose=True)
        m = res.metrics
        out = {k: m[k] for k in ("tokens_per_second", "peak_gpu_bytes_train", "micro_batch",
                                 "train_loss_first", "train_loss_final", "train_steps")}
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0
        out["notes"] = res.notes
        out["host_rss_peak_bytes"], out["pinned"] = env.peak_host_rss(), pinned_stats()
        out["host_rss_before_bytes"] = rss_before
        est = estimator.estimate(shape, seq_len=cfg.max_length, micro_batch=m["micro_batch"],
                                 lora_r=cfg.lora_r,
                                 gradient_checkpointing=cfg.gradient_checkpointing,
                                 optimizer=cfg.optimizer,
                                 activation_offload=bool(getattr(peft_model,
                                                                 "uses_activation_offload", False)),
                                 tiled_mlp=bool(getattr(peft_model, "uses_tiled_mlp", False)))
        out["predicted_host_bytes"] = est.host_bytes
        out["predicted_peak_bytes"] = est.total_allocated
        out["mfu"] = mfu(shape, m["tokens_per_second"], rate)
        adapter = res.adapter_dir
        if prof is not None:
            out["profile"] = prof.result
    except Exception as err:  # record and go on
        out, adapter = {"error": f"{type(err).__name__}: {str(err)[:300]}"}, None
        if torch.cuda.is_available():  # what the card held when it failed
            free_b, total_b = torch.cuda.mem_get_info(0)
            out["at_failure"] = {"outside_allocator_bytes": total_b - free_b
                                 - torch.cuda.memory_reserved(0),
                                 "peak_reserved_bytes": torch.cuda.max_memory_reserved(0),
                                 "peak_alloc_bytes": torch.cuda.max_memory_allocated(0)}
    emit({"kind": "defaults", "model": name, "rows": label, "budget_gb": budget_gb,
          "optimizer": cfg.optimizer, "lora_targets": cfg.lora_targets,
          "params": params or {}, **out})
    model = own_loss(peft_model.unload())
    free()
    return model, adapter


def original(model, shape, name, tokenizer, steps, rate, rows, label):
    """The original recipe, as the article wrote it (run last: its upcast changes the model)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments

    free()
    model.gradient_checkpointing_enable()
    model = prepare_model_for_kbit_training(model)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05,
                                                  target_modules=ORIGINAL_TARGETS[name],
                                                  bias="none", task_type="CAUSAL_LM"))
    cuda = torch.cuda.is_available()
    args = TrainingArguments(output_dir=str(WORK / f"orig-{name}"), per_device_train_batch_size=1,
                             gradient_accumulation_steps=4, warmup_steps=2, max_steps=steps,
                             learning_rate=2e-4, logging_steps=1, optim="paged_adamw_8bit",
                             report_to=[], save_strategy="no", use_cpu=not cuda,
                             fp16=cuda, remove_unused_columns=False,
                             include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=peft_model, args=args, train_dataset=rows,  # the model's own loss
                      data_collator=data.CompletionCollator(tokenizer), processing_class=tokenizer)
    try:
        r = timed_trainer_run(trainer)
    except Exception as err:
        r = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    est = estimator.estimate(shape, seq_len=512, micro_batch=1, lora_r=8,
                          lora_targets=ORIGINAL_TARGETS[name], upcast_fp32=True,
                          compute_dtype=torch.bfloat16, autocast=True, chunked_loss=False)
    emit({"kind": "original", "model": name, "rows": label, "predicted_peak_bytes":
          est.total_allocated, **r,
          "mfu": mfu(shape, r.get("tokens_per_second"), rate)})
    return peft_model


def longest(model, shape, name, tokenizer, budget_gb, recipe):
    """The longest sequence at micro-batch 1 that trains under ``budget_gb``: the estimator's
    answer, then real steps (forward, backward) around it, 256 tokens apart."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    free()
    budget = int(budget_gb * 1e9)
    if recipe == "original":
        model.gradient_checkpointing_enable()
        model = prepare_model_for_kbit_training(model)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05,
                                                      target_modules=ORIGINAL_TARGETS[name],
                                                      task_type="CAUSAL_LM"))
        settings = dict(lora_r=8, lora_targets=ORIGINAL_TARGETS[name], upcast_fp32=True,
                        autocast=True, chunked_loss=False)
        dtype = torch.float16
    else:
        cfg = config.make_config(MODEL=f"rehearsal:{name}", RUN_DIR=str(WORK / "longest"))
        lora.prepare_for_training(model, True, False)
        peft_model = lora.attach(model, cfg)
        if cfg.chunked_loss:
            losses.use_chunked_loss(peft_model)
        settings = dict(lora_r=cfg.lora_r, chunked_loss=cfg.chunked_loss)
        dtype = None
    lf = fitting.largest_fit(shape, budget, seq_len=512, **settings)
    predicted = lf["seq_len"]
    # as the notebooks do: the budget less what the CUDA context already holds
    env.enforce_gpu_budget(budget)
    ok, seq, tried = 0, max(256, predicted), []
    step = 512
    for _ in range(10):
        try:
            fitting.probe_step(peft_model, 1, seq, dtype)
            ok = max(ok, seq)
            tried.append((seq, "ok"))
        except torch.cuda.OutOfMemoryError:
            tried.append((seq, "oom"))
            free()
            env.enforce_gpu_budget(budget)
            if step == 256 and ok:
                break
            if ok:
                step = 256
                seq = ok + step
                continue
            seq -= 512
            continue
        seq += step
    emit({"kind": "longest", "model": name, "recipe": recipe, "budget_gb": budget_gb,
          "predicted_seq_len": predicted, "measured_seq_len": ok, "tried": tried})
    out = own_loss(peft_model.unload())
    free()
    return out


def pinned_stats() -> dict:
    """torch's pinned host allocator's byte counters (the offloaded activations' real host
    memory: each allocation rounded up to a power of two), where this torch reports them."""
    try:
        return {k: v for k, v in torch.cuda.memory.host_memory_stats().items() if "bytes" in k}
    except (AttributeError, RuntimeError):
        return {}


def longest_offload(model, shape, name, tokenizer, budget_gb, rate, tiled=False, lean=True):
    """The longest sequence at micro-batch 1 under ``budget_gb`` with the checkpointed activations
    in CPU memory (ACTIVATION_OFFLOAD = 'on'; with ``tiled``, each MLP a chunk of tokens at a
    time as well, TILED_MLP = 'on') and the defaults otherwise: the estimator's answer, then real
    forward and backward steps, growing by a quarter until one runs out of memory and halving
    the gap after (to 512 tokens, or 3% of the length where that is more: a probe at 100k
    tokens takes most of a minute). Each step's wall time gives tokens/s and MFU at that length
    (forward and backward; no optimizer step)."""
    from helpers import norms, offload, tiling

    free()
    budget = int(budget_gb * 1e9)
    cfg = config.make_config(MODEL=f"rehearsal:{name}", RUN_DIR=str(WORK / "longest"),
                             ACTIVATION_OFFLOAD="on", TILED_MLP="on" if tiled else "off")
    lora.prepare_for_training(model, True, False)
    peft_model = lora.attach(model, cfg)
    losses.use_chunked_loss(peft_model)
    stats = offload.install(peft_model, lean=lean)
    if tiled:
        tiling.install(peft_model)
    lf = fitting.largest_fit(shape, budget, seq_len=512, lora_r=cfg.lora_r, chunked_loss=True,
                             lean_norms=None if lean else False,
                             lean_dropout=None if lean else False)
    predicted = lf.get("seq_len_tiled" if tiled else "seq_len_offload") or lf["seq_len"]
    ok, bad, seq, tried = 0, None, max(512, predicted // 256 * 256), []
    best = {}
    for _ in range(9):
        env.enforce_gpu_budget(budget)  # as the notebooks do: less the CUDA context
        try:
            stats.reset()
            torch.cuda.synchronize()
            t = time.perf_counter()
            peak = fitting.probe_step(peft_model, 1, seq)
            secs = time.perf_counter() - t
            tried.append((seq, "ok", round(secs, 2), peak, stats.peak,
                          torch.cuda.max_memory_reserved()))
            ok = seq
            best = {"seq": seq, "seconds": round(secs, 2), "peak_alloc_bytes": peak,
                    "host_bytes": stats.peak, "tokens_per_second": round(seq / secs, 1),
                    "mfu": mfu(shape, seq / secs, rate),
                    "mfu_with_attention": mfu(shape, seq / secs, rate, seq),
                    "host_rss_bytes": env.host_rss(),
                    "pinned": pinned_stats()}
        except torch.cuda.OutOfMemoryError:
            tried.append((seq, "oom"))
            bad = seq
        free()  # each probe measured alone, its pinned host memory too
        if bad is not None and bad - ok <= max(512, ok // 32):  # to 3% at long lengths
            break
        nxt = int(seq * 1.25) if bad is None else (ok + bad) // 2 if ok else int(seq * 0.75)
        seq = max(256, nxt // 256 * 256)
        if seq in (ok, bad):
            break
    est = estimator.estimate(shape, seq_len=ok or 512, micro_batch=1, lora_r=cfg.lora_r,
                             chunked_loss=True, activation_offload=True,
                             tiled_mlp=tiled, lean_norms=lean, lean_dropout=lean) if ok else None
    recipe = ("defaults + ACTIVATION_OFFLOAD=on" + (" + TILED_MLP=on" if tiled else "")
              + ("" if lean else " (transformers' RMSNorm, peft's dropout)"))
    emit({"kind": "longest", "model": name, "recipe": recipe,
          "budget_gb": budget_gb, "predicted_seq_len": predicted, "measured_seq_len": ok,
          "at_longest": best, "predicted_peak_at_longest": est.total_allocated if est else None,
          "predicted_host_at_longest": est.host_bytes if est else None, "tried": tried})
    tiling.remove(peft_model)  # the base model's MLPs and norms get their own forward back
    norms.remove(peft_model)
    out = own_loss(peft_model.unload())
    out.__dict__.pop("forward", None)
    free()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--parts", default="build,train,defaults,original,merge")
    ap.add_argument("--alloc-conf", default="",
                    help="PYTORCH_CUDA_ALLOC_CONF for this run, e.g. expandable_segments:True "
                         "(set before the first CUDA allocation)")
    args = ap.parse_args()
    if args.alloc_conf:
        torch.cuda.memory._set_allocator_settings(args.alloc_conf)
    parts = set(args.parts.split(","))
    OUT.mkdir(parents=True, exist_ok=True)
    rate = matmul_rate()
    emit({"kind": "card", "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
          else "cpu", "bf16_matmul_flops": rate, "torch": torch.__version__,
          "versions": env.versions(), "alloc_conf": args.alloc_conf})
    tokenizer = loading.load_tokenizer("embedded")
    for name in args.models:
        try:
            run_model(name, parts, tokenizer, rate, args.steps)
        except Exception as err:  # record, go on with the next model
            emit({"kind": "error", "model": name, "error": f"{type(err).__name__}: {err}"[:500]})
            free()
    return 0


def run_model(name, parts, tokenizer, rate, steps):
    model, shape = build(name)
    budget = BUDGETS.get(name, 16)
    vocab = shape.vocab
    if "train" in parts:
        model = measure_lora(model, shape, name, tokenizer, steps, rate)
    rows512 = random_rows(vocab, 64 * (steps + 1), 512, seed=1)
    adapter = None
    if "defaults" in parts:
        model, adapter = defaults(model, shape, name, tokenizer, steps, rate, budget,
                                  rows512, "random-512")
        model, _ = defaults(model, shape, name, tokenizer, steps, rate, budget,
                            quote_rows(config.make_config(), tokenizer, True, steps),
                            "quotes-packed")
        if name != "gpt-neox-20b":
            model, _ = defaults(model, shape, name, tokenizer, steps, rate, budget, rows512,
                                "random-512-nonpaged", optimizer="adamw_8bit")
        else:
            model, _ = defaults(model, shape, name, tokenizer, steps, rate, 16, rows512,
                                "random-512-16GB")
    if "merge" in parts and adapter is not None and name == "gpt-j-6b":
        free()
        from helpers import merge

        try:
            res = merge.merge_adapter(
                lambda: loading.load_16bit(f"rehearsal:{name}"), adapter, tokenizer=tokenizer,
                prompts=["The only", "Love is"], out_dir=None, quantized_model=model,
                max_new_tokens=8, check_base_name=False)
            emit({"kind": "merge", "model": name, **merge.merge_metrics(res),
                  "source": res.source})
        except Exception as err:
            emit({"kind": "merge", "model": name, "error": f"{type(err).__name__}: {err}"[:400]})
        free()
    if "fit16" in parts and name == "gpt-neox-20b":  # all-linear under 16 GB: refused?
        model, _ = defaults(model, shape, name, tokenizer, steps, rate, 16, rows512,
                            "random-512-16GB")
    if "profile" in parts:  # where a step's GPU time goes (full rows; packed rows below)
        model, _ = defaults(model, shape, name, tokenizer, 7, rate, budget, rows512,
                            "random-512-profile", profile=True)
    for variant in sorted(p for p in parts if p.startswith("var:")):
        # var:NAME=VALUE;NAME=VALUE - the defaults with some parameters changed
        params = dict(kv.split("=", 1) for kv in variant[4:].split(";"))
        model, _ = defaults(model, shape, name, tokenizer, steps, rate, budget, rows512,
                            "random-512-" + variant[4:].replace("=", "-").replace(";", "-"),
                            params=params)
    if "long" in parts:  # a few hundred steps under the smallest card the article names
        long_steps, budget_small, targets = {"gpt-j-6b": (150, 12, None),
                                             "gpt-neox-20b": (300, 16, "attention")}[name]
        rows_long = random_rows(vocab, 16 * (long_steps + 1), 512, seed=2)
        model, _ = defaults(model, shape, name, tokenizer, long_steps, rate, budget_small,
                            rows_long, f"random-512-{long_steps}-steps", targets=targets)
    if "packed" in parts:  # packed quotes with transformers' mask, then the varlen kernel
        quotes = quote_rows(config.make_config(), tokenizer, True, steps)
        model, _ = defaults(model, shape, name, tokenizer, steps, rate, budget, quotes,
                            "quotes-packed-mask", params={"PACKING": "false"})
        model, _ = defaults(model, shape, name, tokenizer, steps, rate, budget, rows512,
                            "random-512")
        model, _ = defaults(model, shape, name, tokenizer, steps, rate, budget, quotes,
                            "quotes-packed-varlen")
        if "profile" in parts:
            model, _ = defaults(model, shape, name, tokenizer, 7, rate, budget, quotes,
                                "quotes-packed-varlen-profile", profile=True)
    for gb in sorted(int(p.split(":")[1]) for p in parts if p.startswith("longest-offload:")):
        model = longest_offload(model, shape, name, tokenizer, gb, rate)
    for gb in sorted(int(p.split(":")[1]) for p in parts if p.startswith("longest-own-norms:")):
        model = longest_offload(model, shape, name, tokenizer, gb, rate, lean=False)
    for gb in sorted(int(p.split(":")[1]) for p in parts if p.startswith("longest-tiled:")):
        model = longest_offload(model, shape, name, tokenizer, gb, rate, tiled=True)
    for gb in sorted(int(p.split(":")[1]) for p in parts if p.startswith("train-longest:")):
        # notebook 05's train(), three steps, at notebook 02's longest with offload and tiling
        seq = fitting.largest_fit(shape, gb * 1e9, seq_len=512, chunked_loss=True,
                                  activation_offload=True, tiled_mlp=True)["seq_len"]
        model, _ = defaults(model, shape, name, tokenizer, 3, rate, gb,
                            random_rows(vocab, 4, seq, seed=3), f"random-{seq}-longest",
                            params={"MAX_LENGTH": seq, "MICRO_BATCH": 1})
    if "longest" in parts:
        model = longest(model, shape, name, tokenizer, budget, "defaults")
        model = longest(model, shape, name, tokenizer, budget, "original")
    if "original" in parts:
        rows_plain = random_rows(vocab, 4 * (steps + 1), 512, seed=1)
        peft_model = original(model, shape, name, tokenizer, steps, rate, rows_plain,
                              "random-512")
        peft_model = original(peft_model.unload(), shape, name, tokenizer, steps, rate,
                              quote_rows(config.make_config(), tokenizer, False),
                              "quotes-plain")
        model = peft_model
    del model
    free()


if __name__ == "__main__":
    raise SystemExit(main())
