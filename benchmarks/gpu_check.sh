#!/usr/bin/env bash
# Everything that needs a GPU, in one call (DEVELOPERS.md: one prepared script per lent card).
#   bash benchmarks/gpu_check.sh OUT_DIR        (about 11 minutes on one H100/H200 with 16 cores)
# Writes OUT_DIR/*.json and OUT_DIR/log.txt; paste the rows into benchmarks/RESULTS.md.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv
# 1. The CUDA-only tests: device decode, device multi-crop, block masks, cuda vs cpu device path.
python -m pytest -q -rs tests/data/test_decode.py tests/data/test_batched.py tests/data/test_masking_vectorised.py \
  tests/data/test_pipeline_device.py -k "cuda" || echo "CUDA TESTS FAILED"
python -c "from sopvit.bench import synthetic_jpegs; from pathlib import Path; synthetic_jpegs(Path(\"$out/jpegs\"), 64)"
# 2. The input pipeline on the card: both paths, 15 workers (one core left for the main process).
python benchmarks/input_pipeline.py --device cuda --workers 15 --batches 20 --batch 128 --json "$out/input.json"
# 3. The step rows still missing (issue 5) and the input rate beside them (input-bound or not).
for r in vit_small_in1k vit_base_in1k; do for c in false true; do
  sopvit bench --config configs/pretrain/$r.yaml train.compile=$c data.augment_on=device data.num_workers=15 \
    --input-batches 20 --json "$out/$r-compile-$c.json"
done; done
# 4. Issue 21, one card: ViT-L/16 peak memory of one step at the recipe's batch, with and without activation
#    checkpointing (FSDP needs >= 2 GPUs to shard; on one it runs replicated), and the step rate of each.
sopvit bench --memory --arch vit_large_patch16_224 --world-sizes 1 --measure \
  --config configs/pretrain/vit_large_in1k.yaml > "$out/memory-vitl.txt" 2>&1; tail -3 "$out/memory-vitl.txt"
for ac in false true; do
  sopvit bench --config configs/pretrain/vit_large_in1k.yaml train.activation_checkpointing=$ac \
    --json "$out/vitl-ac-$ac.json"
done
# 5. The sharded path on the card: FSDP2's bf16 policy and DCP through NCCL need 2 GPUs; here, one
#    process with train.parallel=fsdp (replicated, sharded checkpoints) for the ViT-H recipe at depth 4.
python -m sopvit pretrain --config configs/pretrain/vit_huge_in1k.yaml model.depth=4 train.max_steps=3 \
  data.dataset=folder data.path="$out/jpegs" run.output_dir="$out/vith" run.progress=false \
  || echo "VIT-H SMOKE FAILED"
