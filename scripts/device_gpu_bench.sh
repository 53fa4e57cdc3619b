#!/usr/bin/env bash
# One device call on the GPU host: the GPU self-test (every CUDA op against the CPU, the
# golden models against HF) and the gpu-only decode benchmark. Build first with
# scripts/build_device_binary.sh and carry .device. Writes logs and JSON rows to $OUT.
#   LAYERS=8 TOKENS=32 bash scripts/device_gpu_bench.sh
set -u
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$D selftest --gpu --verbose 2>&1 | tee $OUT/selftest.log | grep -E "FAIL|fused|graph|passed|failed" | tail -8
$D bench decode --synthetic mixtral-8x7b --layers "${LAYERS:-8}" --strategy gpu-only --tokens "${TOKENS:-32}" --kernel-times 2>&1 | tee $OUT/decode_gpu.log | grep -v '^{'
grep '^{' $OUT/decode_gpu.log > $OUT/decode_gpu.jsonl
