#!/usr/bin/env bash
# The series' GPU checks in one go, on a CUDA machine with the packages installed and the GPU to
# itself (budgets are enforced from the card's free memory, so another process on it would be
# counted against them). Steps run in the order they are named:
# - tests: the README's test command (one process on a CUDA machine), each test's result as it
#   ends (so a run cut short still says which passed) and the slowest tests listed;
# - llama: the longest sequence at micro-batch 1 for Llama-3.1-8B with the activations offloaded,
#   with and without the lean norms and dropout, and with the MLP tiled (bench/gpu_suite.py);
# - llama-train: notebook 05's train() for three steps at notebook 02's longest sequence under 16
#   and 24 GB (offload and tiling chosen by 'auto'), with the host's pinned memory recorded;
#   llama-train:24 (or :16, :16+24) names the budgets;
# - neox: GPT-NeoX-20B's packed quotes against full rows and the original recipe, and full rows
#   at micro-batch 12 (predicted to fit 24 GB: is it faster than the automatic 8?);
# - gptj: the same for GPT-J-6B (its packed attention needs transformers >= 5.24), with a
#   profile of a full-row step and a packed one (where the packed rows' time goes);
# - expandable: the llama step's offloaded rows again with the caching allocator's expandable
#   segments, which should leave less memory reserved but unused.
# Results: OUTDIR/pytest.log and pytest.rc, OUTDIR/suite.jsonl (one JSON line per result, written
# as each is measured), OUTDIR/suite-*.log, OUTDIR/STEP.done after each step.
#
#     bash bench/gpu_checks.sh OUTDIR [tests,llama,llama-train[:GB+GB],neox,gptj,expandable]
set -u
out=${1:-runs/gpu-checks}
steps=${2:-tests,llama,neox}
mkdir -p "$out"
suite() { OUT="$out" python bench/gpu_suite.py "$@"; }
for step in ${steps//,/ }; do
    case $step in
        tests) python -m pytest -n auto --dist loadfile --durations=25 -v > "$out/pytest.log" 2>&1
               echo $? > "$out/pytest.rc" ;;
        llama) suite llama-3.1-8b --steps 5 --parts build,longest-offload:16,longest-own-norms:16,longest-tiled:16,longest-tiled:24 \
                   > "$out/suite-llama.log" 2>&1 ;;
        llama-train|llama-train:*)  # llama-train:24 runs the 24 GB budget only
                   gbs=${step#llama-train}; gbs=${gbs#:}; gbs=${gbs:-16+24}
                   parts=build; for gb in ${gbs//+/ }; do parts+=",train-longest:$gb"; done
                   suite llama-3.1-8b --parts "$parts" > "$out/suite-llama-train.log" 2>&1 ;;
        neox) suite gpt-neox-20b --steps 5 --parts "build,packed,original,var:MICRO_BATCH=12" \
                  > "$out/suite-neox.log" 2>&1 ;;
        gptj) suite gpt-j-6b --steps 5 --parts build,packed,profile,original \
                  > "$out/suite-gptj.log" 2>&1 ;;
        expandable) suite llama-3.1-8b --steps 5 --alloc-conf expandable_segments:True \
                        --parts build,longest-offload:16,longest-tiled:16 \
                        > "$out/suite-expandable.log" 2>&1 ;;
        *) echo "unknown step: $step (tests, llama, llama-train[:GB+GB], neox, gptj, expandable)" >&2; exit 2 ;;
    esac
    touch "$out/$step.done"
done
