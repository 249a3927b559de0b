#!/usr/bin/env bash
# The series' GPU checks in one go, on a CUDA machine with the packages installed and the GPU to
# itself (budgets are enforced from the card's free memory, so another process on it would be
# counted against them):
# 1. the README's test command (one process on a CUDA machine);
# 2. the longest sequence at micro-batch 1 for Llama-3.1-8B with the activations offloaded, with
#    and without the lean norms, and with the MLP tiled (bench/gpu_suite.py);
# 3. GPT-NeoX-20B's packed quotes against full rows and the original recipe;
# 4. (only when named) "expandable": step 2's offloaded rows again with the caching allocator's
#    expandable segments, which should leave less memory reserved but unused.
# Results: OUTDIR/pytest.log and pytest.rc, OUTDIR/suite.jsonl (one JSON line per result, written
# as each is measured), OUTDIR/suite-*.log, and OUTDIR/done at the end.
#
#     bash bench/gpu_checks.sh OUTDIR [tests,llama,neox,expandable]
set -u
out=${1:-runs/gpu-checks}
steps=${2:-tests,llama,neox}
mkdir -p "$out"
if [[ ,$steps, == *,tests,* ]]; then
    python -m pytest -n auto --dist loadfile > "$out/pytest.log" 2>&1
    echo $? > "$out/pytest.rc"
fi
if [[ ,$steps, == *,llama,* ]]; then
    OUT="$out" python bench/gpu_suite.py llama-3.1-8b --steps 5 \
        --parts build,longest-offload:16,longest-own-norms:16,longest-tiled:16,longest-tiled:24 \
        > "$out/suite-llama.log" 2>&1
fi
if [[ ,$steps, == *,neox,* ]]; then
    OUT="$out" python bench/gpu_suite.py gpt-neox-20b --steps 5 --parts build,packed,original \
        > "$out/suite-neox.log" 2>&1
fi
if [[ ,$steps, == *,expandable,* ]]; then
    OUT="$out" python bench/gpu_suite.py llama-3.1-8b --steps 5 \
        --alloc-conf expandable_segments:True \
        --parts build,longest-offload:16,longest-tiled:16 > "$out/suite-expandable.log" 2>&1
fi
touch "$out/done"
