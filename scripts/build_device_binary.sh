#!/usr/bin/env bash
# Builds the static duet binary for the GPU host (which has no Swift toolchain) and packs it
# as .device/duet.gz (git-ignored); carry ".device" in the device call and start there with
#   gunzip -f .device/duet.gz && export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64
# then e.g. `bash scripts/device_cpu_bench.sh` or `.device/duet selftest --gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build -c release --static-swift-stdlib --product duet
mkdir -p .device
strip -o .device/duet .build/release/duet
gzip -f .device/duet
ls -la .device/duet.gz
