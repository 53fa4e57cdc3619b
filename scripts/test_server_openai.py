#!/usr/bin/env python3
"""End-to-end test of `duet serve` with the official `openai` client (run by scripts/test.sh).

Starts the server on loopback with the built-in demo model (reference kernels, so every batch
mix computes the same numbers), then checks with the real client:
  - greedy streamed text == non-streamed text == `duet generate`'s text, chat and completions;
  - 16 concurrent requests all complete with their own correct outputs;
  - bad requests get HTTP 400 with an OpenAI error body naming the field;
  - the API key is enforced; /metrics counts what happened;
  - SIGTERM stops the server cleanly (exit 0).
Usage: test_server_openai.py PATH/TO/duet
"""
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import openai

DUET = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".build/debug/duet")
KEY = "test-key-123"
MODEL = "duet-demo-moe"
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_text(prompt, max_tokens):
    out = subprocess.run([DUET, "generate", "--prompt", prompt, "--max-tokens", str(max_tokens),
                          "--kernels", "reference", "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["sequences"][0]["text"]


def start_server(port):
    proc = subprocess.Popen([DUET, "serve", "--port", str(port), "--api-key", KEY, "--kernels", "reference",
                             "--max-concurrency", "8", "--threads", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("server did not start: " + proc.stdout.read())


def main():
    port = free_port()
    server = start_server(port)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)
    try:
        run_checks(client, port)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            code = "killed"
        log = server.stdout.read()
        check(code == 0, f"SIGTERM stops the server with exit 0 (got {code})")
        check("server stopped" in log, "the server says it stopped")
    if failures:
        print(f"\n{len(failures)} failed:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("\nall server checks passed")


def run_checks(client, port):
    models = client.models.list()
    check([m.id for m in models.data] == [MODEL], "GET /v1/models lists the model")

    # Completions: whole == streamed == duet generate.
    prompt, n = "In the beginning", 24
    reference = generate_text(prompt, n)
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
    check(whole.choices[0].text == reference, f"completion == duet generate ({whole.choices[0].text!r} vs {reference!r})")
    check(whole.usage.completion_tokens == n and whole.choices[0].finish_reason == "length", "completion usage and finish_reason")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True) if c.choices)
    check(streamed == reference, "streamed completion == duet generate")

    # Chat: whole == streamed.
    messages = [{"role": "user", "content": "Who made the heaven and the earth?"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    text = chat.choices[0].message.content
    check(bool(text) and chat.choices[0].message.role == "assistant", "chat answers as the assistant")
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed_chat = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(streamed_chat == text, f"streamed chat == whole chat ({streamed_chat!r} vs {text!r})")
    check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens,
          "stream_options.include_usage sends the usage last")

    # Stop strings cut the text before them.
    cut = reference.find(" the", 3)
    if cut > 0:
        stopped = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stop=[" the"])
        check(stopped.choices[0].text == reference[:reference.find(" the")] and stopped.choices[0].finish_reason == "stop",
              "stop sequence ends the text before it")

    # 16 concurrent requests, each with its own prompt: every answer equals its own alone.
    prompts = ["In the beginning", "And God said", "The LORD is my shepherd", "Blessed are the meek",
               "And it came to pass", "Thou shalt not", "Then Jesus answered", "For God so loved"]
    prompts = prompts + [p + "," for p in prompts]
    alone = {p: generate_text(p, 12) for p in prompts}

    def ask(p):
        return p, client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(ask, prompts))
    mixed = [p for p, t in results if t != alone[p]]
    check(len(results) == 16 and not mixed, f"16 concurrent requests get their own answers (wrong: {mixed})")

    # Sampling with a seed is reproducible; n gives several choices.
    a = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=1.0, seed=7, n=3)
    b = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=1.0, seed=7, n=3)
    check([c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 3, "seeded sampling repeats, n=3 choices")

    # Log-probabilities: greedy picks the top alternative.
    lp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    check(len(content) == 5 and all(abs(e.logprob - e.top_logprobs[0].logprob) < 1e-9 and e.logprob <= 0 for e in content),
          "chat logprobs: the greedy token is the most likely alternative")

    # Bad requests: 400 naming the field.
    def bad(call, param):
        try:
            call()
            check(False, f"bad '{param}' is refused")
        except openai.BadRequestError as e:
            body = e.body if isinstance(e.body, dict) else {}
            check(e.status_code == 400 and body.get("param") == param, f"bad '{param}' -> 400 naming it ({body.get('message')})")

    bad(lambda: client.completions.create(model=MODEL, prompt=prompt, temperature=5), "temperature")
    bad(lambda: client.completions.create(model=MODEL, prompt=prompt, max_tokens=0), "max_tokens")
    bad(lambda: client.completions.create(model="gpt-4", prompt=prompt), "model")
    bad(lambda: client.completions.create(model=MODEL, prompt=prompt, extra_body={"top_p": "high"}), "top_p")
    bad(lambda: client.chat.completions.create(model=MODEL, messages=[]), "messages")
    bad(lambda: client.completions.create(model=MODEL, prompt="word " * 5000, max_tokens=4), "prompt")
    bad(lambda: client.completions.create(model=MODEL, prompt=prompt, max_tokens=100000), "max_tokens")
    raw = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=b'{"model": ', method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        urllib.request.urlopen(raw)
        check(False, "malformed JSON is refused")
    except urllib.error.HTTPError as e:
        check(e.code == 400 and "JSON" in json.load(e)["error"]["message"], "malformed JSON -> 400")

    # The API key.
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
    try:
        wrong.models.list()
        check(False, "a wrong API key is refused")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, "a wrong API key -> 401")

    # Metrics saw it all.
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    check('duet_requests_total{route="/v1/completions",status="400"}' in metrics and "duet_generated_tokens_total" in metrics,
          "/metrics counts requests and tokens")


if __name__ == "__main__":
    main()
