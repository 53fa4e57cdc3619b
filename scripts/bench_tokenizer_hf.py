#!/usr/bin/env python3
"""HF tokenizers' single-threaded encode speed on the corpus `duet bench tokenizer` uses,
written as JSON for Duet's bench to print beside its own figure.

    RAYON_NUM_THREADS=1 python3 scripts/bench_tokenizer_hf.py --tokenizer T.json[.gz] \
        --corpus .corpus/kjv.txt --strings Tests/Fixtures/tokenizers/strings.json --out hf.json

Documents: the golden strings, then the corpus split at blank lines (the same split Duet
makes). Figure: best of --repeats passes, each encoding every document in order."""
import argparse, gzip, json, os, time

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from tokenizers import Tokenizer
import tokenizers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--strings", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    raw = gzip.open(a.tokenizer).read() if a.tokenizer.endswith(".gz") else open(a.tokenizer, "rb").read()
    tok = Tokenizer.from_str(raw.decode())
    docs = json.load(open(a.strings)) + [d for d in open(a.corpus, encoding="utf-8").read().split("\n\n") if d]
    nbytes = sum(len(d.encode()) for d in docs)
    best, ntokens = float("inf"), 0
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        ntokens = sum(len(tok.encode(d).ids) for d in docs)
        best = min(best, time.perf_counter() - t0)
    out = {"engine": "hf-tokenizers", "version": tokenizers.__version__, "rayon_threads": os.environ["RAYON_NUM_THREADS"],
           "tokenizer": a.tokenizer, "documents": len(docs), "bytes": nbytes, "tokens": ntokens, "seconds": best,
           "mb_per_s": nbytes / best / 1e6, "tokens_per_s": ntokens / best}
    json.dump(out, open(a.out, "w"), indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
