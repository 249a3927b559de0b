"""What the GPU and the CPU hold now, and what a loaded model weighs part by part (notebook 02).

- **Readouts**: :func:`cpu_rss`, :func:`cpu_maxrss` and the stage tracker
  ``with track("load"):``, which records GPU memory before/after/peak and the CPU RAM peak
  (sampled every 20 ms, and the process high-water mark) of each stage in a :class:`MemoryLog`.
- **A loaded model, part by part**: :func:`footprint_breakdown` reads the 4-bit weights, their
  quantization constants, embeddings, head, norms, biases, LoRA parameters and buffers from the
  model itself; :func:`footprint_16bit`, :func:`alt_quant_sizes` and :func:`quantization_error`
  compare formats.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import threading
import time
from dataclasses import dataclass
import torch
import pandas as pd
from helpers import env
from helpers.shapes import as_shape, require_positions
from helpers.units import (BLOCKSIZE, _is_params4bit, fmt_bytes, logical_numel,
                           quantized_weight_bytes)


def cpu_rss() -> int:
    """Resident memory (RSS) of this process now, in bytes (notebook 01: Colab's RAM limit)."""
    import psutil

    return psutil.Process().memory_info().rss


def cpu_maxrss() -> int | None:
    """The process's RSS high-water mark since it started (``ru_maxrss``), in bytes; None where
    the platform has no ``resource`` module (Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports kB


class _RssSampler(threading.Thread):
    """Samples this process's RSS every ``interval`` seconds and keeps the maximum: psutil reads
    the RSS now but keeps no peak of its own."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True, name="rss-sampler")
        self.interval, self.done = interval, threading.Event()
        self.peak = cpu_rss()

    def run(self):
        while not self.done.wait(self.interval):
            self.peak = max(self.peak, cpu_rss())

    def stop(self) -> int:
        self.done.set()
        self.join(timeout=1.0)
        self.peak = max(self.peak, cpu_rss())
        return self.peak


@dataclass
class StageRecord:
    """Memory of one tracked stage (bytes; seconds)."""

    stage: str
    seconds: float
    gpu_allocated_before: int
    gpu_allocated_after: int
    gpu_peak_allocated: int
    gpu_peak_reserved: int
    cpu_rss_before: int
    cpu_rss_after: int
    cpu_rss_peak: int


_COLUMNS = [  # (title, attribute) of the printed table
    ("stage", "stage"), ("seconds", "seconds"),
    ("GPU alloc before", "gpu_allocated_before"), ("GPU alloc after", "gpu_allocated_after"),
    ("GPU peak alloc", "gpu_peak_allocated"), ("GPU peak reserved", "gpu_peak_reserved"),
    ("CPU RSS before", "cpu_rss_before"), ("CPU RSS after", "cpu_rss_after"),
    ("CPU RSS peak", "cpu_rss_peak"),
]


class MemoryLog:
    """Every tracked stage of a notebook, in order. ``with log.track("load"): ...`` adds one.

    :meth:`frame` gives the stages as a pandas DataFrame, ``print(log)`` its text, and in a
    notebook the log shows as its HTML table; :meth:`as_metrics` flattens it for the run
    manifest. Introduced in notebook 02.
    """

    def __init__(self, sample_interval: float = 0.02):
        self.records: list[StageRecord] = []
        self.sample_interval = sample_interval

    @contextlib.contextmanager
    def track(self, stage: str, device: int = 0):
        """Record GPU and CPU memory of the code inside the block as stage ``stage``.

        GPU: allocated/reserved before and after, and the peak during the block (the allocator's
        peak counters are reset on entry). CPU: RSS before/after and the peak during the block,
        sampled every ~20 ms by a background thread; on Linux/macOS the process high-water mark
        (``ru_maxrss``) also catches spikes shorter than the sampling interval when it rises
        during the block.
        """
        cuda = torch.cuda  # its readouts are 0 on a machine without CUDA
        if cuda.is_available():
            cuda.synchronize(device)
            env.reset_gpu_peak(device)
        gpu_before = cuda.memory_allocated(device)
        maxrss_before = cpu_maxrss()
        sampler = _RssSampler(self.sample_interval)
        rss_before = sampler.peak
        sampler.start()
        start = time.perf_counter()
        try:
            yield self
        finally:
            if cuda.is_available():
                cuda.synchronize(device)
            seconds = time.perf_counter() - start
            rss_peak = sampler.stop()
            rss_after = cpu_rss()
            maxrss_after = cpu_maxrss()
            if maxrss_before is not None and maxrss_after > maxrss_before:
                # the lifetime high-water mark rose inside this stage, so the stage reached it
                rss_peak = max(rss_peak, maxrss_after)
            self.records.append(StageRecord(
                stage=stage, seconds=round(seconds, 3),
                gpu_allocated_before=gpu_before, gpu_allocated_after=cuda.memory_allocated(device),
                gpu_peak_allocated=cuda.max_memory_allocated(device),
                gpu_peak_reserved=cuda.max_memory_reserved(device),
                cpu_rss_before=rss_before, cpu_rss_after=rss_after,
                cpu_rss_peak=max(rss_peak, rss_before, rss_after)))

    def frame(self):
        """The log as a pandas DataFrame with human units (one row per stage)."""
        return pd.DataFrame([[r.stage, f"{r.seconds:.1f}"]
                             + [fmt_bytes(getattr(r, a)) for _, a in _COLUMNS[2:]]
                             for r in self.records], columns=[t for t, _ in _COLUMNS])

    def text(self) -> str:
        """The log as a plain-text table with human units."""
        return self.frame().to_string(index=False)

    __str__ = text

    def _repr_html_(self) -> str:
        return self.frame().to_html(index=False)

    def as_metrics(self, prefix: str = "") -> dict:
        """Flat name -> number mapping for the manifest, e.g. ``peak_gpu_bytes_load`` and
        ``peak_cpu_rss_bytes_load`` for stage "load" (a repeated stage keeps its last record)."""
        out = {}
        for r in self.records:
            s = re.sub(r"[^0-9a-zA-Z]+", "_", r.stage).strip("_").lower() or "stage"
            out.update({
                f"{prefix}peak_gpu_bytes_{s}": r.gpu_peak_allocated,
                f"{prefix}peak_gpu_reserved_bytes_{s}": r.gpu_peak_reserved,
                f"{prefix}gpu_allocated_bytes_after_{s}": r.gpu_allocated_after,
                f"{prefix}peak_cpu_rss_bytes_{s}": r.cpu_rss_peak,
                f"{prefix}cpu_rss_bytes_after_{s}": r.cpu_rss_after,
                f"{prefix}seconds_{s}": r.seconds,
            })
        return out


LOG = MemoryLog()  # the notebook's log: ``track`` adds to it unless given another


def track(stage: str, log: MemoryLog | None = None, device: int = 0):
    """``with track("load"):`` records the block's memory as a stage of :data:`LOG` (or ``log``).

    Introduced in notebook 02; every later notebook tracks its stages the same way.
    """
    return (log or LOG).track(stage, device=device)


def footprint_breakdown(model) -> list[dict]:
    """What a loaded (4-bit) model weighs, part by part, read from the model itself.

    Each row: ``part``, ``bytes``, ``params`` (weights it stands for; a packed 4-bit weight
    stands for twice its bytes), ``dtypes``, ``in_footprint`` and ``note``.

    transformers' ``model.get_memory_footprint()`` sums ``parameters()`` and ``buffers()`` only.
    The quantization constants of each 4-bit weight live in ``weight.quant_state`` (absmax, with
    double quantization the 8-bit absmax plus its float32 second-level constants, and the code
    tables), which is neither: they occupy memory but get_memory_footprint does not count them.
    Their rows are marked ``in_footprint=False``; the rows marked True sum exactly to
    get_memory_footprint(), all rows together to what the weights really occupy.
    Introduced in notebook 02.
    """
    out_emb = model.get_output_embeddings()  # None for a model without a head
    head_ids = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()

    parts = {}  # part -> [bytes, params, set(dtypes), in_footprint, note]

    def add(part, nbytes, nparams, dtype, in_fp, note):
        row = parts.setdefault(part, [0, 0, set(), in_fp, note])
        row[0] += nbytes
        row[1] += nparams
        row[2].add(str(dtype).replace("torch.", ""))

    seen_q = set()
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        module = model.get_submodule(name.rpartition(".")[0])  # the module that owns it
        if _is_params4bit(p):
            qs = p.quant_state
            s2 = qs.state2  # double quantization's second level, or None
            add("4-bit linear weights", p.nbytes, logical_numel(p), p.dtype, True,
                "two 4-bit values packed per byte")
            tables = "NF4/FP4 value table and the 8-bit absmax table per weight"
            constants = [
                (f"absmax ({'8-bit' if qs.nested else 'float32'})", qs.absmax,
                 "one per block of 64 weights"),
                ("second level (float32)", getattr(s2, "absmax", None),
                 "double quantization: one per 256 absmax values"),
                *[("code tables and offsets", t, tables)
                  for t in (qs.code, qs.offset, getattr(s2, "code", None))],
            ]
            for part, t, why in constants:  # a table shared by several weights counts once
                if torch.is_tensor(t) and t.data_ptr() not in seen_q:
                    seen_q.add(t.data_ptr())
                    add(f"quantization constants: {part}", t.nbytes, 0, t.dtype, False,
                        f"{why}; not counted by get_memory_footprint")
            continue
        if "lora_" in name:
            part, note = "LoRA adapters", "trainable A and B matrices"
        elif id(p) in head_ids:
            part, note = "output head", "lm_head, never quantized"
        elif isinstance(module, torch.nn.Embedding):
            part, note = "embeddings", "token (and position) embeddings, never quantized"
        elif "norm" in type(module).__name__.lower():
            part, note = "norms", "LayerNorm/RMSNorm weights (and biases)"
        elif name.endswith(".bias"):
            part, note = "biases", "biases of the linear layers, never quantized"
        else:
            part, note = "other 16-bit parameters", "parameters of other layers"
        add(part, p.nbytes, p.nelement(), p.dtype, True, note)

    for _, b in model.named_buffers():
        add("buffers", b.nbytes, 0, b.dtype, True,
            "non-trainable tensors such as rotary frequencies")

    order = ["4-bit linear weights", "quantization constants: absmax (8-bit)",
             "quantization constants: absmax (float32)",
             "quantization constants: second level (float32)",
             "quantization constants: code tables and offsets", "embeddings", "output head",
             "norms", "biases", "other 16-bit parameters", "LoRA adapters", "buffers"]
    rows = []
    for part in sorted(parts, key=order.index):
        nbytes, nparams, dtypes, in_fp, note = parts[part]
        rows.append({"part": part, "bytes": int(nbytes), "params": int(nparams),
                     "dtypes": ", ".join(sorted(dtypes)), "in_footprint": in_fp, "note": note})
    return rows


def footprint_totals(rows: list[dict]) -> dict:
    """``footprint`` (what get_memory_footprint counts) and ``resident`` (everything) of a
    :func:`footprint_breakdown`."""
    return {"footprint": sum(r["bytes"] for r in rows if r["in_footprint"]),
            "resident": sum(r["bytes"] for r in rows)}


def footprint_text(rows: list[dict]) -> str:
    """A :func:`footprint_breakdown` as a text table with its two totals (``*``: not counted by
    get_memory_footprint)."""
    tot = footprint_totals(rows)
    table = pd.DataFrame({
        "part": [r["part"] for r in rows],
        "bytes": [fmt_bytes(r["bytes"]) for r in rows],
        "share": [f"{r['bytes'] / tot['resident']:.1%}" if tot["resident"] else "" for r in rows],
        "params": [f"{r['params']:,}" for r in rows],
        "dtype": [r["dtypes"] + ("" if r["in_footprint"] else " *") for r in rows]})
    return (table.to_string(index=False) + "\n"
            f"get_memory_footprint (parameters + buffers): {fmt_bytes(tot['footprint'])}\n"
            f"resident (with the * quantization constants): {fmt_bytes(tot['resident'])}")


def footprint_16bit(model_or_config) -> int:
    """What the same model weighs in 16-bit: 2 bytes for every parameter (LoRA excluded).

    Given a loaded model, its 4-bit weights count with their original shapes and its buffers with
    their actual size; given a config (or a :class:`ModelShape`), parameters only.
    """
    if isinstance(model_or_config, torch.nn.Module):
        params = sum(logical_numel(p) for name, p in model_or_config.named_parameters()
                     if "lora_" not in name)
        return 2 * params + sum(b.nbytes for b in model_or_config.buffers())
    return 2 * as_shape(model_or_config).n_params()


def alt_quant_sizes(model) -> dict:
    """Predicted resident bytes of this model's weights in each format, from its own counts.

    Keys ``nf4_dq``, ``nf4``, ``fp4_dq``, ``fp4``, ``16bit``. In the 4-bit formats the layers that
    are never quantized (embeddings, head, norms, biases) count at 2 bytes per parameter and the
    4-bit weights with their quantization constants (FP4 and NF4 have the same size; only the
    value table differs). get_memory_footprint would report the same figure for NF4 with and
    without double quantization, since it skips the constants: these are what memory holds.
    """
    sizes = [logical_numel(p) for name, p in model.named_parameters()
             if "lora_" not in name and _is_params4bit(p)]
    sixteen = footprint_16bit(model)
    rest = sixteen - 2 * sum(sizes)  # what stays 16-bit, and the buffers

    def total(dq):
        return rest + sum(sum(quantized_weight_bytes(n, double_quant=dq).values()) for n in sizes)

    with_dq, without = total(True), total(False)
    return {"nf4_dq": with_dq, "nf4": without, "fp4_dq": with_dq, "fp4": without,
            "16bit": sixteen}


# a linear layer's group by its module name: "MLP", else "attention", else "other linear"
_ATTN_PAT = re.compile(r"(attn|attention|q_proj|k_proj|v_proj|o_proj|out_proj|query|key|value|"
                       r"qkv|c_proj\b)")
_MLP_PAT = re.compile(r"(mlp|fc1|fc2|fc_in|fc_out|gate_proj|up_proj|down_proj|dense_h_to_4h|"
                      r"dense_4h_to_h|feed_forward|ffn|w1|w2|w3)")
_SKIP_PAT = re.compile(r"(embed|wte|wpe|lm_head|embed_out|score)")


def quantization_error(model_16bit, quant_types=("nf4", "fp4")) -> list[dict]:
    """Relative error ||W - dequant(quant(W))|| / ||W|| of 4-bit quantization, by layer type.

    Input: a 16-bit (or float32) model. Every linear weight is quantized with
    ``bitsandbytes.functional.quantize_4bit`` (blocks of 64, no double quantization) and
    dequantized back (works on CPU); embeddings and the head are skipped, since QLoRA keeps them
    16-bit. The error of a group is the Frobenius norm of all its weights' errors over the norm
    of all its weights. Introduced in notebook 02.
    """
    import bitsandbytes.functional as bnbf

    acc = {}  # (group, qtype) -> [(squared error, squared norm, params) of each weight]
    for name, module in model_16bit.named_modules():
        if not isinstance(module, torch.nn.Linear) or _SKIP_PAT.search(name):
            continue
        if _is_params4bit(module.weight):
            raise ValueError(f"{name} is already 4-bit: give quantization_error the "
                             "16-bit model, not the quantized one")
        w = module.weight.detach()
        if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            w = w.float()
        group = ("MLP" if _MLP_PAT.search(name.lower()) else
                 "attention" if _ATTN_PAT.search(name.lower()) else "other linear")
        ref2 = w.float().pow(2).sum().item()
        for qt in quant_types:
            q, state = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type=qt)
            deq = bnbf.dequantize_4bit(q, state)
            err2 = (w.float() - deq.float()).pow(2).sum().item()
            acc.setdefault((group, qt), []).append((err2, ref2, w.nelement()))
    if not acc:
        raise ValueError("no linear weights found to quantize")
    rows = []
    for (group, qt), each in sorted(acc.items()):
        err2, ref2, npar = map(sum, zip(*each))
        rows.append({"group": group, "quant_type": qt, "weights": len(each), "params": npar,
                     "relative_error": math.sqrt(err2 / ref2) if ref2 else 0.0})
    return rows


def probe_step(model, micro_batch: int, seq_len: int, dtype: torch.dtype | None = None) -> int:
    """One forward and backward (no optimizer step) of ``micro_batch`` x ``seq_len`` random tokens,
    all of them labelled: the largest activations a training step at this size can have. Returns
    the peak GPU bytes allocated during it (0 on CPU); raises ``torch.cuda.OutOfMemoryError`` when
    it does not fit. The random numbers come from their own generator and the global RNG state is
    restored, so the run that follows is not shifted by the probe. The loss is the one the model
    computes in training (the chunked loss where :func:`helpers.losses.use_chunked_loss`
    installed it), so the probe measures what training will hold. Introduced in notebook 05.
    """
    require_positions(model, seq_len)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=gen).to(device)
    was_training = model.training
    devices = [device.index or 0] if cuda else []
    use_autocast = cuda and dtype is not None and env.uses_autocast(dtype)
    try:
        with torch.random.fork_rng(devices=devices):
            if cuda:
                torch.cuda.synchronize(device)
                env.reset_gpu_peak(device)
            model.train()
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
            with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=use_autocast):
                out = model(**inputs, labels=ids)
            out.loss.backward()
            del out
            peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        del ids
        if cuda:
            torch.cuda.empty_cache()
    return int(peak)
