"""Turn the GPU suite's JSON lines (bench/results/*.jsonl) into the markdown tables of
bench/RESULTS.md: python bench/report.py bench/results/h200_suite.jsonl"""

from __future__ import annotations

import json
import math
import sys

GB = 1e9


def load(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    # a later measurement of the same thing replaces an earlier one
    seen = {}
    for r in rows:
        key = (r["kind"], r.get("model"), r.get("scope"), r.get("micro_batch") if r["kind"] == "train"
               else None, r.get("rows"), r.get("recipe"))
        seen[key] = r
    return rows, list(seen.values())


def pct(a, b):
    return f"{100 * (a - b) / b:+.1f}%"


def main(path):
    raw, rows = load(path)
    card = next(r for r in raw if r["kind"] == "card")
    rate = card["bf16_matmul_flops"]
    out = [f"Card: {card['gpu']}; measured bf16 matmul rate {rate / 1e12:.0f} TFLOP/s; "
           f"torch {card['versions']['torch']}, transformers {card['versions']['transformers']}, "
           f"peft {card['versions']['peft']}, bitsandbytes {card['versions']['bitsandbytes']}.", ""]
    out += ["### Rehearsal builds: 4-bit footprint, predicted vs measured", "",
            "| model | parameters | build s | measured footprint | predicted | off by | 4-bit resident (with constants) | peak GPU while building | bound: resident + largest 16-bit linear | bound: footprint + one 16-bit block | peak host RSS |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "build":
            peak = r.get("peak_gpu_bytes_build_above_before", r["peak_gpu_bytes_build"])
            resident = r.get("resident_bytes", r["footprint_bytes"])
            block = r.get("one_block_16bit_bytes")
            out.append(f"| {r['model']} | {r['params'] / 1e9:.2f}B | {r['seconds']} | "
                       f"{r['footprint_bytes'] / GB:.2f} GB | {r['predicted_footprint_bytes'] / GB:.2f} GB | "
                       f"{pct(r['predicted_footprint_bytes'], r['footprint_bytes'])} | "
                       f"{resident / GB:.2f} GB | {peak / GB:.2f} GB | "
                       f"{(resident + r['one_layer_16bit_bytes']) / GB:.2f} GB | "
                       + (f"{(r['footprint_bytes'] + block) / GB:.2f} GB | " if block else "- | ")
                       + f"{r['peak_cpu_rss_bytes_build'] / GB:.2f} GB |")
    out += ["", "### Training peak (sequence 512, checkpointing, LoRA r=16, paged_adamw_8bit, 5 steps): estimator vs `max_memory_allocated`", "",
            "| model | LoRA scope | micro-batch | trainable params | adapted layers | predicted peak | measured peak | off by | tokens/s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "train" and "peak_alloc_bytes" in r:
            out.append(f"| {r['model']} | {r['scope']} | {r['micro_batch']} | {r['trainable_params']:,} | "
                       f"{r['lora_target_count']} | {r['predicted_peak_bytes'] / GB:.2f} GB | "
                       f"{r['peak_alloc_bytes'] / GB:.2f} GB | "
                       f"{pct(r['predicted_peak_bytes'], r['peak_alloc_bytes'])} | {r['tokens_per_second']:,.0f} |")
    out += ["", "### The original recipe and the series' defaults, same card, same process", "",
            "| model | workload | recipe | budget | micro-batch | tokens/s (real) | MFU | peak allocated | predicted peak |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "original" and "tokens_per_second" in r:
            out.append(f"| {r['model']} | {r['rows']} | original (1 x 4 accum, fp16 flag, r=8 attention, fp32 upcast) | - | 1 | "
                       f"{r['tokens_per_second']:,.0f} | {r['mfu']:.1%} | {r['peak_alloc_bytes'] / GB:.2f} GB | "
                       f"{r['predicted_peak_bytes'] / GB:.2f} GB |")
        if r["kind"] == "defaults":
            if "error" in r:
                out.append(f"| {r['model']} | {r['rows']} | defaults ({r.get('lora_targets', 'all-linear')}) | {r['budget_gb']} GB | - | refused: {r['error'][:120]} | | | |")
                continue
            out.append(f"| {r['model']} | {r['rows']} | defaults ({r['optimizer']}, {r.get('lora_targets', 'all-linear')} r=16, native bf16, chunked loss) | "
                       f"{r['budget_gb']} GB | {r['micro_batch']} | {r['tokens_per_second']:,.0f} | "
                       f"{r['mfu']:.1%} | {r['peak_gpu_bytes_train'] / GB:.2f} GB | "
                       f"{r['predicted_peak_bytes'] / GB:.2f} GB |")
    out += ["", "### Longest sequence at micro-batch 1 under the budget", "",
            "| model | recipe | budget | estimator | measured (forward + backward ran) | probes |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "longest":
            out.append(f"| {r['model']} | {r['recipe']} | {r['budget_gb']} GB | {r['predicted_seq_len']} | "
                       f"{r['measured_seq_len']} | {', '.join(f'{s}: {v}' for s, v in r['tried'])} |")
    out += ["", "### Merge of a GPT-J-6B rehearsal's adapter (bf16, on the GPU)", ""]
    for r in rows:
        if r["kind"] == "merge" and "merge_max_abs_logit_diff" in r:
            out.append(f"- {r['model']}: {r['source']}; merged vs adapter on the same 16-bit base: max |logit diff| "
                       f"{r['merge_max_abs_logit_diff']:.3f} (relative {r['merge_max_rel_logit_diff']:.3f}), "
                       f"top-1 agreement {r['merge_top1_agreement']:.3f}; vs the 4-bit training base: "
                       f"{r['merge_max_abs_logit_diff_vs_4bit']:.3f}, top-1 {r['merge_top1_agreement_vs_4bit']:.3f}; "
                       f"greedy text of the merged model equals the adapter's: {bool(r['merged_generation_matches'])}; "
                       f"peak GPU memory {max(v for k, v in r.items() if k.startswith('merge_peak_gpu_bytes')) / GB:.2f} GB.")
    print("\n".join(out))


def loss(value) -> str:
    """A held-out loss for a table: 4 decimals, or "not measured" (FSDP measures none before
    training)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "not measured"
    return "not measured" if math.isnan(value) else f"{value:.4f}"


def multi_gpu(path):
    """The table of bench/multi_gpu.py's JSON lines."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    card = next(r for r in rows if r.get("kind") == "card")
    out = [f"Cards: {', '.join(card['gpus'])}; torch {card['versions']['torch']}, accelerate "
           f"{card['versions']['accelerate']}, transformers {card['versions']['transformers']}, "
           f"bitsandbytes {card['versions']['bitsandbytes']}.", "",
           "| run | GPUs | launch | micro-batch x GPUs | held-out loss before -> after | tokens/s (real, all GPUs) | peak per GPU (max / min) | result |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "part" not in r:
            continue
        launch = "python -m helpers.train" if r["gpus"] == 1 and r["mode"] == "ddp" else \
            f"accelerate launch ({r['mode']}{', CPU offload' if r.get('offload') else ''})"
        if r["rc"] != 0:
            out.append(f"| {r['part']} | {r['gpus']} | {launch} | {r['params'].get('MICRO_BATCH', 'auto')} x {r['gpus']} | | | | "
                       f"failed: {r.get('error', '')[:160]} |")
            continue
        result = "ok"
        if "adapter_tensors" in r:
            result += f"; adapter {r['adapter_tensors']} tensors, max abs lora_B {r['lora_B_abs_max']:.1e}"
        if r.get("note"):
            result += f"; {r['note']}"
        out.append(f"| {r['part']} | {r['gpus']} | {launch} | {r['micro_batch']} x {r['num_processes']} | "
                   f"{loss(r['eval_loss_before'])} -> {loss(r['eval_loss_after'])} | {r['tokens_per_second']:,.0f} | "
                   f"{r['peak_gpu_bytes_train_max_process'] / GB:.2f} / {r['peak_gpu_bytes_train_min_process'] / GB:.2f} GB | {result} |")
    print("\n".join(out))


if __name__ == "__main__":
    if sys.argv[1].endswith("multi_gpu.jsonl"):
        multi_gpu(sys.argv[1])
    else:
        main(sys.argv[1])
