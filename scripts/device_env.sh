# Sourced by the scripts/device_*.sh scripts on the GPU host: unpacks the carried binary
# (scripts/build_device_binary.sh), makes the CUDA libraries findable, and sets D (the
# binary) and OUT (where logs go; the device tool's $OUT when set).
gunzip -f .device/duet.gz 2>/dev/null; chmod +x .device/duet
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
D=.device/duet
OUT=${OUT:-/tmp}
