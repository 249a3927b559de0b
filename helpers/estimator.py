"""The estimator: the peak GPU memory of a QLoRA training step, item by item, from the model's
shape (:mod:`helpers.shapes`) and the run's settings, before anything is loaded (notebooks 01,
02 and 05; checked against the measured runs in ``bench/RESULTS.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
import torch
from helpers.shapes import LinearSpec, ModelShape, as_shape
from helpers.units import (BITS_PER_PARAM_DQ, BITS_PER_PARAM_NO_DQ, fmt_bytes,
                           quantized_weight_bytes)


# What the card holds outside torch's allocator: the CUDA context with the kernels torch and
# bitsandbytes load. Measured 0.80 GB on an H200 (torch 2.11, CUDA 13) as total - free -
# reserved; older stacks (Colab's T4) use about 0.3-0.5 GB, so this errs on the safe side.
CUDA_CONTEXT_BYTES = 800_000_000
# torch's caching allocator reserves more than it hands out, and what a step needs lies between
# the two: reserved memory the allocator does not need is given back when an allocation would
# otherwise fail. Fitted to where that runs out, on an H200: the longest sequences that ran at
# micro-batch 1 under 16 and 24 GB (Llama-3.1-8B, activations offloaded, with and without the
# tiled MLP and the lean norms; the next longer one ran out of memory) need 1% of the allocated
# plus 19% of the large short-lived buffers (logits and their gradient, a recomputed block,
# dequantization) beyond the allocated; 0.20-0.21 of those buffers alone fitted all four. Training
# runs of several steps at 512 tokens, never short of memory, held 1-18% more than allocated.
ALLOCATOR_SLACK = 0.01
TRANSIENT_SLACK = 0.19
# cuBLAS and cuBLASLt workspaces, which torch allocates through its caching allocator at the
# first matmul (so they are in max_memory_allocated): 64 MB measured on an H200 (4 MiB x 8 each).
CUBLAS_WORKSPACE_BYTES = 64_000_000
# Block inputs the GPU holds with the checkpointed activations offloaded (helpers.offload): one
# being copied to the host while the next block computes; in the backward one copied back.
OFFLOAD_IN_FLIGHT = 2
# Tokens per chunk of the tiled MLP (helpers.tiling, TILED_MLP): its docstring says why 4,096.
MLP_CHUNK_TOKENS = 4096


# the optimizers the estimator knows, with what each keeps per trainable parameter
_OPTIMIZERS = {
    "paged_adamw_8bit": "2 states in 8 bits (+ absmax); large tensors paged (below)",
    "adamw_8bit": "2 states in 8 bits + float32 absmax per 256 values",
    "paged_adamw_32bit": "2 float32 states; large tensors paged (below)",
    "adamw_torch": "2 float32 states: 8 bytes per trainable parameter",
    "adamw_torch_fused": "2 float32 states: 8 bytes per trainable parameter",
    "sgd": "no state",
}

# Tensors an activation function saves for backward, per element of the MLP's hidden width.
# torch's fused kernels (gelu, relu, silu, gelu with tanh) save one tensor; the formulas that
# transformers writes out in Python save each intermediate that a later multiply or tanh needs:
# gelu_new (GPT-J's) 4 of them, gelu_fast 7, quick_gelu 2 (checked with saved-tensor hooks).
_ACT_SAVES = {"gelu": 1, "relu": 1, "silu": 1, "swish": 1, "gelu_pytorch_tanh": 1,
              "gelu_new": 4, "gelu_fast": 7, "quick_gelu": 2, "gelu_python": 1}


def _as_dtype(dtype) -> torch.dtype:
    """A floating-point torch dtype from itself or its name ("bfloat16", "torch.float16")."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError("compute_dtype must be torch.bfloat16, torch.float16 or torch.float32")
    return dtype


def _dtype_bytes(dtype) -> int:
    """Bytes per element of a dtype or its name (its ``itemsize``)."""
    return _as_dtype(dtype).itemsize


def _lora_specs(shape: ModelShape, targets) -> list[LinearSpec]:
    """The block linears that get a LoRA adapter."""
    if targets in (None, "", "none"):
        return []
    if targets == "all-linear":
        return list(shape.linears)
    if targets == "attention":
        return [s for s in shape.linears if s.group == "attention"]
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)
             if t.strip()]
    known = [s.name for s in shape.linears]
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
    host_bytes: int = 0  # host memory the offloaded activations take (activation_offload)
    notes: list = field(default_factory=list)  # how a setting was chosen (printed by text())

    def breakdown(self) -> dict:
        """key -> bytes held at the peak (every item, device-only ones included)."""
        return {i.key: i.at_peak for i in self.items}

    def frame(self):
        """The items and the two totals as a pandas DataFrame: item, held at the peak, why."""
        import pandas as pd

        rows = [[i.label, fmt_bytes(i.at_peak) if i.at_peak == i.bytes else
                 f"{fmt_bytes(i.at_peak)} (of {fmt_bytes(i.bytes)})", i.explanation]
                for i in self.items]
        rows += [["peak allocated (max_memory_allocated)", fmt_bytes(self.total_allocated),
                  f"at: {self.peak_phase}"],
                 ["card memory needed", fmt_bytes(self.total_device), ""]]
        if self.host_bytes:
            rows += [["host memory (offloaded activations)", fmt_bytes(self.host_bytes),
                      "pinned CPU memory, outside the card"]]
        return pd.DataFrame(rows, columns=["item", "at peak", "why"])

    def text(self) -> str:
        s = self.settings
        head = (f"{self.shape.name}: seq {s['seq_len']} x micro-batch {s['micro_batch']}, "
                f"LoRA r={s['lora_r']}, checkpointing "
                f"{'on' if s['gradient_checkpointing'] else 'off'}"
                f"{' (activations offloaded to CPU)' if s.get('activation_offload') else ''}"
                f"{', tiled MLP' if s.get('tiled_mlp') else ''}, "
                f"{s['optimizer']}")
        return "\n".join([head, self.frame().to_string(index=False, justify="left"),
                          *self.notes])

    __str__ = text

    def _repr_html_(self) -> str:
        return self.frame().to_html(index=False)


def estimate(shape, *, seq_len: int, micro_batch: int = 1, gradient_checkpointing: bool = True,
             lora_r: int = 16, lora_targets="all-linear", optimizer: str = "paged_adamw_8bit",
             compute_dtype=torch.bfloat16, double_quant: bool = True, cuda_context: bool = True,
             upcast_fp32: bool = False, autocast: bool | None = None,
             lora_dropout: float = 0.05, chunked_loss: bool = True,
             activation_offload: bool = False, tiled_mlp: bool = False,
             mlp_chunk_tokens: int = MLP_CHUNK_TOKENS, lean_norms: bool | None = None,
             lean_dropout: bool | None = None, context_bytes: int = CUDA_CONTEXT_BYTES,
             allocator_slack: float = ALLOCATOR_SLACK) -> Estimate:
    """Predict the peak GPU memory of a QLoRA training step, item by item.

    ``shape``: a :class:`ModelShape` (or a config, preset name or model). Settings:
    ``seq_len`` x ``micro_batch`` tokens per forward; ``gradient_checkpointing``; LoRA rank and
    targets ("all-linear", "attention" or module names); the optimizer; ``compute_dtype`` of the
    4-bit layers and of the 16-bit ones; ``upcast_fp32``: embeddings, head and norms cast to
    float32 as ``prepare_model_for_kbit_training`` does (the original recipe; the series makes it
    optional); ``autocast``: the Trainer's fp16/bf16 mixed-precision flag (default: on unless the
    compute dtype is float32); ``chunked_loss``: the loss of :mod:`helpers.losses` (the series'
    default, CHUNKED_LOSS), whose logits exist one chunk of positions at a time, instead of the
    standard loss over the whole sequence's logits (False: the original recipe, a plain
    Trainer); ``activation_offload``: the checkpointed block inputs kept in CPU memory
    (:mod:`helpers.offload`, ACTIVATION_OFFLOAD; with checkpointing only): the GPU keeps
    :data:`OFFLOAD_IN_FLIGHT` of them, ``host_bytes`` is what the host holds; ``tiled_mlp``: the
    MLP of each block run ``mlp_chunk_tokens`` tokens at a time (:mod:`helpers.tiling`,
    TILED_MLP; with checkpointing only): the block recomputed in the backward holds one chunk's
    MLP intermediates and their gradients instead of the whole sequence's; ``lean_norms``: the
    RMSNorms run as :class:`helpers.norms.LeanRMSNorm` (default: with ``activation_offload``,
    which installs them; no effect on LayerNorm models); ``lean_dropout``: LoRA dropout as
    :class:`helpers.lora.LeanDropoutLinear` applies it, keeping inputs, not masks (default: with
    ``activation_offload``, likewise); ``cuda_context``: False on CPU.

    The activation model follows what autograd really saves in transformers 5 with bitsandbytes
    4-bit layers and peft LoRA (checked with saved-tensor hooks on each family); the module's
    comments explain every term. Calibrated against GPU measurements (tests/test_memory.py).
    Introduced in notebook 01.
    """
    settings = {k: v for k, v in locals().items() if k != "shape"}  # every argument but shape
    shape = as_shape(shape)
    if seq_len <= 0 or micro_batch <= 0:
        raise ValueError("seq_len and micro_batch must be positive")
    if activation_offload and not gradient_checkpointing:
        raise ValueError("activation_offload keeps the checkpointed activations in CPU memory: "
                         "it needs gradient_checkpointing=True")
    if tiled_mlp and not gradient_checkpointing:
        raise ValueError("tiled_mlp changes what the block recomputed in the backward holds: it "
                         "needs gradient_checkpointing=True")
    if lean_norms is None:  # helpers.offload.install installs them with the offload
        lean_norms = activation_offload
    lean_norms = bool(lean_norms) and shape.norm == "rmsnorm"
    if lean_dropout is None:
        lean_dropout = activation_offload
    lean_dropout = bool(lean_dropout) and lora_dropout > 0  # nothing to change without dropout
    # what LoRA keeps of its inputs: with lean dropout, as without dropout (the inputs themselves)
    kept_dropout = 0.0 if lean_dropout else lora_dropout
    if tiled_mlp and mlp_chunk_tokens < 1:
        raise ValueError(f"mlp_chunk_tokens={mlp_chunk_tokens} must be at least 1")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r} unknown; choose one of {', '.join(_OPTIMIZERS)}")
    compute_dtype = _as_dtype(compute_dtype)
    cb = compute_dtype.itemsize  # bytes of the compute dtype (2 or 4)
    if autocast is None:  # the series' flags: autocast for float16 only (env.precision_flags)
        autocast = compute_dtype == torch.float16
    settings.update(compute_dtype=str(compute_dtype).replace("torch.", ""), autocast=autocast)
    h, V, L, ff = shape.hidden, shape.vocab, shape.layers, shape.intermediate
    T = seq_len * micro_batch  # tokens per forward pass

    # ---------------------------------------------------------------- weights (persistent)
    # 4-bit linears: packed values plus constants, per weight (exact bitsandbytes layout).
    specs = [s for s in shape.linears for _ in range(shape.layers)] + list(shape.extra_linears)
    quant = [quantized_weight_bytes(s.params, double_quant=double_quant) for s in specs]
    packed, const = sum(q["packed"] for q in quant), sum(q["constants"] for q in quant)
    # Non-quantized layers load in the compute dtype (2 bytes; 4 in float32) and, with
    # upcast_fp32, prepare_model_for_kbit_training casts them to float32 (4 bytes).
    wb = 4 if upcast_fp32 else cb
    n_emb, n_head = shape.n_embedding_params(), shape.n_head_params()
    n_small = shape.n_norm_params() + shape.n_bias_params()

    # ---------------------------------------------------------------- LoRA and the optimizer
    lora = _lora_specs(shape, lora_targets)
    # numel of every LoRA matrix (A: r x d_in, B: d_out x r) of every block
    lora_mats = [lora_r * d for s in lora for d in (s.d_in, s.d_out)] * shape.layers
    n_lora = sum(lora_mats)
    lora_b = 4  # peft 0.21 creates LoRA weights in float32 (autocast_adapter_dtype=True)
    opt_alloc = opt_paged = 0
    for n in lora_mats:
        # AdamW keeps exp_avg and exp_avg_sq in float32 (8 bytes a value). The 8-bit optimizers of
        # bitsandbytes keep them in uint8 plus one float32 absmax per 256 values, for tensors of
        # >= 4096 values (min_8bit_size); smaller ones get the two float32 states. SGD: none.
        eight_bit = optimizer.endswith("adamw_8bit") and n >= 4096
        state = 0 if optimizer == "sgd" else 2 * n if eight_bit else 8 * n
        absmax = 2 * 4 * math.ceil(n / 256) if eight_bit else 0
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
    # - c16: q, k, v and the attention output as sdpa saves them: 16-bit under autocast; and
    #   LoRA A's saved input, the same: without autocast the series computes LoRA in the
    #   stream's dtype (helpers.lora.attach), so the stream's own tensor.
    # - norm_out: a norm's output (what the linears after it read): float32 from a LayerNorm
    #   under autocast, else the stream's dtype.
    hb = 4 if (upcast_fp32 or cb == 4 or (autocast and shape.norm == "layernorm")) else 2
    c16 = 2 if autocast else hb
    norm_out = 4 if (shape.norm == "layernorm" and autocast) else hb
    norm_save = 4 if (autocast or hb == 4 or shape.norm == "rmsnorm") else hb

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
    if lean_norms:  # each keeps its input and a float32 number per token; under checkpointing
        # the first one's input is the block input, which the checkpoint holds anyway
        per_tok["norms"] = n_norm_inputs * (hb * h + 4) - (hb * h if gradient_checkpointing else 0)
    # 4-bit linears save nothing but their (already resident) packed weight: bitsandbytes
    # computes no weight gradient, so the input is not kept. LoRA adapters do keep activations
    # (see _lora_saved_per_token): A's input, a dropout mask, and B's r-wide input.
    per_tok["lora"] = _lora_saved_per_token(shape, lora, lora_r, kept_dropout, c16,
                                            norm_out=norm_out, attn_out=c16, mlp_out=hb)
    # Attention. sdpa (flash / memory-efficient kernels) saves q, k, v, the output and a
    # float32 log-sum-exp per head: no seq x seq matrix. With a padding mask transformers repeats
    # grouped key/value heads to the query width before sdpa, so rows that can be padded
    # (micro-batches above 1) count keys and values at that width; a single row has no mask
    # (transformers drops an all-ones causal one) and sdpa reads the grouped heads as they are.
    kv_heads = shape.heads if micro_batch > 1 else shape.kv_heads
    per_tok["attention"] = (2 * shape.heads + 2 * kv_heads) * shape.head_dim * c16 + 4 * shape.heads
    # MLP: the activation function saves its input (and a written-out formula its
    # intermediates); a gated MLP also keeps act(gate) and up for their product.
    per_tok["mlp"] = (_ACT_SAVES.get(shape.activation, 1) + 2 * shape.gated_mlp) * ff * hb
    # Dropout on the residual branches keeps a 1-byte mask each (OPT's 0.1; 0 in most LLMs).
    per_tok["dropout"] = (2 * h if shape.resid_dropout > 0 else 0)
    layer_saved = T * sum(per_tok.values())
    # Each float32 LoRA weight is cast to the 16-bit compute dtype once per forward (by autocast,
    # or by the series' LoRA layers without it) and the copy is kept for backward; under
    # checkpointing only the recomputed block's copies are (a checkpoint keeps nothing else).
    lora_casts = (2 * n_lora if (autocast or hb == 2) else 0) // (
        shape.layers if gradient_checkpointing else 1)

    # with checkpointing each block's input hidden state is kept, without every block's tensors;
    # offloaded (helpers.offload), the host holds them and the GPU the ones in flight: the one
    # being copied while the next block computes, in the backward the one copied back
    block_inputs = L * T * h * hb
    on_gpu = min(L, OFFLOAD_IN_FLIGHT) * T * h * hb if activation_offload else block_inputs
    held_acts = (on_gpu if gradient_checkpointing else L * layer_saved) + lora_casts

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
    final_norm = T * ((hb * h + 4) if lean_norms else (norm_save * h + 8))
    from helpers.units import chunk_tokens, fmt_count

    chunked_loss = chunked_loss and T > chunk_tokens(V)  # one chunk: the model's own loss
    # with the chunked loss: one chunk's logits, and the final norm's output gathered
    logit_tokens, gathered = (chunk_tokens(V), 3 * T * h * norm_out) if chunked_loss else (T, 0)
    logits_fwd = 10 * logit_tokens * V + gathered // 3
    # Offloaded, the host also holds what the model saves outside its blocks: the final norm's
    # input and statistics; with the chunked loss the gathered hidden states and the positions'
    # indices and targets (8 bytes each); with the model's own loss log-softmax's float32 output,
    # the labels and, under autocast, the head's 16-bit copy. The GPU side is left as above.
    outside = ([gathered // 3, 8 * T, 8 * T] if chunked_loss else
               [4 * T * V, 8 * T] + ([V * h * 2] if autocast else []))
    host_tensors = ([T * h * hb] * L + ([T * hb * h, 4 * T] if lean_norms else
                                        [T * norm_save * h, 4 * T, 4 * T]) + outside)
    # On a GPU those copies are pinned, and torch's pinned-memory allocator rounds every
    # allocation up to a power of two (and keeps it for reuse): the host holds the rounded sizes.
    size = _pinned if cuda_context else int
    host_bytes = sum(size(n) for n in host_tensors) if activation_offload else 0
    logits = 12 * logit_tokens * V + gathered

    # Backward through one block. With checkpointing the block is recomputed, and its largest
    # moment is one of three (each traced tensor by tensor on CPU with a live-tensor tracker):
    # - the end of the recompute, in the MLP's output projection: everything the block saves,
    #   plus what the forward still holds there - the projection's input (the gated product or
    #   the activation's output), the residual sum, the second norm's output and the block's
    #   output being formed - and the gradient that arrived from above (two stream-wide
    #   tensors). Llama's peak: 342.4 KB per token for Llama-3.1-8B, where an H200 measured
    #   342.9 (bench/RESULTS.md);
    # - the MLP's backward: everything saved, two MLP-wide gradients and the arriving gradient
    #   (GPT-J's peak: its activation keeps four MLP-wide tensors until its own backward); with
    #   the lean LoRA dropout, Llama's: its mask drawn again and the dropped input, and one more
    #   stream-wide copy of the gradient (traced);
    # - the second norm's backward, once the MLP's tensors are freed: the attention side's saves,
    #   two stream-wide gradients (the block output's and the MLP input's) and the norm's
    #   float32 temporaries, five for an RMSNorm written out in Python (Llama's), two for the
    #   fused LayerNorm. Tiled, the MLP's share shrinks and this can be the highest.
    # Tiled (helpers.tiling), the MLP runs one chunk of tokens at a time under its own
    # checkpoint, in the forward and again in the backward: its MLP-wide tensors (what the
    # activation and the product keep, LoRA's saves inside the MLP other than its input, the
    # product the output projection reads, the MLP-wide gradients) exist for one chunk only,
    # and the chunks' gradients for the MLP's input are gathered into one stream-wide tensor.
    # Without checkpointing the backward of the last block holds a few stream-wide float32 and
    # MLP-wide gradients. The largest 4-bit weight is dequantized for the input-gradient matmul.
    mlp_saved = per_tok["mlp"] + _lora_mlp_intermediates(shape, lora, lora_r, kept_dropout, c16,
                                                          norm_out=norm_out, mlp_out=hb)
    chunk = min(T, mlp_chunk_tokens) if tiled_mlp else T
    attn_lora = [s for s in lora if s.group != "mlp"]
    attn_side = (per_tok["norms"] + per_tok["attention"]
                 + _lora_saved_per_token(shape, attn_lora, lora_r, kept_dropout, c16,
                                         norm_out=norm_out, attn_out=c16, mlp_out=hb))
    norm_temps = (3 if lean_norms else 5 if shape.norm == "rmsnorm" else 2) * h * 4
    # the residual sum the second norm reads: a forward temporary, or saved by a lean norm; the
    # second norm's output and the MLP's product: temporaries, or what LoRA keeps when it keeps
    # its inputs (no dropout, or the lean dropout), counted there
    reads = {_reads(shape, s) for s in lora} if kept_dropout == 0 else set()
    held_stream = (5 - (lean_norms and n_norm_inputs > 1) - ("mlp_in" in reads)) * h * hb
    product = 0 if "mlp_out" in reads else ff * hb

    def block_moments(chunk: int) -> dict:
        if not gradient_checkpointing:
            return {"the last block's backward": 2 * T * h * 4 + 2 * T * ff * hb}
        gathered_grad = T * h * hb if chunk < T else 0
        out = {}
        for name, mlp_extra, stream in (("the end of the recompute", product, held_stream),
                                        ("the MLP's backward", 2 * ff * hb,
                                         (3 if lean_dropout else 2) * h * hb)):
            wide = mlp_saved + mlp_extra  # per token: what tiling cuts to one chunk
            out[name] = (layer_saved + T * (mlp_extra + stream) - (T - chunk) * wide
                         + gathered_grad)
        out["the second norm's backward"] = T * (attn_side + 2 * h * hb + norm_temps)
        return out

    # the rotary cos and sin the model computes once per forward and hands every block (kept by
    # the checkpoints); learned positions (OPT) have none
    rope = 0 if shape.position_embeddings else 2 * T * shape.head_dim * cb
    moments = {k: v + rope for k, v in block_moments(chunk).items()}
    block_bwd = max(moments.values())
    untiled = max(block_moments(T).values()) + rope - block_bwd  # tiling's saving (the note)
    dequant = max(s.params for s in specs) * cb if specs else 0

    workspace = CUBLAS_WORKSPACE_BYTES if cuda_context else 0
    persistent = [  # held through the whole step
        ("weights_4bit", "4-bit weights", packed,
         f"{fmt_count(shape.n_linear_params())} linear weights, 2 per byte"),
        ("quant_constants", "quantization constants", const,
         ("absmax in 8 bits + float32 per 256 blocks (double quantization): "
          f"{BITS_PER_PARAM_DQ:.3f} bits/weight in all") if double_quant else
         f"float32 absmax per block of 64: {BITS_PER_PARAM_NO_DQ} bits/weight in all"),
        ("embeddings", "embeddings", n_emb * wb,
         f"{fmt_count(n_emb)} parameters x {wb} bytes (never quantized)"),
        ("lm_head", "output head", n_head * wb,
         "tied to the embeddings" if shape.tied_embeddings and not shape.head_bias else
         f"{fmt_count(n_head)} parameters x {wb} bytes (never quantized)"),
        ("norms_biases", "norms, biases, buffers", n_small * wb + shape.buffer_bytes,
         f"{fmt_count(n_small)} parameters x {wb} bytes, rotary tables"),
        ("lora_params", "LoRA parameters", n_lora * lora_b,
         f"{fmt_count(n_lora)} trainable parameters in float32 (peft's default)"),
        ("lora_grads", "LoRA gradients", n_lora * lora_b,
         "float32, kept across gradient accumulation"),
        ("optimizer", "optimizer state", opt_alloc, _OPTIMIZERS[optimizer]),
        ("cublas_workspace", "cuBLAS workspaces", workspace,
         "matmul scratch space torch keeps per stream (GPU only)"),
        ("activations", "saved activations", held_acts,
         ((f"{min(L, OFFLOAD_IN_FLIGHT)} of {L} block inputs in flight (the rest on the host), "
          f"{T} tokens x {h} x {hb} bytes" if activation_offload else
          f"{L} block inputs of {T} tokens x {h} x {hb} bytes (checkpointing)")
          + (", LoRA's 16-bit weight copies" if lora_casts else "")
          if gradient_checkpointing else
          f"{L} blocks x {T} tokens x {sum(per_tok.values()) / h:.1f}h bytes saved for "
          "backward (no checkpointing)")),
    ]
    static = sum(n for _, _, n, _ in persistent)  # saved activations included
    phases = {
        "end of the forward (logits and loss)": static + head_copy + final_norm + logits_fwd,
        "start of backward (logits and their gradient)": static + head_copy + final_norm + logits,
        "backward through one block" + (" (recomputed)" if gradient_checkpointing else ""):
            static + block_bwd + dequant,
    }
    peak_phase = max(phases, key=phases.get)
    at_fwd, _at_loss, at_block = (peak_phase == p for p in phases)
    items = [Item(key, label, n, n, why) for key, label, n, why in persistent] + [
        Item("block_recompute", "one block in backward", block_bwd, block_bwd if at_block else 0,
             (f"the recomputed block at its highest moment, {max(moments, key=moments.get)}"
              + (f", its MLP {chunk} of {T} tokens at a time (tiled)" if tiled_mlp else "")
              + (", lean RMSNorms" if lean_norms else "")
              if gradient_checkpointing else "gradients in flight through one block")),
        Item("dequant_temp", "4-bit dequantization buffer", dequant, dequant if at_block else 0,
             "the largest 4-bit weight dequantized for a matmul"),
        Item("head_copy", "16-bit copy of the head", head_copy,
             0 if at_block else head_copy, "autocast's copy of the float32 head, kept for backward"
             if head_copy else "none: the head is already 16-bit"),
        Item("logits", "logits and loss", logits + final_norm,
             (logits_fwd if at_fwd else logits) + final_norm if not at_block else 0,
             (f"one chunk of {logit_tokens} of {T} tokens x {V} vocab x 12 bytes (float32 "
              "logits, log-softmax, gradients; chunked loss) and the gathered hidden states"
              if chunked_loss else
              f"{T} tokens x {V} vocab x 12 bytes (float32 logits, log-softmax, gradients)")),
    ]
    total_allocated = sum(i.at_peak for i in items)
    items += [Item("optimizer_paged", "paged optimizer state", opt_paged, opt_paged,
                   "in unified memory, outside torch's allocator; evicted to CPU RAM under "
                   "pressure", allocator=False)]
    items += _outside_allocator(items, total_allocated, cuda_context, allocator_slack,
                                context_bytes,
                                "driver context and kernels; not in max_memory_allocated")
    total_device = sum(i.at_peak for i in items)
    footprint = packed + (n_emb + n_head + n_small) * cb + shape.buffer_bytes  # as loaded
    detail = {"per_token_per_block": per_tok, "stream_bytes": hb, "tokens": T,
              "phases": phases, "block_inputs": block_inputs,
              "mlp_saved_per_token": mlp_saved, "mlp_chunk_tokens": chunk,
              "block_moments": moments}
    notes = [f"tiled MLP: one block's MLP intermediates for {chunk:,} of {T:,} tokens at a time "
             f"(saves {fmt_bytes(untiled)} of the recomputed block)"] if tiled_mlp else []
    return Estimate(shape=shape, settings=settings, items=items,
                    total_allocated=int(total_allocated), total_device=int(total_device),
                    footprint=int(footprint), peak_phase=peak_phase, activation_detail=detail,
                    host_bytes=int(host_bytes), notes=notes)


def _pinned(nbytes: int) -> int:
    """What torch's pinned host allocator takes for ``nbytes``: the next power of two."""
    return 1 << max(0, int(nbytes) - 1).bit_length() if nbytes > 0 else 0


# items that live only for part of a step (the allocator's slack grows with them)
_TRANSIENT_KEYS = ("block_recompute", "dequant_temp", "head_copy", "logits")


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


def _lora_mlp_intermediates(shape, lora, r, dropout, lc, *, norm_out, mlp_out) -> int:
    """Bytes per token that the LoRA adapters inside the MLP save apart from the MLP's input
    (which the block holds whole anyway): B's r-wide inputs, dropout outputs and masks, cast
    copies, the down projection's input. Tiled, these exist for one chunk at a time."""
    mlp = [s for s in lora if s.group == "mlp"]
    total = _lora_saved_per_token(shape, mlp, r, dropout, lc, norm_out=norm_out, attn_out=lc,
                                  mlp_out=mlp_out)
    shares_input = dropout == 0 and norm_out == lc and any(
        _reads(shape, s) != "mlp_out" for s in mlp)
    return total - (shape.hidden * lc if shares_input else 0)


def _lora_saved_per_token(shape, lora, r, dropout, lc, *, norm_out, attn_out, mlp_out) -> int:
    """Bytes per token that the LoRA adapters of one block save for backward.

    lora_A keeps its input, lora_B its r-wide input (``lc`` bytes each: the 16-bit compute dtype
    under autocast or in the series' LoRA layers, float32 when the stream is float32). With
    dropout each adapter has its own dropout output and a 1-byte mask (CUDA; a float mask on
    CPU). Without dropout an input that needs a cast gets one copy
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

