set -u
gunzip -f .device/duet.gz 2>/dev/null; chmod +x .device/duet
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
D=.device/duet
$D selftest --gpu > $OUT/selftest.log 2>&1
grep -E "FAIL" $OUT/selftest.log | head; grep -E "passed|failed" $OUT/selftest.log | tail -1
$D bench gpu-matmul --tokens 1 2 4 8 16 64 > $OUT/gpu-matmul.log 2>&1; grep -v "^{" $OUT/gpu-matmul.log
timeout 150 $D bench scenarios --synthetic mixtral-8x7b --gpu-memory 24GiB --strategies fiddler --groups prefill --output $OUT/prefill.jsonl > $OUT/prefill.log 2>&1; grep -E "prefill [0-9]" $OUT/prefill.log
SELFTEST=0 DTYPES=q4 ONLY="single 32/64" bash scripts/device_quantized.sh
