#!/usr/bin/env python3
"""Load benchmark for `duet serve` (not a test): N concurrent streaming clients for a bounded time.

Starts the server (or uses --url), runs --clients threads that each send streamed completions with
the official `openai` client, one after another, until --seconds pass; each client's prompt is its
own, and every answer is checked against that prompt's answer measured alone first (greedy,
reference kernels), so a token that crossed between requests shows up as "mixed".

Reports: requests completed / failed / mixed, p50 / p99 time to first token, p50 / p99
inter-token latency, aggregate generated tokens/s, and the server's peak resident memory (VmHWM).

  python3 scripts/bench_server_load.py --duet .build/release/duet --clients 64 --seconds 60 --json out.json
"""
import argparse
import concurrent.futures
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import openai

PROMPTS = ["In the beginning", "And God said", "The LORD is my shepherd", "Blessed are the meek", "And it came to pass",
           "Thou shalt not", "Then Jesus answered", "For God so loved", "And the king said", "Hear, O Israel",
           "Now the serpent", "And Moses went up", "Praise ye the LORD", "In my Father's house", "Let there be",
           "And David said"]


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duet", default=".build/release/duet")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the built-in demo model)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-concurrency", type=int, default=64)
    ap.add_argument("--kernels", default="reference", help="reference makes every batch mix compute the same numbers, so 'mixed' is exact")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    port = free_port()
    cmd = [args.duet, "serve", "--port", str(port), "--max-concurrency", str(args.max_concurrency), "--kernels", args.kernels,
           "--model-name", "bench"] + (["--model", args.model] if args.model else [])
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    peak = [0]
    stop_sampling = threading.Event()

    def sample_memory():
        while not stop_sampling.is_set():
            try:
                for line in open(f"/proc/{server.pid}/status"):
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.5)

    threading.Thread(target=sample_memory, daemon=True).start()
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)

    def stream(prompt):
        start = time.perf_counter()
        times, text = [], []
        for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=args.max_tokens, temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter())
                text.append(chunk.choices[0].text)
        return start, times, "".join(text)

    # Each prompt's answer alone, before the load.
    alone = {p: stream(p)[2] for p in PROMPTS}

    results = {"completed": 0, "failed": 0, "mixed": 0, "tokens": 0}
    ttft, itl = [], []
    lock = threading.Lock()
    deadline = time.perf_counter() + args.seconds

    def worker(i):
        n = 0
        while time.perf_counter() < deadline:
            prompt = PROMPTS[(i + n) % len(PROMPTS)]
            n += 1
            try:
                start, times, text = stream(prompt)
            except Exception as e:  # noqa: BLE001 - every failure counts
                with lock:
                    results["failed"] += 1
                print("request failed:", e, file=sys.stderr)
                continue
            with lock:
                results["completed"] += 1
                results["mixed"] += text != alone[prompt]
                results["tokens"] += len(times)
                if times:
                    ttft.append(times[0] - start)
                    itl.extend(b - a for a, b in zip(times, times[1:]))

    def generated_so_far():
        metrics = urllib.request.urlopen(base + "/metrics").read().decode()
        return next(float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("duet_generated_tokens_total"))

    before = generated_so_far()
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.clients) as pool:
        list(pool.map(worker, range(args.clients)))
    elapsed = time.perf_counter() - t0
    generated = generated_so_far() - before  # counts the tokens of requests cut off at the deadline too
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)
    stop_sampling.set()

    report = {
        "clients": args.clients, "seconds": round(elapsed, 1), "max_tokens": args.max_tokens, "kernels": args.kernels,
        "max_concurrency": args.max_concurrency, "cpu_cores": os.cpu_count(),
        "completed": results["completed"], "failed": results["failed"], "mixed": results["mixed"],
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
        "stream_chunks_per_s": results["tokens"] / elapsed, "server_generated_tokens": generated,
        "peak_rss_mib": peak[0] / 2**20,
    }
    # A streamed text piece can hold several tokens (an incomplete character); the server's own
    # counter gives the token rate.
    report["generated_tokens_per_s"] = generated / elapsed
    print(f"{report['completed']} completed, {report['failed']} failed, {report['mixed']} mixed in {report['seconds']} s "
          f"with {args.clients} streaming clients")
    print(f"time to first token p50 {report['ttft_p50_s']*1e3:.0f} ms, p99 {report['ttft_p99_s']*1e3:.0f} ms; "
          f"inter-token p50 {report['itl_p50_s']*1e3:.1f} ms, p99 {report['itl_p99_s']*1e3:.1f} ms")
    print(f"aggregate {report['generated_tokens_per_s']:.0f} tokens/s generated; server peak RSS {report['peak_rss_mib']:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    sys.exit(1 if report["failed"] or report["mixed"] else 0)


if __name__ == "__main__":
    main()
