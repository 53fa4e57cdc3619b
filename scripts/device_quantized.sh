#!/usr/bin/env bash
# One device call for quantized experts on the GPU (issue 11): the GPU self-test (the q8/q4
# kernels against the CPU, every strategy with quantized experts against the CPU's quantized
# model), then `duet bench scenarios` single-batch rows with q8 and q4 experts next to bf16.
# Build first with scripts/build_device_binary.sh and carry .device. Logs and rows go to $OUT.
#   DTYPES="q4 q8" ONLY="single 32/64" bash scripts/device_quantized.sh
set -u
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${SELFTEST:-1}" = 1 ]; then
  $D selftest --gpu > $OUT/selftest.log 2>&1
  grep -E "FAIL|q8|q4" $OUT/selftest.log | grep -E "FAIL|gemv|gemm|greedy" | head -30
  grep -E "passed|failed" $OUT/selftest.log | tail -2
fi
for dt in ${DTYPES:-q4 q8}; do
  echo "== $dt"
  /usr/bin/time -f "%e s, max RSS %M KiB" timeout ${LIMIT:-240} $D bench scenarios --synthetic mixtral-8x7b --gpu-memory ${GPU_MEMORY:-24GiB} \
    --expert-dtype $dt --strategies ${STRATEGIES:-fiddler} --groups single --only "${ONLY:-single}" --output $OUT/scenarios-$dt.jsonl 2>&1 \
    | tee $OUT/scenarios-$dt.log | grep -vE "^\s*$" | tail -8
done
