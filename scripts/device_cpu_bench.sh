#!/usr/bin/env bash
# One device call: CPU kernel checks and benchmarks on the GPU host (16 cores).
# Carry .device (the stripped, gzipped static binary). Writes $OUT/*.json and logs.
set -u
source "$(dirname "$0")/device_env.sh"
lscpu | grep -E "Model name|^CPU\(s\)|Flags" | sed 's/Flags:.*\(amx[^ ]*\).*/amx: \1/' | head -4
$D selftest --gpu 2>&1 | tee $OUT/selftest.log | tail -4
$D bench memory --gib 4 --repeats 5 2>&1 | tee $OUT/memory.log
$D bench kernels --max-tokens 512 --experts 6 --json > $OUT/kernels.jsonl 2>$OUT/kernels.err; tail -3 $OUT/kernels.err
python3 - "$OUT/kernels.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if r.get("bench") == "kernels":
        print(f"{r['path']:9} T={r['tokens']:<5} {r['ms']:8.2f} ms {r['gbps']:7.1f} GB/s {r['gflops']:8.0f} GFLOP/s  fraction {r['fraction']:.2f} ({r['bound']}, peak {r['path_peak_gflops']:.0f}, bw {r['bandwidth_gbps']:.1f})")
PY
for k in auto avx512 amx; do
  $D bench decode --synthetic mixtral-8x7b --layers 4 --tokens 16 --kernels $k --strategy cpu-only 2>&1 | tee -a $OUT/decode.log | tail -1
done
# AMX and AVX-512 on the golden models: greedy tokens vs HF where the margin is large.
for k in avx512 amx; do
  for m in mixtral-tiny-a mixtral-tiny-b; do
    python3 - $D $k $m <<'PY'
import json, subprocess, sys
D, k, m = sys.argv[1:]
g = json.load(open(f"Tests/Fixtures/{m}.golden.json"))
ok = bad = 0
for c in g["cases"]:
    out = subprocess.run([D, "generate", "--model", f"Tests/Fixtures/{m}", "--prompt-ids", ",".join(map(str, c["prompt"])),
                          "--max-tokens", "32", "--kernels", k, "--json"], capture_output=True, text=True)
    ids = json.loads(out.stdout)["sequences"][0]["ids"]
    for i, (a, b) in enumerate(zip(ids, c["greedy"])):
        if a != b:
            if c["margins"][i] > 0.1: bad += 1
            break
        ok += 1
print(f"{k} {m}: {ok} tokens equal to HF before any divergence; divergences at margin > 0.1: {bad}")
PY
  done
done
$D generate --prompt "In the beginning" --max-tokens 48 --kernels amx
