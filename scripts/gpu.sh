#!/usr/bin/env bash
# GPU benchmark, one prepared script: run it once on a machine with a CUDA GPU; its summary table
# goes to docs/benchmarks.md.
#
#   1. CPU/GPU agreement of the scores: PatchCorePlus (lambda 0.3 and 3, both M-steps) and the
#      PatchCore baseline on the paper configuration, WinClipPlus / plain WinCLIP (tiny CLIP);
#   2. speed at batch 1, 8 and 32: PatchCore vs PatchCorePlus (lambda 0.3 and 3, both M-steps,
#      batched Sinkhorn), WinCLIP vs WinClipPlus (ViT-B-16-plus-240, random weights);
#   3. peak GPU memory of refinement + scoring at m = 1024, 4096, 16384;
#   4. one summary table (scripts/gpu_summary.py).
#
# Usage: bash scripts/gpu.sh            (PYTHON=..., DEVICE=cuda, OUT=results/gpu)
#        DEVICE=cpu QUICK=1 bash scripts/gpu.sh   # smoke test of the script on a CPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
rm -f "$OUT/patchcore.jsonl" "$OUT/winclip.jsonl"

if [[ -n "${QUICK:-}" ]]; then
    BATCHES="1 2"; PATCHCORE=(--backbone resnet18 --layers layer2 --image-size 64 --repeats 1)
    WINCLIP=(--archs tiny --images 1); CHECK=(--small --batch-size 2); SIZES="256 1024"
else
    BATCHES="1 8 32"; PATCHCORE=(--repeats 5); WINCLIP=(--archs real --images 3); CHECK=(); SIZES="1024 4096 16384"
fi

echo "== 1. scores on $DEVICE vs CPU"
"$PY" scripts/gpu_check.py --device "$DEVICE" "${CHECK[@]}" | tee "$OUT/agreement.txt"

for batch in $BATCHES; do
    echo "== 2. speed, batch $batch"
    "$PY" scripts/patchcore_speed.py --device "$DEVICE" --batch-size "$batch" "${PATCHCORE[@]}" \
        --no-memory --json "$OUT/patchcore.jsonl" | tee "$OUT/patchcore_b$batch.txt"
    "$PY" scripts/winclip_speed.py --device "$DEVICE" --batch-size "$batch" "${WINCLIP[@]}" \
        --json "$OUT/winclip.jsonl" | tee "$OUT/winclip_b$batch.txt"
done

echo "== 3. peak memory"
# shellcheck disable=SC2086
"$PY" scripts/patchcore_speed.py --device "$DEVICE" --skip-timing --memory-sizes $SIZES | tee "$OUT/memory.txt"

echo "== 4. summary"
"$PY" scripts/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
cat "$OUT/agreement.txt" | tail -n +2
