"""Memory: what the GPU and the CPU hold now, what a loaded model weighs part by part, and whether
a QLoRA run will fit on a card before it starts.

Three parts:

- **Readouts** (notebooks 01 and 02, then every stage of the series): :func:`gpu_snapshot`,
  :func:`cpu_rss`, :func:`fmt_bytes` and the stage tracker ``with track("load"):``, which records
  GPU memory before/after/peak and the CPU RAM peak (sampled every 20 ms, and the process
  high-water mark) of each stage in a :class:`MemoryLog`.
- **A loaded model, part by part** (notebook 02): :func:`footprint_breakdown` reads the 4-bit
  weights, their quantization constants, embeddings, head, norms, biases, LoRA parameters and
  buffers from the model itself; :func:`footprint_16bit`, :func:`alt_quant_sizes` and
  :func:`quantization_error` compare formats.
- **The estimator** (notebook 01's "will it fit?", checked against the measured run in 05):
  :func:`estimate` predicts the peak GPU memory of a QLoRA training step item by item from the
  model's shape (:func:`shape_from_config`) and the run's settings; :func:`fits`,
  :func:`largest_fit` and :func:`verdict_text` turn that into advice.

Units: bytes everywhere; text uses decimal units, **1 GB = 1e9 bytes** (the unit of bitsandbytes'
and transformers' footprint figures; a "16 GB" card holds about 15.6-16 GB of them).

This module imports only :mod:`helpers.env` and :mod:`helpers.config` from the package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import math
import re
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

GB = 1e9  # decimal gigabyte, used for every figure this module prints

# 4-bit storage per parameter (QLoRA paper, section 3): 4 bits for the value, plus the block's
# scale ("absmax"). Without double quantization each block of 64 weights keeps a float32 absmax:
# 4 + 32/64 = 4.5 bits. With double quantization the absmax values are themselves quantized to
# 8 bits in blocks of 256, each of those blocks keeping one float32 constant:
# 4 + 8/64 + 32/(64*256) = 4.127 bits.
BLOCKSIZE = 64
DQ_BLOCKSIZE = 256
BITS_PER_PARAM_DQ = 4 + 8 / BLOCKSIZE + 32 / (BLOCKSIZE * DQ_BLOCKSIZE)  # 4.127
BITS_PER_PARAM_NO_DQ = 4 + 32 / BLOCKSIZE  # 4.5

# What the card holds outside torch's allocator: the CUDA context with the kernels torch and
# bitsandbytes load. Measured 0.80 GB on an H200 (torch 2.11, CUDA 13) as total - free -
# reserved; older stacks (Colab's T4) use about 0.3-0.5 GB, so this errs on the safe side.
CUDA_CONTEXT_BYTES = 800_000_000
# torch's caching allocator reserves more than it hands out. Measured on an H200 (13 training
# runs): reserved exceeded max_memory_allocated by 1-18%, about 3% of what is allocated plus a
# third of the large short-lived buffers (logits and their gradient, a recomputed block).
ALLOCATOR_SLACK = 0.03
TRANSIENT_SLACK = 0.35
# cuBLAS and cuBLASLt workspaces, which torch allocates through its caching allocator at the
# first matmul (so they are in max_memory_allocated): 64 MB measured on an H200 (4 MiB x 8 each).
CUBLAS_WORKSPACE_BYTES = 64_000_000
# What a process of a multi-GPU launch holds outside torch's allocator besides the CUDA context:
# NCCL's communicator buffers and kernels. Measured on 2 NVIDIA H200 (torch 2.11, NCCL for
# CUDA 13, FSDP over NVLink): 2.49 GB outside the allocator per process against 0.80 GB alone.
NCCL_BYTES = 1_700_000_000

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


# =============================================================================== readouts


def free() -> None:
    """Return freed memory: Python objects now, and the GPU allocator's cache."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fmt_bytes(n: float | None) -> str:
    """Bytes as text in decimal units (1 GB = 1e9 bytes): ``11.21 GB``, ``350.2 MB``, ``12.0 kB``.
    Introduced in notebook 01."""
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    if n >= 1e9:
        return f"{sign}{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{sign}{n / 1e6:.1f} MB"
    if n >= 1e3:
        return f"{sign}{n / 1e3:.1f} kB"
    return f"{sign}{n:.0f} B"


def gpu_snapshot(device: int = 0) -> dict:
    """GPU memory now, in bytes: allocated, reserved, peak allocated, peak reserved, free, total.

    allocated/peak come from torch's caching allocator (what tensors hold; the CUDA context is not
    in them); free/total come from the driver (``cudaMemGetInfo``) and do include the context.
    Without CUDA: zeros for the allocator figures and None for free/total. Introduced in
    notebook 01.
    """
    if not torch.cuda.is_available():
        return {"device": "cpu", "allocated": 0, "reserved": 0, "peak_allocated": 0,
                "peak_reserved": 0, "free": None, "total": None}
    free, total = torch.cuda.mem_get_info(device)
    return {
        "device": torch.cuda.get_device_name(device),
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
        "peak_allocated": torch.cuda.max_memory_allocated(device),
        "peak_reserved": torch.cuda.max_memory_reserved(device),
        "free": free,
        "total": total,
    }


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
    """Samples this process's RSS every ``interval`` seconds and keeps the maximum."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True, name="rss-sampler")
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop_event = threading.Event()
        self.peak = self._proc.memory_info().rss

    def run(self):
        while not self._stop_event.is_set():
            try:
                self.peak = max(self.peak, self._proc.memory_info().rss)
            except (OSError, RuntimeError):  # pragma: no cover - the process is going away
                return
            self._stop_event.wait(self._interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join(timeout=1.0)
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return self.peak


@dataclass
class StageRecord:
    """Memory of one tracked stage (bytes; seconds)."""

    stage: str
    seconds: float
    gpu_allocated_before: int
    gpu_allocated_after: int
    gpu_reserved_before: int
    gpu_reserved_after: int
    gpu_peak_allocated: int
    gpu_peak_reserved: int
    cpu_rss_before: int
    cpu_rss_after: int
    cpu_rss_peak: int
    cpu_maxrss: int | None  # the process's high-water mark at the end of the stage


_COLUMNS = [  # (title, attribute) of the printed table
    ("stage", "stage"), ("seconds", "seconds"),
    ("GPU alloc before", "gpu_allocated_before"), ("GPU alloc after", "gpu_allocated_after"),
    ("GPU peak alloc", "gpu_peak_allocated"), ("GPU peak reserved", "gpu_peak_reserved"),
    ("CPU RSS before", "cpu_rss_before"), ("CPU RSS after", "cpu_rss_after"),
    ("CPU RSS peak", "cpu_rss_peak"),
]


class MemoryLog:
    """Every tracked stage of a notebook, in order. ``with log.track("load"): ...`` adds one.

    :meth:`table` gives the rows, ``print(log)`` a text table, and in a notebook the log shows as
    an HTML table; :meth:`as_metrics` flattens it for the run manifest. Introduced in notebook 02.
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
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        before = gpu_snapshot(device)
        maxrss_before = cpu_maxrss()
        sampler = _RssSampler(self.sample_interval)
        rss_before = sampler.peak
        sampler.start()
        start = time.perf_counter()
        try:
            yield self
        finally:
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            rss_peak = sampler.stop()
            after = gpu_snapshot(device)
            rss_after = cpu_rss()
            maxrss_after = cpu_maxrss()
            if maxrss_after is not None and maxrss_before is not None \
                    and maxrss_after > maxrss_before:
                # the lifetime high-water mark rose inside this stage, so the stage reached it
                rss_peak = max(rss_peak, maxrss_after)
            self.records.append(StageRecord(
                stage=stage, seconds=round(seconds, 3),
                gpu_allocated_before=before["allocated"], gpu_allocated_after=after["allocated"],
                gpu_reserved_before=before["reserved"], gpu_reserved_after=after["reserved"],
                gpu_peak_allocated=max(after["peak_allocated"], after["allocated"]),
                gpu_peak_reserved=max(after["peak_reserved"], after["reserved"]),
                cpu_rss_before=rss_before, cpu_rss_after=rss_after,
                cpu_rss_peak=max(rss_peak, rss_before, rss_after),
                cpu_maxrss=maxrss_after))

    def table(self) -> list[dict]:
        """One dict per stage (numbers in bytes and seconds)."""
        return [dataclasses.asdict(r) for r in self.records]

    def text(self) -> str:
        """The log as a plain-text table with human units."""
        head = [t for t, _ in _COLUMNS]
        body = [[_cell(getattr(r, a), a) for _, a in _COLUMNS] for r in self.records]
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        lines = ["  ".join(x.ljust(w) if i == 0 else x.rjust(w)
                           for i, (x, w) in enumerate(zip(row, widths)))
                 for row in [head, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    __str__ = text

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(t)}</th>" for t, _ in _COLUMNS)
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_cell(getattr(r, a), a))}</td>"
                             for _, a in _COLUMNS) + "</tr>" for r in self.records)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"

    def as_metrics(self, prefix: str = "") -> dict:
        """Flat name -> number mapping for the manifest, e.g. ``peak_gpu_bytes_load`` and
        ``peak_cpu_rss_bytes_load`` for stage "load" (a repeated stage keeps its last record)."""
        out = {}
        for r in self.records:
            s = _slug(r.stage)
            out.update({
                f"{prefix}peak_gpu_bytes_{s}": r.gpu_peak_allocated,
                f"{prefix}peak_gpu_reserved_bytes_{s}": r.gpu_peak_reserved,
                f"{prefix}gpu_allocated_bytes_after_{s}": r.gpu_allocated_after,
                f"{prefix}peak_cpu_rss_bytes_{s}": r.cpu_rss_peak,
                f"{prefix}cpu_rss_bytes_after_{s}": r.cpu_rss_after,
                f"{prefix}seconds_{s}": r.seconds,
            })
        return out

    def clear(self) -> None:
        self.records.clear()


def _cell(value, attr: str) -> str:
    if attr == "stage":
        return str(value)
    if attr == "seconds":
        return f"{value:.1f}"
    return fmt_bytes(value)


def _slug(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower() or "stage"


LOG = MemoryLog()  # the notebook's log: ``track`` adds to it unless given another


def track(stage: str, log: MemoryLog | None = None, device: int = 0):
    """``with track("load"):`` records the block's memory as a stage of :data:`LOG` (or ``log``).

    Introduced in notebook 02; every later notebook tracks its stages the same way.
    """
    return (log or LOG).track(stage, device=device)


# ===================================================================== a model, part by part


def logical_numel(param) -> int:
    """Elements a parameter stands for: a packed 4-bit weight holds two values per byte, so its
    true count is the product of ``quant_state.shape``, not ``numel()`` of its storage."""
    state = getattr(param, "quant_state", None)
    if _is_params4bit(param) and getattr(state, "shape", None) is not None:
        return math.prod(state.shape)
    return param.numel()


def _is_params4bit(p) -> bool:
    return type(p).__name__ == "Params4bit" and getattr(p, "quant_state", None) is not None


def _quant_state_tensors(qs) -> dict:
    """The tensors a 4-bit weight's quant_state holds, grouped: absmax, second-level, tables."""
    out = {"absmax": [], "second": [], "tables": []}
    if qs is None:
        return out
    if getattr(qs, "absmax", None) is not None:
        out["absmax"].append(qs.absmax)
    for name in ("code", "offset"):
        t = getattr(qs, name, None)
        if torch.is_tensor(t):
            out["tables"].append(t)
    s2 = getattr(qs, "state2", None)
    if s2 is not None:
        if torch.is_tensor(getattr(s2, "absmax", None)):
            out["second"].append(s2.absmax)
        if torch.is_tensor(getattr(s2, "code", None)):
            out["tables"].append(s2.code)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.nelement() * t.element_size()


def _module_of_param(model) -> dict:
    """param name -> the module that owns it."""
    owners = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owners[f"{mname}.{pname}" if mname else pname] = module
    return owners


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
    owners = _module_of_param(model)
    try:
        out_emb = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        out_emb = None
    head_ids = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()

    parts = {}  # part -> [bytes, params, set(dtypes), in_footprint, note]

    def add(part, nbytes, nparams, dtype, in_fp, note):
        row = parts.setdefault(part, [0, 0, set(), in_fp, note])
        row[0] += nbytes
        row[1] += nparams
        row[2].add(str(dtype).replace("torch.", ""))

    seen_q = set()
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        module = owners.get(name)
        mtype = type(module).__name__ if module is not None else ""
        if _is_params4bit(p):
            qs = p.quant_state
            add("4-bit linear weights", _nbytes(p), logical_numel(p), p.dtype, True,
                "two 4-bit values packed per byte")
            groups = _quant_state_tensors(qs)
            nested = getattr(qs, "nested", False)
            constants = [
                ("absmax", "quantization constants: absmax (8-bit)" if nested
                 else "quantization constants: absmax (float32)",
                 "one per block of 64 weights"),
                ("second", "quantization constants: second level (float32)",
                 "double quantization: one per 256 absmax values"),
                ("tables", "quantization constants: code tables and offsets",
                 "NF4/FP4 value table and the 8-bit absmax table per weight"),
            ]
            for group, part, why in constants:
                for t in groups[group]:
                    if t.data_ptr() in seen_q:
                        continue
                    seen_q.add(t.data_ptr())
                    add(part, _nbytes(t), 0, t.dtype, False,
                        f"{why}; not counted by get_memory_footprint")
            continue
        n = p.nelement()
        if "lora_" in name:
            part, note = "LoRA adapters", "trainable A and B matrices"
        elif id(p) in head_ids:
            part, note = "output head", "lm_head, never quantized"
        elif isinstance(module, torch.nn.Embedding):
            part, note = "embeddings", "token (and position) embeddings, never quantized"
        elif "norm" in mtype.lower():
            part, note = "norms", "LayerNorm/RMSNorm weights (and biases)"
        elif name.endswith(".bias"):
            part, note = "biases", "biases of the linear layers, never quantized"
        else:
            part, note = "other 16-bit parameters", "parameters of other layers"
        add(part, _nbytes(p), n, p.dtype, True, note)

    for _, b in model.named_buffers():
        add("buffers", _nbytes(b), 0, b.dtype, True,
            "non-trainable tensors such as rotary frequencies")

    order = ["4-bit linear weights", "quantization constants: absmax (8-bit)",
             "quantization constants: absmax (float32)",
             "quantization constants: second level (float32)",
             "quantization constants: code tables and offsets", "embeddings", "output head",
             "norms", "biases", "other 16-bit parameters", "LoRA adapters", "buffers"]
    rows = []
    for part in sorted(parts, key=lambda k: order.index(k) if k in order else len(order)):
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
    """A :func:`footprint_breakdown` as a text table with its two totals."""
    tot = footprint_totals(rows)
    w = max(len(r["part"]) for r in rows) if rows else 10
    lines = [f"{'part':{w}}  {'bytes':>10}  {'share':>6}  {'params':>14}  dtype"]
    for r in rows:
        star = "" if r["in_footprint"] else " *"
        share = r["bytes"] / tot["resident"] if tot["resident"] else 0
        lines.append(f"{r['part']:{w}}  {fmt_bytes(r['bytes']):>10}  {share:6.1%}  "
                     f"{r['params']:>14,}  {r['dtypes']}{star}")
    lines.append(f"{'get_memory_footprint (parameters + buffers)':{w}}  "
                 f"{fmt_bytes(tot['footprint']):>10}")
    lines.append(f"{'resident (with the * quantization constants)':{w}}  "
                 f"{fmt_bytes(tot['resident']):>10}")
    return "\n".join(lines)


def _param_counts(model) -> tuple[int, int]:
    """(weights stored in 4-bit, other base-model weights), LoRA parameters excluded."""
    n4 = n16 = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        if _is_params4bit(p):
            n4 += logical_numel(p)
        else:
            n16 += p.nelement()
    return n4, n16


def footprint_16bit(model_or_config) -> int:
    """What the same model weighs in 16-bit: 2 bytes for every parameter (LoRA excluded).

    Given a loaded model, its 4-bit weights count with their original shapes and its buffers with
    their actual size; given a config (or a :class:`ModelShape`), parameters only.
    """
    if isinstance(model_or_config, torch.nn.Module):
        n4, n16 = _param_counts(model_or_config)
        bufs = sum(_nbytes(b) for b in model_or_config.buffers())
        return 2 * (n4 + n16) + bufs
    shape = as_shape(model_or_config)
    return 2 * shape.n_params()


def quantized_weight_bytes(n: int, *, double_quant: bool = True, blocksize: int = BLOCKSIZE,
                           tables: bool = True) -> dict:
    """Bytes of one weight of ``n`` values in bitsandbytes 4-bit (NF4 and FP4 alike).

    ``packed``: ceil(n/2). ``constants``: without double quantization one float32 absmax per
    block of ``blocksize``; with it one uint8 absmax per block, one float32 per 256 of those,
    a 256-entry float32 table and a float32 offset; both add the 16-entry 4-bit value table.
    """
    blocks = math.ceil(n / blocksize)
    if double_quant:
        const = blocks + 4 * math.ceil(blocks / DQ_BLOCKSIZE)
        table = 4 * 256 + 4 + 4 * 16
    else:
        const = 4 * blocks
        table = 4 * 16
    return {"packed": (n + 1) // 2, "constants": const + (table if tables else 0)}


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


_ATTN_PAT = re.compile(r"(attn|attention|q_proj|k_proj|v_proj|o_proj|out_proj|query|key|value|"
                       r"qkv|c_proj\b)")
_MLP_PAT = re.compile(r"(mlp|fc1|fc2|fc_in|fc_out|gate_proj|up_proj|down_proj|dense_h_to_4h|"
                      r"dense_4h_to_h|feed_forward|ffn|w1|w2|w3)")
_SKIP_PAT = re.compile(r"(embed|wte|wpe|lm_head|embed_out|score)")


def linear_group(name: str) -> str:
    """"attention", "MLP" or "other linear" for a linear layer's module name."""
    low = name.lower()
    if _MLP_PAT.search(low):
        return "MLP"
    if _ATTN_PAT.search(low):
        return "attention"
    return "other linear"


def quantization_error(model_or_state_dict_16bit, quant_types=("nf4", "fp4"),
                       blocksize: int = BLOCKSIZE, double_quant: bool = False,
                       max_weights: int | None = None) -> list[dict]:
    """Relative error ||W - dequant(quant(W))|| / ||W|| of 4-bit quantization, by layer type.

    Input: a 16-bit (or float32) model, or a dict name -> weight. Every 2-D linear weight is
    quantized with ``bitsandbytes.functional.quantize_4bit`` and dequantized back (works on CPU);
    embeddings and the head are skipped, since QLoRA keeps them 16-bit. The error of a group is
    the Frobenius norm of all its weights' errors over the norm of all its weights.
    ``max_weights`` caps how many weights are measured (quick looks at big models).
    Introduced in notebook 02.
    """
    import bitsandbytes.functional as bnbf

    if isinstance(model_or_state_dict_16bit, torch.nn.Module):
        weights = {}
        for mname, module in model_or_state_dict_16bit.named_modules():
            if isinstance(module, torch.nn.Linear) and not _SKIP_PAT.search(mname):
                if _is_params4bit(module.weight):
                    raise ValueError(f"{mname} is already 4-bit: give quantization_error the "
                                     "16-bit model (or its state dict), not the quantized one")
                weights[mname] = module.weight
    elif isinstance(model_or_state_dict_16bit, Mapping):
        weights = {k: v for k, v in model_or_state_dict_16bit.items()
                   if torch.is_tensor(v) and v.dim() == 2 and not _SKIP_PAT.search(k)}
    else:
        raise TypeError("quantization_error takes a torch model or a dict name -> weight tensor")
    if not weights:
        raise ValueError("no 2-D linear weights found to quantize")
    items = list(weights.items())[: max_weights or None]
    acc = {}  # (group, qtype) -> [err2, ref2, n_weights, n_params]
    for name, w in items:
        w = w.detach()
        if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            w = w.float()
        group = linear_group(name)
        ref2 = w.float().pow(2).sum().item()
        for qt in quant_types:
            q, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                          quant_type=qt)
            deq = bnbf.dequantize_4bit(q, state)
            err2 = (w.float() - deq.float()).pow(2).sum().item()
            a = acc.setdefault((group, qt), [0.0, 0.0, 0, 0])
            a[0] += err2
            a[1] += ref2
            a[2] += 1
            a[3] += w.nelement()
    rows = []
    for (group, qt), (err2, ref2, nw, npar) in sorted(acc.items()):
        rows.append({"group": group, "quant_type": qt, "weights": nw, "params": npar,
                     "relative_error": math.sqrt(err2 / ref2) if ref2 else 0.0})
    return rows


# ============================================================================ model shapes


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer of a transformer block: name, in/out features, bias, group."""

    name: str
    d_in: int
    d_out: int
    bias: bool = False
    group: str = "attention"  # attention | mlp

    @property
    def params(self) -> int:
        return self.d_in * self.d_out


@dataclass(frozen=True)
class ModelShape:
    """What the estimator needs to know about a causal LM, from its config alone."""

    name: str
    family: str  # gpt_neox | gptj | llama (also mistral, qwen2, ...) | opt | generic
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    context: int
    tied_embeddings: bool
    linears: tuple  # LinearSpec per block
    norm: str = "layernorm"  # layernorm | rmsnorm
    norms_per_block: int = 2
    parallel_residual: bool = False  # attention and MLP read the same input (GPT-NeoX, GPT-J)
    activation: str = "gelu"
    gated_mlp: bool = False
    head_bias: bool = False
    position_embeddings: int = 0  # learned position rows (OPT); 0 with rotary embeddings
    resid_dropout: float = 0.0
    attn_dropout: float = 0.0
    extra_linears: tuple = ()  # quantized linears outside the blocks (OPT's project_in/out)
    embed_dim: int = 0  # width of the token embeddings and head when it differs from hidden
    buffer_bytes: int = 0  # rotary tables (float32 buffers; get_memory_footprint counts them)

    # ---- parameter counts
    def n_linear_params(self) -> int:
        """Weights of the linear layers that are stored in 4-bit (all blocks)."""
        per_block = sum(s.params for s in self.linears)
        return self.layers * per_block + sum(s.params for s in self.extra_linears)

    def n_embedding_params(self) -> int:
        return self.vocab * (self.embed_dim or self.hidden) + \
            self.position_embeddings * self.hidden

    def n_head_params(self) -> int:
        bias = self.vocab if self.head_bias else 0
        if self.tied_embeddings:
            return bias
        return self.vocab * (self.embed_dim or self.hidden) + bias

    @property
    def params_per_norm(self) -> int:
        """A LayerNorm has a weight and a bias; an RMSNorm a weight only."""
        return self.hidden * (2 if self.norm == "layernorm" else 1)

    def n_norm_params(self) -> int:
        return (self.layers * self.norms_per_block + 1) * self.params_per_norm

    def n_bias_params(self) -> int:
        return self.layers * sum(s.d_out for s in self.linears if s.bias) + \
            sum(s.d_out for s in self.extra_linears if s.bias)

    def n_16bit_params(self) -> int:
        """Parameters that stay 16-bit: embeddings, head, norms, biases."""
        return (self.n_embedding_params() + self.n_head_params() + self.n_norm_params()
                + self.n_bias_params())

    def n_params(self) -> int:
        return self.n_linear_params() + self.n_16bit_params()

    def linear_names(self) -> list[str]:
        return [s.name for s in self.linears]


def _cfg_get(cfg, *names, default=None):
    for n in names:
        v = cfg.get(n) if isinstance(cfg, Mapping) else getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _as_config(config):
    """A transformers config object from a config, a dict (with model_type) or a model."""
    if hasattr(config, "config") and isinstance(config, torch.nn.Module):
        return config.config
    if isinstance(config, Mapping):
        d = dict(config)
        mt = d.get("model_type")
        if mt:
            try:
                from transformers import AutoConfig

                d.pop("model_type")
                return AutoConfig.for_model(mt, **d)
            except (ValueError, KeyError, TypeError):
                d["model_type"] = mt
        return d
    return config


_GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral", "olmo",
          "olmo2", "granite", "stablelm", "cohere", "internlm2", "yi", "deepseek"}


def shape_from_config(config, name: str | None = None) -> ModelShape:
    """The :class:`ModelShape` of a transformers config (object or dict) or of a loaded model.

    Handles GPT-NeoX (fused query_key_value of width 3h, dense, dense_h_to_4h, dense_4h_to_h),
    GPT-J (q_proj, k_proj, v_proj, out_proj, fc_in, fc_out), Llama/Mistral/Qwen2 and their kin
    (q, k, v with grouped key/value heads, o, gate, up, down) and OPT (q, k, v, out_proj, fc1,
    fc2); anything else is read from the usual config names as a Llama-like block when its
    activation is SiLU, else as a GPT-like one.
    """
    cfg = _as_config(config)
    mt = str(_cfg_get(cfg, "model_type", default="")).lower()
    name = name or _cfg_get(cfg, "_name_or_path", "name_or_path", default="") or mt or "model"
    h = int(_cfg_get(cfg, "hidden_size", "n_embd", "d_model", "dim"))
    L = int(_cfg_get(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers"))
    a = int(_cfg_get(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads"))
    kv = int(_cfg_get(cfg, "num_key_value_heads", "n_kv_heads", default=a) or a)
    hd = int(_cfg_get(cfg, "head_dim", default=0) or h // a)
    V = int(_cfg_get(cfg, "vocab_size"))
    ctx = int(_cfg_get(cfg, "max_position_embeddings", "n_positions", "n_ctx",
                       "max_sequence_length", "seq_length", default=2048))
    tie_default = mt in ("opt", "gemma", "gemma2")
    tied = bool(_cfg_get(cfg, "tie_word_embeddings", default=tie_default))

    if mt == "gpt_neox":
        ff = int(_cfg_get(cfg, "intermediate_size", default=4 * h))
        bias = bool(_cfg_get(cfg, "attention_bias", default=True))
        linears = (LinearSpec("query_key_value", h, 3 * h, bias, "attention"),
                   LinearSpec("dense", h, h, bias, "attention"),
                   LinearSpec("dense_h_to_4h", h, ff, True, "mlp"),
                   LinearSpec("dense_4h_to_h", ff, h, True, "mlp"))
        return ModelShape(
            name=name, family="gpt_neox", vocab=V, hidden=h, layers=L, heads=a, kv_heads=a,
            head_dim=h // a, intermediate=ff, context=ctx, tied_embeddings=tied,
            linears=linears, norm="layernorm", norms_per_block=2,
            parallel_residual=bool(_cfg_get(cfg, "use_parallel_residual", default=True)),
            activation=str(_cfg_get(cfg, "hidden_act", default="gelu")),
            resid_dropout=float(_cfg_get(cfg, "hidden_dropout", default=0.0)),
            attn_dropout=float(_cfg_get(cfg, "attention_dropout", default=0.0)),
            buffer_bytes=_inv_freq_bytes(cfg, h // a))
    if mt == "gptj":
        ff = int(_cfg_get(cfg, "n_inner", default=4 * h) or 4 * h)
        linears = (LinearSpec("q_proj", h, h, False, "attention"),
                   LinearSpec("k_proj", h, h, False, "attention"),
                   LinearSpec("v_proj", h, h, False, "attention"),
                   LinearSpec("out_proj", h, h, False, "attention"),
                   LinearSpec("fc_in", h, ff, True, "mlp"),
                   LinearSpec("fc_out", ff, h, True, "mlp"))
        return ModelShape(
            name=name, family="gptj", vocab=V, hidden=h, layers=L, heads=a, kv_heads=a,
            head_dim=h // a, intermediate=ff, context=ctx, tied_embeddings=tied,
            linears=linears, norm="layernorm", norms_per_block=1, parallel_residual=True,
            activation=str(_cfg_get(cfg, "activation_function", default="gelu_new")),
            head_bias=True, resid_dropout=float(_cfg_get(cfg, "resid_pdrop", default=0.0)),
            attn_dropout=float(_cfg_get(cfg, "attn_pdrop", default=0.0)),
            # one sin/cos table of context x rotary_dim float32 values
            buffer_bytes=4 * ctx * int(_cfg_get(cfg, "rotary_dim", default=h // a) or h))
    if mt == "opt":
        ff = int(_cfg_get(cfg, "ffn_dim", default=4 * h))
        bias = bool(_cfg_get(cfg, "enable_bias", default=True))
        proj = int(_cfg_get(cfg, "word_embed_proj_dim", default=h) or h)
        linears = (LinearSpec("q_proj", h, h, bias, "attention"),
                   LinearSpec("k_proj", h, h, bias, "attention"),
                   LinearSpec("v_proj", h, h, bias, "attention"),
                   LinearSpec("out_proj", h, h, bias, "attention"),
                   LinearSpec("fc1", h, ff, bias, "mlp"),
                   LinearSpec("fc2", ff, h, bias, "mlp"))
        extra = ()
        if proj != h:
            extra = (LinearSpec("project_in", proj, h, False, "other"),
                     LinearSpec("project_out", h, proj, False, "other"))
        shape = ModelShape(
            name=name, family="opt", vocab=V, hidden=h, layers=L, heads=a, kv_heads=a,
            head_dim=h // a, intermediate=ff, context=ctx, tied_embeddings=tied,
            linears=linears, norm="layernorm", norms_per_block=2, parallel_residual=False,
            activation=str(_cfg_get(cfg, "activation_function", default="relu")),
            position_embeddings=ctx + 2,
            resid_dropout=float(_cfg_get(cfg, "dropout", default=0.1)),
            attn_dropout=float(_cfg_get(cfg, "attention_dropout", default=0.0)),
            extra_linears=extra, embed_dim=proj)
        return shape

    act = str(_cfg_get(cfg, "hidden_act", "activation_function", default="gelu"))
    ff = int(_cfg_get(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * h) or 4 * h)
    gated = mt in _GATED or act in ("silu", "swiglu", "swish")
    if gated:
        qb = bool(_cfg_get(cfg, "attention_bias", default=mt == "qwen2"))
        mb = bool(_cfg_get(cfg, "mlp_bias", default=False))
        linears = (LinearSpec("q_proj", h, a * hd, qb, "attention"),
                   LinearSpec("k_proj", h, kv * hd, qb, "attention"),
                   LinearSpec("v_proj", h, kv * hd, qb, "attention"),
                   LinearSpec("o_proj", a * hd, h, bool(_cfg_get(cfg, "attention_bias",
                                                                 default=False)), "attention"),
                   LinearSpec("gate_proj", h, ff, mb, "mlp"),
                   LinearSpec("up_proj", h, ff, mb, "mlp"),
                   LinearSpec("down_proj", ff, h, mb, "mlp"))
        family = "llama" if mt in _GATED else "generic"
        return ModelShape(
            name=name, family=family, vocab=V, hidden=h, layers=L, heads=a, kv_heads=kv,
            head_dim=hd, intermediate=ff, context=ctx, tied_embeddings=tied, linears=linears,
            norm="rmsnorm", norms_per_block=2, parallel_residual=False, activation=act,
            gated_mlp=True, attn_dropout=float(_cfg_get(cfg, "attention_dropout", default=0.0)),
            buffer_bytes=_inv_freq_bytes(cfg, hd))
    linears = (LinearSpec("q_proj", h, a * hd, True, "attention"),
               LinearSpec("k_proj", h, kv * hd, True, "attention"),
               LinearSpec("v_proj", h, kv * hd, True, "attention"),
               LinearSpec("out_proj", a * hd, h, True, "attention"),
               LinearSpec("fc_in", h, ff, True, "mlp"),
               LinearSpec("fc_out", ff, h, True, "mlp"))
    return ModelShape(
        name=name, family="generic", vocab=V, hidden=h, layers=L, heads=a, kv_heads=kv,
        head_dim=hd, intermediate=ff, context=ctx, tied_embeddings=tied, linears=linears,
        norm="layernorm", norms_per_block=2, parallel_residual=False, activation=act)


def _inv_freq_bytes(cfg, head_dim: int) -> int:
    """Rotary inverse frequencies: two float32 vectors (inv_freq, original_inv_freq) of half the
    rotary width."""
    rope = _cfg_get(cfg, "rope_parameters", "rope_scaling", default=None) or {}
    pct = float(_cfg_get(cfg, "rotary_pct", "partial_rotary_factor", default=None)
                or (rope.get("partial_rotary_factor") if isinstance(rope, Mapping) else None)
                or 1.0)
    return 2 * 4 * (int(head_dim * pct) // 2)


def as_shape(x) -> ModelShape:
    """A ModelShape from a ModelShape, a preset name, a config, a config dict or a model."""
    if isinstance(x, ModelShape):
        return x
    if isinstance(x, str):
        if x in PRESETS:
            return PRESETS[x]
        raise ValueError(f"no model preset named {x!r}; presets: {', '.join(PRESETS) or 'none'} "
                         f"(add a config JSON to {CONFIG_DIR.name}/ or pass a config)")
    return shape_from_config(x)


class _Presets(Mapping):
    """Model presets, name -> ModelShape, read lazily from ``helpers/configs/*.json``."""

    def __init__(self, folder: Path):
        self._folder = folder
        self._shapes: dict | None = None

    def _load(self) -> dict:
        if self._shapes is None:
            shapes = {}
            for p in sorted(self._folder.glob("*.json")) if self._folder.is_dir() else []:
                try:
                    shapes[p.stem] = shape_from_config(json.loads(p.read_text()), name=p.stem)
                except (ValueError, KeyError, TypeError) as err:
                    raise ValueError(f"model preset {p.name} is not a usable config ({err}); "
                                     "it needs model_type, hidden_size, num_hidden_layers, "
                                     "num_attention_heads and vocab_size") from None
            self._shapes = shapes
        return self._shapes

    def reload(self) -> None:
        self._shapes = None

    def __getitem__(self, key):
        return self._load()[key]

    def __iter__(self):
        return iter(self._load())

    def __len__(self):
        return len(self._load())


PRESETS: Mapping = _Presets(CONFIG_DIR)


# ============================================================================== the estimator

_OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch",
               "adamw_torch_fused", "sgd")

# Tensors an activation function saves for backward, per element of the MLP's hidden width.
# torch's fused kernels (gelu, relu, silu, gelu with tanh) save one tensor; the formulas that
# transformers writes out in Python save each intermediate that a later multiply or tanh needs:
# gelu_new (GPT-J's) 4 of them, gelu_fast 7, quick_gelu 2 (checked with saved-tensor hooks).
_ACT_SAVES = {"gelu": 1, "relu": 1, "silu": 1, "swish": 1, "gelu_pytorch_tanh": 1,
              "gelu_new": 4, "gelu_fast": 7, "quick_gelu": 2, "gelu_python": 1}


def _dtype_bytes(dtype) -> int:
    if isinstance(dtype, str):
        key = dtype.replace("torch.", "").lower()
        dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                 "fp16": torch.float16, "half": torch.float16, "float32": torch.float32,
                 "fp32": torch.float32, "float": torch.float32}.get(key)
        if dtype is None:
            raise ValueError("compute_dtype must be bfloat16, float16 or float32")
    return torch.tensor([], dtype=dtype).element_size()


def _lora_specs(shape: ModelShape, targets) -> list[LinearSpec]:
    """The block linears that get a LoRA adapter."""
    if targets in (None, "", "none"):
        return []
    if isinstance(targets, str) and targets == "all-linear":
        return list(shape.linears)
    if isinstance(targets, str) and targets == "attention":
        return [s for s in shape.linears if s.group == "attention"]
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)
             if t.strip()]
    known = shape.linear_names()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"LoRA target(s) {', '.join(unknown)} are not linear layers of "
                         f"{shape.name} ({shape.family}); its layers are: {', '.join(known)} "
                         "(or use 'all-linear' / 'attention')")
    return [s for s in shape.linears if s.name in names]


@dataclass
class Item:
    """One line of an estimate: its size, how much of it is held at the predicted peak, and why."""

    key: str
    label: str
    bytes: int  # size of this item when it exists
    at_peak: int  # the part of it held at the moment of the predicted peak
    explanation: str
    allocator: bool = True  # True: counted by torch.cuda.max_memory_allocated


@dataclass
class Estimate:
    """Predicted GPU memory of one QLoRA training step (bytes), item by item.

    ``total_allocated`` is comparable with ``torch.cuda.max_memory_allocated()``; it is the sum
    of the allocator items' ``at_peak``. ``total_device`` adds what the card must hold besides:
    the CUDA context, the caching allocator's slack, and the optimizer state that paged
    optimizers keep in unified memory (outside torch's allocator). ``footprint`` is what
    ``get_memory_footprint()`` reports right after loading.
    """

    shape: ModelShape
    settings: dict
    items: list
    total_allocated: int
    total_device: int
    footprint: int
    peak_phase: str
    activation_detail: dict = field(default_factory=dict)

    def breakdown(self) -> dict:
        """key -> bytes held at the peak (every item, device-only ones included)."""
        return {i.key: i.at_peak for i in self.items}

    def rows(self) -> list[dict]:
        return [dataclasses.asdict(i) for i in self.items]

    def text(self) -> str:
        w = max(len(i.label) for i in self.items)
        s = self.settings
        head = (f"{self.shape.name}: seq {s['seq_len']} x micro-batch {s['micro_batch']}, "
                f"LoRA r={s['lora_r']}, checkpointing "
                f"{'on' if s['gradient_checkpointing'] else 'off'}, {s['optimizer']}")
        lines = [head]
        for i in self.items:
            held = fmt_bytes(i.at_peak) if i.at_peak == i.bytes else \
                f"{fmt_bytes(i.at_peak)} (of {fmt_bytes(i.bytes)})"
            lines.append(f"  {i.label:{w}}  {held:>22}  {i.explanation}")
        lines.append(f"  {'peak allocated (max_memory_allocated)':{w}}  "
                     f"{fmt_bytes(self.total_allocated):>22}  at: {self.peak_phase}")
        lines.append(f"  {'card memory needed':{w}}  {fmt_bytes(self.total_device):>22}")
        return "\n".join(lines)

    __str__ = text

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(i.label)}</td><td style='text-align:right'>"
            f"{fmt_bytes(i.at_peak)}</td><td>{html.escape(i.explanation)}</td></tr>"
            for i in self.items)
        return (f"<table><thead><tr><th>item</th><th>at peak</th><th>why</th></tr></thead>"
                f"<tbody>{rows}<tr><th>peak allocated</th><th>{fmt_bytes(self.total_allocated)}"
                f"</th><td>{html.escape(self.peak_phase)}</td></tr><tr><th>card memory needed"
                f"</th><th>{fmt_bytes(self.total_device)}</th><td></td></tr></tbody></table>")

    def as_metrics(self, prefix: str = "") -> dict:
        out = {f"{prefix}predicted_{i.key}_bytes": i.at_peak for i in self.items}
        out[f"{prefix}predicted_peak_allocated_bytes"] = self.total_allocated
        out[f"{prefix}predicted_device_bytes"] = self.total_device
        out[f"{prefix}predicted_footprint_bytes"] = self.footprint
        return out


def estimate(shape, *, seq_len: int, micro_batch: int = 1, gradient_checkpointing: bool = True,
             lora_r: int = 16, lora_targets="all-linear", optimizer: str = "paged_adamw_8bit",
             compute_dtype=torch.bfloat16, double_quant: bool = True, cuda_context: bool = True,
             upcast_fp32: bool = False, autocast: bool | None = None,
             lora_dropout: float = 0.05, attention: str = "sdpa", use_cache: bool = False,
             chunked_loss: bool = True, context_bytes: int = CUDA_CONTEXT_BYTES,
             allocator_slack: float = ALLOCATOR_SLACK) -> Estimate:
    """Predict the peak GPU memory of a QLoRA training step, item by item.

    ``shape``: a :class:`ModelShape` (or a config, preset name or model). Settings:
    ``seq_len`` x ``micro_batch`` tokens per forward; ``gradient_checkpointing``; LoRA rank and
    targets ("all-linear", "attention" or module names); the optimizer; ``compute_dtype`` of the
    4-bit layers and of the 16-bit ones; ``upcast_fp32``: embeddings, head and norms cast to
    float32 as ``prepare_model_for_kbit_training`` does (the original recipe; the series makes it
    optional); ``autocast``: the Trainer's fp16/bf16 mixed-precision flag (default: on unless the
    compute dtype is float32); ``use_cache``: the model's ``config.use_cache`` during training
    (a key/value cache is then built in every forward without checkpointing: set it False, as the
    recipe does); ``chunked_loss``: the loss of :mod:`helpers.losses` (the series' default,
    CHUNKED_LOSS), whose logits exist one chunk of positions at a time, instead of the standard
    loss over the whole sequence's logits (False: the original recipe, a plain Trainer);
    ``cuda_context``: False on CPU.

    The activation model follows what autograd really saves in transformers 5 with bitsandbytes
    4-bit layers and peft LoRA (checked with saved-tensor hooks on each family); the module's
    comments explain every term. Calibrated against GPU measurements (tests/test_memory.py).
    Introduced in notebook 01.
    """
    shape = as_shape(shape)
    if seq_len <= 0 or micro_batch <= 0:
        raise ValueError("seq_len and micro_batch must be positive")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r} unknown; choose one of {', '.join(_OPTIMIZERS)}")
    if attention not in ("sdpa", "eager"):
        raise ValueError("attention must be 'sdpa' (default in transformers 5) or 'eager'")
    cb = _dtype_bytes(compute_dtype)  # bytes of the compute dtype (2 or 4)
    fp32 = cb == 4
    if autocast is None:  # the series' flags: autocast for float16 only (env.precision_flags)
        autocast = compute_dtype == torch.float16
    settings = {"seq_len": seq_len, "micro_batch": micro_batch,
                "gradient_checkpointing": gradient_checkpointing, "lora_r": lora_r,
                "lora_targets": lora_targets, "optimizer": optimizer,
                "compute_dtype": str(compute_dtype).replace("torch.", ""),
                "double_quant": double_quant, "cuda_context": cuda_context,
                "upcast_fp32": upcast_fp32, "autocast": autocast, "lora_dropout": lora_dropout,
                "attention": attention, "use_cache": use_cache, "chunked_loss": chunked_loss,
                "context_bytes": context_bytes,
                "allocator_slack": allocator_slack}
    h, V, L, ff = shape.hidden, shape.vocab, shape.layers, shape.intermediate
    T = seq_len * micro_batch  # tokens per forward pass

    # ---------------------------------------------------------------- weights (persistent)
    # 4-bit linears: packed values plus constants, per weight (exact bitsandbytes layout).
    specs = [s for s in shape.linears for _ in range(shape.layers)] + list(shape.extra_linears)
    packed = const = 0
    for s in specs:
        q = quantized_weight_bytes(s.params, double_quant=double_quant)
        packed += q["packed"]
        const += q["constants"]
    # Non-quantized layers load in the compute dtype (2 bytes; 4 in float32) and, with
    # upcast_fp32, prepare_model_for_kbit_training casts them to float32 (4 bytes).
    load_b = cb
    wb = 4 if upcast_fp32 else cb
    n_emb, n_head = shape.n_embedding_params(), shape.n_head_params()
    n_small = shape.n_norm_params() + shape.n_bias_params()

    # ---------------------------------------------------------------- LoRA and the optimizer
    lora = _lora_specs(shape, lora_targets)
    lora_mats = []  # numel of every LoRA matrix (A: r x d_in, B: d_out x r)
    for s in lora:
        lora_mats += [lora_r * s.d_in, s.d_out * lora_r] * shape.layers
    n_lora = sum(lora_mats)
    lora_b = 4  # peft 0.21 creates LoRA weights in float32 (autocast_adapter_dtype=True)
    opt_alloc = opt_paged = 0
    for n in lora_mats:
        if optimizer in ("paged_adamw_8bit", "adamw_8bit"):
            # bitsandbytes keeps two uint8 states plus one float32 absmax per 256 values for
            # tensors of >= 4096 values (min_8bit_size); smaller ones get two float32 states.
            if n >= 4096:
                state, absmax = 2 * n, 2 * 4 * math.ceil(n / 256)
            else:
                state, absmax = 8 * n, 0
        elif optimizer == "sgd":
            state, absmax = 0, 0
        else:  # adamw_torch / paged_adamw_32bit: exp_avg and exp_avg_sq in float32
            state, absmax = 8 * n, 0
        # paged optimizers put a state in unified memory (outside torch's allocator) only for
        # tensors of >= 1e5 values; smaller ones are ordinary device tensors.
        if optimizer.startswith("paged") and n >= 1e5:
            opt_paged += state
            opt_alloc += absmax
        else:
            opt_alloc += state + absmax

    # ---------------------------------------------------------------- activations
    # dtypes of what autograd saves (bytes per element):
    # - hb: the residual stream between blocks. Under autocast LayerNorm runs in float32, and a
    #   bitsandbytes Linear4bit returns its input's dtype, so GPT-NeoX/GPT-J/OPT blocks carry a
    #   float32 stream; Llama's RMSNorm returns the stream's own dtype, float32 only when the
    #   embeddings were upcast. Without autocast the stream has the weights' dtype.
    # - c16: q, k, v and the attention output as sdpa saves them: 16-bit under autocast.
    # - li: LoRA A's saved input: 16-bit under autocast; without autocast the series computes
    #   LoRA in the stream's dtype (helpers.lora.attach), so the stream's own tensor.
    if shape.norm == "layernorm":
        hb = 4 if (autocast or upcast_fp32 or fp32) else 2
    else:
        hb = 4 if (upcast_fp32 or fp32) else 2
    c16 = 2 if autocast else hb
    li = 2 if autocast else hb
    norm_save = 4 if (autocast or hb == 4 or shape.norm == "rmsnorm") else hb
    q_dim = shape.heads * shape.head_dim

    # Without checkpointing every block keeps, per token, the sum of the parts below. For
    # comparison, Korthikanti et al. (2022) count s*b*h*(34 + 5*a*s/h) bytes per block for
    # 16-bit full fine-tuning with eager attention and dropout; here the 4-bit linears keep no
    # inputs (no weight gradient), sdpa keeps no s x s scores, and what is kept is often float32:
    # GPT-NeoX-20B with the recipe's settings keeps 31*h bytes per token (GELU), 127*h with
    # gelu_fast, whose Python formula keeps 7 tensors of the MLP width.
    per_tok = {}  # bytes saved per token in one block, by part
    # Norms save their input (a float32 copy under autocast or for RMSNorm) plus per-token
    # statistics; blocks with a parallel residual feed both norms the same input: one copy.
    n_norm_inputs = 1 if shape.parallel_residual else shape.norms_per_block
    per_tok["norms"] = n_norm_inputs * (norm_save * h + 8)
    # 4-bit linears save nothing but their (already resident) packed weight: bitsandbytes
    # computes no weight gradient, so the input is not kept. LoRA adapters do keep activations
    # (see _lora_saved_per_token): A's input, a dropout mask, and B's r-wide input.
    per_tok["lora"] = _lora_saved_per_token(shape, lora, lora_r, lora_dropout, li,
                                            norm_out=4 if (shape.norm == "layernorm"
                                                           and autocast) else hb,
                                            attn_out=c16, mlp_out=hb)
    # Attention. sdpa (flash / memory-efficient kernels) saves q, k, v, the output and a
    # float32 log-sum-exp per head: no seq x seq matrix. Keys and values are counted at the
    # query width: with a padding mask transformers repeats grouped key/value heads before sdpa.
    if attention == "sdpa":
        per_tok["attention"] = 4 * q_dim * c16 + 4 * shape.heads
    else:
        # eager: q and k (float32 in GPT-J's upcast), v, and per head the softmax output
        # (float32) and its 16-bit copy for the matmul with v: the 5*a*s/h-like term of
        # Korthikanti et al. (2022), here 4 + 2 bytes per score.
        per_tok["attention"] = 2 * q_dim * 4 + q_dim * c16 + \
            shape.heads * seq_len * (4 + c16 + (1 if shape.attn_dropout > 0 else 0))
    # MLP: the activation function saves its input (and a written-out formula its
    # intermediates); a gated MLP also keeps act(gate) and up for their product.
    saves = _ACT_SAVES.get(shape.activation, 1)
    per_tok["mlp"] = (saves + (2 if shape.gated_mlp else 0)) * ff * hb
    # Dropout on the residual branches keeps a 1-byte mask each (OPT's 0.1; 0 in most LLMs).
    per_tok["dropout"] = (2 * h if shape.resid_dropout > 0 else 0)
    layer_saved = T * sum(per_tok.values())
    # Each float32 LoRA weight is cast to the 16-bit compute dtype once per forward (by autocast,
    # or by the series' LoRA layers without it) and the copy is kept for backward.
    lora_casts = 2 * n_lora if (autocast or hb == 2) else 0

    checkpoints = L * T * h * hb  # with checkpointing: each block's input hidden state
    acts_all = L * layer_saved
    held_acts = (checkpoints if gradient_checkpointing else acts_all) + lora_casts

    # Head and loss. A float32 head under autocast is cast to 16-bit for its matmul and the
    # copy is saved for backward (V*h*2 bytes). transformers computes the loss on
    # logits.float(): at the end of the forward the 16-bit logits, their float32 copy and
    # log_softmax's saved output coexist (2 + 4 + 4 bytes per logit); at the start of backward
    # log_softmax's output, the loss gradient and log_softmax's input gradient (4 + 4 + 4).
    # With the chunked loss (helpers.losses) the same happens to one chunk of positions at a
    # time (its logits are recomputed in backward), and the labelled positions' final hidden
    # states are gathered once, with their gradient (and index_select's) in backward. A
    # micro-batch of at most one chunk keeps the model's own loss.
    head_copy = V * h * 2 if (upcast_fp32 and autocast) else 0
    final_norm = T * (norm_save * h + 8)
    from helpers.losses import chunk_tokens

    chunked_loss = chunked_loss and T > chunk_tokens(V)  # one chunk: the model's own loss
    if chunked_loss:
        logit_tokens = chunk_tokens(V)
        head_in = 4 if (autocast and shape.norm == "layernorm") or hb == 4 else 2
        gathered = 3 * T * h * head_in
    else:
        logit_tokens, gathered = T, 0
    logits_fwd = 10 * logit_tokens * V + gathered // 3
    logits = 12 * logit_tokens * V + gathered
    # A key/value cache (config.use_cache=True, no checkpointing): every block's keys and values
    # in the stream dtype, alive until the model's output is dropped, just before backward.
    kv_cache = L * T * 2 * shape.kv_heads * shape.head_dim * hb \
        if (use_cache and not gradient_checkpointing) else 0

    # Backward through one block: with checkpointing it is recomputed (its saved tensors come
    # back), and the gradients in flight add a few stream-wide and MLP-wide tensors; the largest
    # 4-bit weight is dequantized to the compute dtype for the input-gradient matmul.
    grads_in_flight = 2 * T * h * 4 + 2 * T * ff * hb
    dequant = max(s.params for s in specs) * cb if specs else 0

    workspace = CUBLAS_WORKSPACE_BYTES if cuda_context else 0
    static = packed + const + n_emb * wb + n_head * wb + n_small * wb + shape.buffer_bytes + \
        n_lora * lora_b * 2 + opt_alloc + workspace
    phases = {
        "end of the forward (logits, loss, key/value cache)":
            static + held_acts + head_copy + final_norm + logits_fwd + kv_cache,
        "start of backward (logits and their gradient)":
            static + held_acts + head_copy + final_norm + logits,
        "backward through one block" + (" (recomputed)" if gradient_checkpointing else ""):
            static + held_acts + (layer_saved if gradient_checkpointing else 0)
            + grads_in_flight + dequant,
    }
    peak_phase = max(phases, key=phases.get)
    at_fwd, _at_loss, at_block = (peak_phase == p for p in phases)

    def on(x, when):
        return x if when else 0

    items = [
        Item("weights_4bit", "4-bit weights", packed, packed,
             f"{shape.n_linear_params() / 1e9:.2f}B linear weights, 2 per byte"),
        Item("quant_constants", "quantization constants", const, const,
             ("absmax in 8 bits + float32 per 256 blocks (double quantization): "
              f"{BITS_PER_PARAM_DQ:.3f} bits/weight in all") if double_quant else
             f"float32 absmax per block of 64: {BITS_PER_PARAM_NO_DQ} bits/weight in all"),
        Item("embeddings", "embeddings", n_emb * wb, n_emb * wb,
             f"{n_emb / 1e6:.0f}M parameters x {wb} bytes (never quantized)"),
        Item("lm_head", "output head", n_head * wb, n_head * wb,
             "tied to the embeddings" if shape.tied_embeddings and not shape.head_bias else
             f"{n_head / 1e6:.0f}M parameters x {wb} bytes (never quantized)"),
        Item("norms_biases", "norms, biases, buffers", n_small * wb + shape.buffer_bytes,
             n_small * wb + shape.buffer_bytes,
             f"{n_small / 1e6:.2f}M parameters x {wb} bytes, rotary tables"),
        Item("lora_params", "LoRA parameters", n_lora * lora_b, n_lora * lora_b,
             f"{n_lora / 1e6:.2f}M trainable parameters in float32 (peft's default)"),
        Item("lora_grads", "LoRA gradients", n_lora * lora_b, n_lora * lora_b,
             "float32, kept across gradient accumulation"),
        Item("optimizer", "optimizer state", opt_alloc, opt_alloc,
             _optimizer_note(optimizer)),
        Item("cublas_workspace", "cuBLAS workspaces", workspace, workspace,
             "matmul scratch space torch keeps per stream (GPU only)"),
        Item("activations", "saved activations",
             held_acts, held_acts,
             (f"{L} block inputs of {T} tokens x {h} x {hb} bytes (checkpointing)"
              + (", LoRA's 16-bit weight copies" if lora_casts else "")
              if gradient_checkpointing else
              f"{L} blocks x {T} tokens x {sum(per_tok.values()) / h:.1f}h bytes saved for "
              "backward (no checkpointing)")),
        Item("block_recompute", "one block in backward",
             (layer_saved if gradient_checkpointing else 0) + grads_in_flight,
             on((layer_saved if gradient_checkpointing else 0) + grads_in_flight, at_block),
             "the recomputed block's saved tensors and the gradients in flight"
             if gradient_checkpointing else "gradients in flight through one block"),
        Item("dequant_temp", "4-bit dequantization buffer", dequant, on(dequant, at_block),
             "the largest 4-bit weight dequantized for a matmul"),
        Item("head_copy", "16-bit copy of the head", head_copy,
             on(head_copy, not at_block), "autocast's copy of the float32 head, kept for backward"
             if head_copy else "none: the head is already 16-bit"),
        Item("logits", "logits and loss", logits + final_norm,
             (logits_fwd if at_fwd else logits) + final_norm if not at_block else 0,
             (f"one chunk of {logit_tokens} of {T} tokens x {V} vocab x 12 bytes (float32 "
              "logits, log-softmax, gradients; chunked loss) and the gathered hidden states"
              if chunked_loss else
              f"{T} tokens x {V} vocab x 12 bytes (float32 logits, log-softmax, gradients)")),
    ]
    if use_cache and not gradient_checkpointing:
        items.append(Item("kv_cache", "key/value cache", kv_cache, on(kv_cache, at_fwd),
                          "built in training while config.use_cache is True; set it False"))
    total_allocated = sum(i.at_peak for i in items)
    items += [Item("optimizer_paged", "paged optimizer state", opt_paged, opt_paged,
                   "in unified memory, outside torch's allocator; evicted to CPU RAM under "
                   "pressure", allocator=False)]
    items += _outside_allocator(items, total_allocated, cuda_context, allocator_slack,
                                context_bytes,
                                "driver context and kernels; not in max_memory_allocated")
    total_device = sum(i.at_peak for i in items)
    footprint = packed + (n_emb + n_head + n_small) * load_b + shape.buffer_bytes
    detail = {"per_token_per_block": per_tok, "stream_bytes": hb, "tokens": T,
              "phases": phases}
    return Estimate(shape=shape, settings=settings, items=items,
                    total_allocated=int(total_allocated), total_device=int(total_device),
                    footprint=int(footprint), peak_phase=peak_phase, activation_detail=detail)


# items that live only for part of a step (the allocator's slack grows with them)
_TRANSIENT_KEYS = ("block_recompute", "dequant_temp", "head_copy", "logits", "kv_cache")


def _outside_allocator(items, allocated: int, cuda_context: bool, slack_frac: float,
                       context_bytes: int, context_note: str) -> list:
    """The card's memory beside torch's allocated bytes: the caching allocator's slack (a share
    of the allocated plus a share of the short-lived buffers among ``items``) and the CUDA
    context; both zero without a CUDA context."""
    transient = sum(i.at_peak for i in items if i.key in _TRANSIENT_KEYS)
    slack = int(allocated * slack_frac + transient * TRANSIENT_SLACK) if cuda_context else 0
    ctx = context_bytes if cuda_context else 0
    return [Item("allocator_slack", "allocator slack", slack, slack,
                 f"caching allocator's reserved-but-unused memory ({slack_frac:.0%} of the "
                 f"allocated + {TRANSIENT_SLACK:.0%} of short-lived buffers)", allocator=False),
            Item("cuda_context", "CUDA context", ctx, ctx,
                 context_note, allocator=False)]


_OUT_PROJ = {"dense", "out_proj", "o_proj", "c_proj"}
_MLP_OUT = {"dense_4h_to_h", "fc_out", "fc2", "down_proj"}


def _reads(shape: ModelShape, spec: LinearSpec) -> str:
    """Which tensor a block linear reads: the attention input, the attention output, the MLP
    input or the MLP's hidden activation. GPT-J feeds attention and MLP one norm's output."""
    if spec.name in _OUT_PROJ:
        return "attn_out"
    if spec.name in _MLP_OUT:
        return "mlp_out"
    if shape.parallel_residual and shape.norms_per_block == 1:
        return "block_in"
    return "mlp_in" if spec.group == "mlp" else "attn_in"


def _lora_saved_per_token(shape, lora, r, dropout, lc, *, norm_out, attn_out, mlp_out) -> int:
    """Bytes per token that the LoRA adapters of one block save for backward.

    lora_A keeps its input, lora_B its r-wide input (``lc`` bytes each: the 16-bit compute dtype
    under autocast or in the series' LoRA layers, float32 when the stream is float32). With dropout each adapter has its own dropout output and a 1-byte
    mask (CUDA; a float mask on CPU). Without dropout an input that needs a cast gets one copy
    per adapter (autocast caches casts of weights, not of activations); one that already has
    the right dtype is shared by every adapter reading it, and a ReLU's output (kept by ReLU
    itself) costs nothing more.
    """
    in_bytes = {"attn_in": norm_out, "mlp_in": norm_out, "block_in": norm_out,
                "attn_out": attn_out, "mlp_out": mlp_out}
    total, shared = 0, set()
    for s in lora:
        group = _reads(shape, s)
        total += lc * r
        if dropout > 0:
            total += s.d_in * (1 + lc)
        elif in_bytes[group] != lc:
            total += s.d_in * lc
        elif group not in shared:
            shared.add(group)
            # ReLU keeps its output, which is fc2's input. The attention output may share
            # storage with what sdpa keeps or be a fresh copy, depending on the kernel (a copy
            # with GPT-NeoX's fused qkv on CPU): counted, to stay on the safe side.
            kept = group == "mlp_out" and shape.activation == "relu" and not shape.gated_mlp
            total += 0 if kept else s.d_in * lc
    return total


def _optimizer_note(optimizer: str) -> str:
    return {
        "paged_adamw_8bit": "2 states in 8 bits (+ absmax); large tensors paged (below)",
        "adamw_8bit": "2 states in 8 bits + float32 absmax per 256 values",
        "paged_adamw_32bit": "2 float32 states; large tensors paged (below)",
        "adamw_torch": "2 float32 states: 8 bytes per trainable parameter",
        "adamw_torch_fused": "2 float32 states: 8 bytes per trainable parameter",
        "sgd": "no state",
    }[optimizer]


# ============================================================================ will it fit?


@dataclass
class Verdict:
    fits: bool
    needed: int  # total_device of the estimate
    budget: int
    headroom: int  # budget - needed (negative when it does not fit)

    def __bool__(self):
        return self.fits


def fits(est: Estimate, budget_bytes: float) -> Verdict:
    """Does the estimate's card memory (``total_device``) fit in ``budget_bytes``?"""
    budget = int(budget_bytes)
    return Verdict(fits=est.total_device <= budget, needed=est.total_device, budget=budget,
                   headroom=budget - est.total_device)


def largest_power_of_two(fits_at, limit: int = 64) -> int:
    """The largest power of two ``n <= limit`` for which ``fits_at(n)`` holds, trying 1, 2, 4,
    ... and stopping at the first that does not fit (memory grows with ``n``); 0 when not even
    1 fits."""
    best, n = 0, 1
    while n <= limit and fits_at(n):
        best, n = n, n * 2
    return best


def longest_fitting(fits_at, candidates) -> int:
    """The last of the increasing ``candidates`` before the first for which ``fits_at`` fails
    (memory grows with them); 0 when the first already fails."""
    best = 0
    for c in candidates:
        if not fits_at(c):
            break
        best = c
    return best



# the settings an estimate of one GPU of several (estimate_per_gpu) adds to estimate's
_PER_GPU_SETTINGS = ("n_gpus", "mode", "prefetch", "offload")


def _estimate_as(shape, **settings) -> Estimate:
    """:func:`estimate`, or :func:`estimate_per_gpu` when ``settings`` are an estimate of one GPU
    of several (an :class:`Estimate`'s ``settings`` are either)."""
    if "n_gpus" not in settings:
        return estimate(shape, **settings)
    per_gpu = {k: settings.pop(k) for k in _PER_GPU_SETTINGS}
    return estimate_per_gpu(shape, per_gpu.pop("n_gpus"), per_gpu.pop("mode"), **per_gpu,
                            **settings)


def largest_fit(shape, budget_bytes: float, **settings) -> dict:
    """The largest micro-batch (1, 2, 4, ... 64) at the given ``seq_len``, and the largest
    sequence length (multiples of 128, or of 64 below 256) up to the model's context at
    micro-batch 1, that fit in ``budget_bytes``. 0 where nothing fits. Other settings as for
    :func:`estimate` (or an :class:`Estimate`'s ``settings``, per-GPU ones included: each GPU
    of several is then sized). A larger budget never fits less.
    """
    shape = as_shape(shape)
    if "seq_len" not in settings:
        raise ValueError("largest_fit needs seq_len= (the sequence length to size the "
                         "micro-batch for)")
    settings.pop("micro_batch", None)
    best_batch = largest_power_of_two(lambda b: bool(fits(
        _estimate_as(shape, micro_batch=b, **settings), budget_bytes)))
    seq_settings = {k: v for k, v in settings.items() if k != "seq_len"}
    step = 64 if shape.context < 256 else 128
    best_seq = longest_fitting(lambda s: bool(fits(
        _estimate_as(shape, seq_len=s, micro_batch=1, **seq_settings), budget_bytes)),
        range(step, shape.context + 1, step))
    return {"micro_batch": best_batch, "seq_len": best_seq,
            "at_seq_len": settings["seq_len"], "budget_bytes": int(budget_bytes)}


_CARDS_GB = (8, 12, 16, 24, 32, 40, 48, 80, 96, 141)


def verdict_text(est: Estimate, budget_bytes: float) -> str:
    """One sentence: "fits: predicted 9.8 GB of 12 GB" or "does not fit: needs 14.1 GB of 12 GB;
    micro-batch 1 at 512 tokens would fit, or a 16 GB card"."""
    v = fits(est, budget_bytes)
    card_gb = f"{v.budget / GB:.3g} GB"
    if v.fits:
        return f"fits: predicted {fmt_bytes(v.needed)} of {card_gb}"
    s = dict(est.settings)
    lf = largest_fit(est.shape, budget_bytes, **s)
    alt = []
    if s["micro_batch"] > 1 and lf["micro_batch"]:
        alt.append(f"micro-batch {lf['micro_batch']} at {s['seq_len']} tokens would fit")
    if not alt:
        if lf["seq_len"]:
            alt.append(f"micro-batch 1 at {lf['seq_len']} tokens would fit")
        elif not s["gradient_checkpointing"]:
            alt.append("gradient checkpointing might make it fit")
    card = next((c for c in _CARDS_GB if v.needed <= c * GB * 0.97), None)
    alt.append(f"a {card} GB card" if card else "several GPUs")
    return (f"does not fit: needs {fmt_bytes(v.needed)} of {card_gb}; "
            + ", or ".join(alt))


def config_settings(cfg) -> dict:
    """:func:`estimate`'s settings for the series' :class:`helpers.config.Config` (LoRA,
    checkpointing, dtype, optimizer; autocast as training decides it,
    :func:`helpers.env.uses_autocast`), without ``seq_len`` and ``micro_batch``."""
    from helpers import env

    dtype = env.compute_dtype(cfg.compute_dtype)
    return {"gradient_checkpointing": cfg.gradient_checkpointing, "lora_r": cfg.lora_r,
            "lora_targets": cfg.lora_targets, "optimizer": cfg.optimizer,
            "compute_dtype": dtype, "double_quant": cfg.double_quant,
            "cuda_context": torch.cuda.is_available(), "autocast": env.uses_autocast(dtype),
            "upcast_fp32": cfg.upcast_norms_and_head, "lora_dropout": cfg.lora_dropout,
            "chunked_loss": cfg.chunked_loss}


def estimate_for_config(cfg, shape=None) -> Estimate:
    """The estimate for the series' :class:`helpers.config.Config` (:func:`config_settings`) at
    ``cfg.max_length`` tokens and its micro-batch (1 when it is chosen automatically). ``shape``
    defaults to the preset named like ``cfg.model``."""
    shape = as_shape(shape if shape is not None else cfg.model)
    return estimate(shape, seq_len=cfg.max_length, micro_batch=max(cfg.micro_batch, 1),
                    **config_settings(cfg))



# ============================================================================ several GPUs

# Items FSDP shards: every persistent tensor of the model, its gradients and optimizer state.
_SHARDED = ("weights_4bit", "quant_constants", "embeddings", "lm_head", "norms_biases",
            "lora_params", "lora_grads", "optimizer", "optimizer_paged")
SCALING_MODES = ("ddp", "fsdp")


def _small_weight_bytes(settings: dict) -> int:
    """Bytes per element of the weights that stay unquantized (norms, biases, embeddings):
    float32 when upcast, else the compute dtype's."""
    return 4 if settings["upcast_fp32"] else _dtype_bytes(settings["compute_dtype"])


def _block_bytes(shape: ModelShape, settings: dict) -> int:
    """Bytes of one transformer block's parameters as FSDP gathers them: its 4-bit linears with
    their constants, norms and biases in the 16-bit dtype, and its LoRA weights (float32)."""
    wb = _small_weight_bytes(settings)
    quant = sum(sum(quantized_weight_bytes(s.params, double_quant=settings["double_quant"])
                    .values()) for s in shape.linears)
    small = shape.norms_per_block * shape.params_per_norm + \
        sum(s.d_out for s in shape.linears if s.bias)
    r = settings["lora_r"]
    lora = sum(r * (s.d_in + s.d_out) for s in _lora_specs(shape, settings["lora_targets"]))
    return quant + small * wb + lora * 4


def estimate_per_gpu(shape, n_gpus: int, mode: str = "ddp", *, prefetch: bool = True,
                     offload: bool = False, **estimate_kwargs) -> Estimate:
    """Predicted memory of each GPU when the same QLoRA step runs on ``n_gpus`` GPUs.

    ``mode="ddp"`` (data parallel, one whole model per GPU): the one-GPU :func:`estimate`, plus
    DDP's gradient buckets, a second float32 copy of the LoRA gradients that the all-reduce
    works on. ``mode="fsdp"`` (fully sharded, the 4-bit weights stored in the compute dtype): the
    4-bit weights, their constants, the 16-bit embeddings, head, norms and biases, the LoRA
    parameters, their gradients and the optimizer state are divided by ``n_gpus``; on top, FSDP
    all-gathers one transformer block at a time (two with ``prefetch``: the next block is
    fetched while this one computes) and keeps the root unit - embeddings, head and final norm,
    everything outside the wrapped blocks - whole from the forward through the backward. With
    ``offload`` (``fsdp_offload_params``) the shards live in CPU RAM and only the gathered
    units are on the card. Activations, logits and the buffers of one block's backward are
    per GPU and do not shrink: each GPU still runs its own micro-batch.
    ``estimate_kwargs`` are :func:`estimate`'s (``seq_len``, ``micro_batch``, ...); the result
    is an :class:`Estimate` whose items say what was divided. Introduced in notebook 05.
    """
    if mode not in SCALING_MODES:
        raise ValueError(f"mode={mode!r}: use 'ddp' (a whole model per GPU) or 'fsdp' (sharded)")
    if int(n_gpus) != n_gpus or n_gpus < 1:
        raise ValueError(f"n_gpus={n_gpus} must be a whole number of at least 1")
    n = int(n_gpus)
    one = estimate(shape, **estimate_kwargs)
    settings = {**one.settings, "n_gpus": n, "mode": mode, "prefetch": prefetch,
                "offload": offload}
    items = [dataclasses.replace(i) for i in one.items
             if i.key not in ("allocator_slack", "cuda_context")]
    by_key = {i.key: i for i in items}
    if mode == "ddp":
        grads = by_key["lora_grads"].bytes
        extra = [Item("ddp_buckets", "DDP gradient buckets", grads, grads if n > 1 else 0,
                      "a float32 copy of the LoRA gradients that the all-reduce averages")]
        items += extra
    else:
        for i in items:
            if i.key in _SHARDED and i.bytes:
                i.at_peak = 0 if offload else math.ceil(i.bytes / n)
                i.explanation = (f"in CPU RAM (offloaded); {fmt_bytes(i.bytes / n)} per GPU "
                                 "there" if offload else
                                 f"1/{n} of {fmt_bytes(i.bytes)} ({i.explanation})")
        sh = one.shape
        root = by_key["embeddings"].bytes + by_key["lm_head"].bytes + \
            _small_weight_bytes(one.settings) * sh.params_per_norm  # the final norm
        block = _block_bytes(sh, one.settings)
        gathered = block * (2 if prefetch and sh.layers > 1 else 1)
        items += [
            Item("fsdp_root", "root unit, gathered", root, root if n > 1 else 0,
                 "embeddings, head and final norm held whole from forward to backward"),
            Item("fsdp_gathered_blocks", "blocks gathered", gathered, gathered if n > 1 else 0,
                 f"{gathered // block if block else 0} whole block(s) of {fmt_bytes(block)}: "
                 "the one computing" + (" and the one prefetched" if gathered > block else "")),
        ]
    allocated = sum(i.at_peak for i in items if i.allocator)
    cuda = one.settings["cuda_context"]
    items += _outside_allocator(items, allocated, cuda, one.settings["allocator_slack"],
                                one.settings["context_bytes"],
                                "driver context and kernels, on every GPU")
    if cuda and n > 1:
        items.append(Item("nccl", "NCCL communicators", NCCL_BYTES, NCCL_BYTES,
                          "the process group's buffers and kernels, outside torch's allocator",
                          allocator=False))
    device = sum(i.at_peak for i in items)
    return Estimate(shape=one.shape, settings=settings, items=items,
                    total_allocated=int(allocated), total_device=int(device),
                    footprint=one.footprint, peak_phase=one.peak_phase,
                    activation_detail=one.activation_detail)


def scaling_table(shape, budget_bytes: float, n_gpus=(1, 2, 4), modes=SCALING_MODES,
                  **estimate_kwargs) -> list[dict]:
    """Per-GPU predictions for each mode and GPU count against ``budget_bytes`` (one card's
    memory): rows of mode, n_gpus, per-GPU bytes and the verdict. Introduced in notebook 05."""
    rows = []
    for mode in modes:
        for n in n_gpus:
            est = estimate_per_gpu(shape, n, mode, **estimate_kwargs)
            rows.append({"mode": mode, "n_gpus": n, "per_gpu_bytes": est.total_device,
                         "fits": est.total_device <= budget_bytes,
                         "text": f"{mode.upper()} on {n} GPU(s): {fmt_bytes(est.total_device)} "
                                 f"per GPU of {fmt_bytes(budget_bytes)}: "
                                 + ("fits" if est.total_device <= budget_bytes
                                    else "does not fit")})
    return rows



class MemoryBudgetError(ValueError):
    """A run that cannot fit the memory budget, refused before anything is loaded."""


def require_fit(est: Estimate, budget_bytes: float | None) -> str:
    """The verdict sentence when the estimate fits ``budget_bytes`` (None: no budget, CPU);
    otherwise :class:`MemoryBudgetError` with what would fit. Introduced in notebook 02."""
    if not budget_bytes:
        return (f"no GPU budget on this machine; predicted GPU need "
                f"{fmt_bytes(est.total_device)}")
    sentence = verdict_text(est, budget_bytes)
    if not fits(est, budget_bytes):
        raise MemoryBudgetError(sentence + " (refused before loading: change MAX_LENGTH, "
                                "MICRO_BATCH or MEMORY_BUDGET_GB, or pick a smaller MODEL)")
    return sentence
