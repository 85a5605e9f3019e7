#!/usr/bin/env bash
# Everything that needs a GPU, in one call (DEVELOPERS.md: one prepared script per lent card).
#   bash benchmarks/gpu_check.sh OUT_DIR        (about 8 minutes on one H100/H200 with 16 cores)
# Writes OUT_DIR/*.json and OUT_DIR/log.txt; paste the rows into benchmarks/RESULTS.md.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv
# 1. The CUDA-only tests: device decode, device multi-crop, block masks, cuda vs cpu device path.
python -m pytest -q -rs tests/data/test_decode.py tests/data/test_batched.py tests/data/test_masking_vectorised.py \
  tests/data/test_pipeline_device.py -k "cuda" || echo "CUDA TESTS FAILED"
# 2. The input pipeline on the card: both paths, 15 workers (one core left for the main process).
python benchmarks/input_pipeline.py --device cuda --workers 15 --batches 20 --batch 128 --json "$out/input.json"
# 3. The step rows still missing (issue 5) and the input rate beside them (input-bound or not).
for r in vit_small_in1k vit_base_in1k; do for c in false true; do
  sopvit bench --config configs/pretrain/$r.yaml train.compile=$c data.augment_on=device data.num_workers=15 \
    --input-batches 20 --json "$out/$r-compile-$c.json"
done; done
