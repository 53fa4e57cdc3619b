#!/usr/bin/env bash
# One device call on the GPU host for the offload strategies (issue 9): the GPU self-test
# (every strategy against the goldens), the placement for a 24 GiB budget, the latency
# calibration, and `duet generate` on synthetic Mixtral-8x7B with each strategy, printing
# its time split and hit rate. Build first with scripts/build_device_binary.sh and carry
# .device. Logs go to $OUT.
#   TOKENS=32 STRATEGIES="fiddler layer-split gpu-swap" bash scripts/device_offload.sh
set -u
source "$(dirname "$0")/device_env.sh"
M="--synthetic mixtral-8x7b --gpu-memory ${GPU_MEMORY:-24GiB}"
PROMPT=$(seq -s, 1 37 1200)  # 33 token ids
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
free -g | head -2
$D selftest --gpu 2>&1 | tee $OUT/selftest.log | grep -E "FAIL|offload.*(ran|peak)|passed|failed" | tail -12
$D plan $M | tee $OUT/plan.txt
timeout 200 $D calibrate --synthetic mixtral-8x7b --layers 1 --strategy fiddler --gpu-memory 4GiB 2>&1 | tee $OUT/calibrate.log
for s in ${STRATEGIES:-fiddler layer-split gpu-swap}; do
  echo "== $s"
  /usr/bin/time -v timeout ${LIMIT:-150} $D generate $M --strategy $s --prompt-ids $PROMPT --max-tokens ${TOKENS:-32} 2>&1 \
    | tee $OUT/generate_$s.log | grep -vE "^\s+(Page|Vol|Invol|Swaps|File|Socket|Signals|Average|Exit|Minor|Major|System time|User time|Percent|Command)"
done
