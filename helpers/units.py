"""Byte units and the sizes of 4-bit weights: the primitives every other module counts with.

Bytes everywhere; text uses decimal units, **1 GB = 1e9 bytes** (the unit of bitsandbytes' and
transformers' footprint figures). Introduced in notebook 02. Imports nothing from the package.
"""

from __future__ import annotations

import math
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


def free() -> None:
    """Return freed memory: Python objects now, the GPU allocator's cache, and the pinned host
    memory torch keeps for reuse (offloaded activations of a step that ran out of memory), where
    this torch can return it."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        empty_pinned = getattr(torch._C, "_host_emptyCache", None)
        if empty_pinned is not None:
            empty_pinned()


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


def fmt_count(n: float) -> str:
    """A count of parameters (or anything) with a unit that keeps three digits: ``6.05B``,
    ``65.5M``, ``921k``, ``512``. Introduced in notebook 02."""
    sign, n = ("-" if n < 0 else ""), abs(float(n))
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            value = n / scale
            return f"{sign}{value:.{max(0, 2 - int(math.log10(value)))}f}{unit}"
    return f"{sign}{n:.0f}"


def logical_numel(param) -> int:
    """Elements a parameter stands for: a packed 4-bit weight holds two values per byte, so its
    true count is the product of ``quant_state.shape``, not ``numel()`` of its storage."""
    if _is_params4bit(param):
        return math.prod(param.quant_state.shape)
    return param.numel()


def _is_params4bit(p) -> bool:
    return type(p).__name__ == "Params4bit" and getattr(p, "quant_state", None) is not None


def quantized_weight_bytes(n: int, *, double_quant: bool = True) -> dict:
    """Bytes of one weight of ``n`` values in bitsandbytes 4-bit (NF4 and FP4 alike).

    ``packed``: ceil(n/2). ``constants``: without double quantization one float32 absmax per
    block of 64 (BLOCKSIZE); with it one uint8 absmax per block, one float32 per 256 of those,
    a 256-entry float32 table and a float32 offset; both add the 16-entry 4-bit value table.
    """
    blocks = math.ceil(n / BLOCKSIZE)
    if double_quant:
        const = blocks + 4 * math.ceil(blocks / DQ_BLOCKSIZE) + 4 * 256 + 4
    else:
        const = 4 * blocks
    return {"packed": (n + 1) // 2, "constants": const + 4 * 16}


# Chunk size of the chunked loss (helpers.losses), here because the memory estimate reads it too.
# One chunk's float32 logits take about this many bytes: 512 tokens of a 128,256-token vocabulary
# (Llama 3), 1,024 of a 50,000-token one, the whole sequence of a small model.
CHUNK_LOGIT_BYTES = 2 ** 28
MAX_CHUNK_TOKENS = 8192
MIN_CHUNK_TOKENS = 64


def chunk_tokens(vocab: int) -> int:
    """Positions per chunk: a power of two whose float32 logits fill about
    :data:`CHUNK_LOGIT_BYTES`, between 64 and 8,192."""
    n = max(1, CHUNK_LOGIT_BYTES // (4 * max(1, int(vocab))))
    n = 1 << (n.bit_length() - 1)
    return int(min(MAX_CHUNK_TOKENS, max(MIN_CHUNK_TOKENS, n)))


def article(number) -> str:
    """The article before a number said aloud: "an 8 GB card", "an 11 GB card", "a 12 GB card"."""
    said = str(number)
    return "an" if said.startswith("8") or said in ("11", "18") else "a"
