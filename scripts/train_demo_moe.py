#!/usr/bin/env python3
"""Trains Duet's built-in demo model: a small Mixtral (MoE) on the King James Bible.

Runs on the GPU host (torch + transformers + tokenizers there; no network): one device call,
about 3 minutes on an H200 (--steps of AdamW, cosine schedule, the checkpoint with the best
held-out loss kept: the model can memorise the whole text, so held-out loss decides). Inputs carried from the developer machine:
  .corpus/kjv.txt   from scripts/fetch_corpus.sh: Debian bookworm packages bible-kjv-text 4.38
                    (the text) and bible-kjv 4.38 (the program that prints it); public domain.
  Tests/Fixtures/tokenizers/mixtral/tokenizer.json  Mixtral's real tokenizer (vocabulary 32000).

Text: verse numbers and line wrapping removed, each chapter one document ("Genesis 1" heading
dropped); every 20th chapter (index % 20 == 7) is held out. Documents are tokenized with BOS, joined with EOS,
and cut into windows of --seq tokens.

Model: Mixtral architecture, tied embeddings, hidden 128, 6 layers, 8 experts top-2, 4 query /
2 KV heads, expert FFN 128, vocabulary 32000: 6.8 M parameters, 13.5 MB in bf16.

Writes OUT/duet-demo-moe/ (save_pretrained in bf16 + README.md model card) and
OUT/duet-demo-moe.golden.json: HF's fp32 greedy output on the stored weights for the prompts
below (64 tokens, top-2 margins, prefill logits)."""
import argparse, json, math, os, re, time

import torch
import transformers
from tokenizers import Tokenizer
from transformers import MixtralConfig, MixtralForCausalLM

from kjv import chapters, held_out

PROMPTS = ["In the beginning", "And the LORD said unto Moses,", "Blessed are the"]
GOLDEN_TOKENS = 64


def windows(docs, tok, seq):
    ids = []
    for _, text in docs:
        ids += tok.encode(text).ids + [2]  # BOS from the post-processor, EOS between documents
    n = (len(ids) - 1) // seq
    t = torch.tensor(ids[: n * seq + 1])
    return torch.stack([t[i * seq: i * seq + seq + 1] for i in range(n)]), len(ids)


@torch.no_grad()
def evaluate(model, data, batch):
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch):
        x = data[i:i + batch].cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=x[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


@torch.no_grad()
def routing_stats(model, data, batch):
    """Per layer: the share of top-2 assignments each expert gets on held-out text."""
    model.eval()
    E = model.config.num_local_experts
    counts = torch.zeros(model.config.num_hidden_layers, E, dtype=torch.long)
    for i in range(0, min(len(data), 8 * batch), batch):
        x = data[i:i + batch, :-1].cuda()
        out = model(input_ids=x, output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            top = logits.float().topk(model.config.num_experts_per_tok, dim=-1).indices.reshape(-1).cpu()
            counts[layer] += torch.bincount(top, minlength=E)
    rows = []
    for layer in range(counts.shape[0]):
        share = counts[layer].double() / counts[layer].sum()
        entropy = -(share * share.clamp_min(1e-12).log()).sum().item() / math.log(E)
        rows.append({"layer": layer, "share": [round(s, 4) for s in share.tolist()],
                     "max_share": round(share.max().item(), 4), "min_share": round(share.min().item(), 4),
                     "normalized_entropy": round(entropy, 4)})
    model.train()
    return rows


@torch.no_grad()
def golden(model_dir, tok):
    ref = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cases = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt).ids
        out = ref(input_ids=torch.tensor([ids]), use_cache=True)
        logits, past = out.logits[0, -1], out.past_key_values
        case = {"prompt": prompt, "prompt_ids": ids, "prefill_logits": [round(v, 5) for v in logits.tolist()]}
        greedy, margins = [], []
        for step in range(GOLDEN_TOKENS):
            top = torch.topk(logits, 2)
            greedy.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            if step + 1 < GOLDEN_TOKENS:
                out = ref(input_ids=torch.tensor([[greedy[-1]]]), past_key_values=past, use_cache=True)
                logits, past = out.logits[0, -1], out.past_key_values
        case.update(greedy=greedy, margins=margins, text=tok.decode(greedy))
        cases.append(case)
        print(f"{prompt!r} -> {case['text']!r}")
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=".corpus/kjv.txt")
    ap.add_argument("--tokenizer", default="Tests/Fixtures/tokenizers/mixtral/tokenizer.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1500, help="cosine schedule length; the best held-out checkpoint is kept")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--lr", type=float, default=2e-3)
    a = ap.parse_args()
    torch.manual_seed(0)
    start = time.time()
    tok = Tokenizer.from_file(a.tokenizer)
    docs = chapters(a.corpus)
    train_docs = [d for i, d in enumerate(docs) if i % 20 != 7]
    held_docs = held_out(docs)
    train, n_train = windows(train_docs, tok, a.seq)
    held, n_held = windows(held_docs, tok, a.seq)
    print(f"{len(docs)} chapters; train {n_train} tokens ({len(train)} windows), held-out {n_held} tokens; {time.time() - start:.1f}s")

    cfg = MixtralConfig(vocab_size=32000, hidden_size=128, intermediate_size=128, num_hidden_layers=6,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                        bos_token_id=1, eos_token_id=2, router_aux_loss_coef=0.02, output_router_logits=True)
    model = MixtralForCausalLM(cfg).cuda().train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    step, best, best_step, best_state, total_steps, log = 0, float("inf"), 0, None, a.steps, []
    train_start = time.time()
    while step < total_steps:
        warm = min(1.0, (step + 1) / 100)
        progress = step / total_steps
        lr = a.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(train), (a.batch,))
        x = train[idx].cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=x[:, :-1], labels=x[:, :-1].clone(), output_router_logits=True)
        # HF shifts labels inside; the last target is dropped, fine for training.
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % a.eval_every == 0 or step == total_steps:
            h = evaluate(model, held, 64)
            log.append({"step": step, "train_loss": round(out.loss.item(), 4), "held_out_nll": round(h, 4),
                        "held_out_ppl": round(math.exp(h), 3), "seconds": round(time.time() - train_start, 1)})
            print(log[-1])
            if h < best:
                best, best_step = h, step
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_seconds = time.time() - train_start
    model.load_state_dict(best_state)
    stats = routing_stats(model, held, 64)
    out_dir = os.path.join(a.out, "duet-demo-moe")
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out_dir)
    # The reference: HF in fp32 on the stored bf16 weights.
    cases = golden(out_dir, tok)
    with open(os.path.join(a.out, "duet-demo-moe.golden.json"), "w") as f:
        json.dump({"model": "duet-demo-moe", "transformers": transformers.__version__, "torch": torch.__version__,
                   "cases": cases}, f)
    card = {"parameters": params, "train_tokens": n_train, "held_out_tokens": n_held, "steps": step, "best_step": best_step,
            "lr": a.lr, "aux_loss_coef": cfg.router_aux_loss_coef,
            "batch": a.batch, "seq": a.seq, "train_seconds": round(train_seconds, 1), "best_held_out_nll": round(best, 4),
            "best_held_out_ppl": round(math.exp(best), 3), "log": log, "routing": stats,
            "device": torch.cuda.get_device_name(), "transformers": transformers.__version__, "torch": torch.__version__}
    with open(os.path.join(a.out, "training.json"), "w") as f:
        json.dump(card, f, indent=1)
    print(json.dumps({k: v for k, v in card.items() if k not in ("log", "routing")}))
    for r in stats:
        print(f"layer {r['layer']}: max {r['max_share']:.3f} min {r['min_share']:.3f} entropy {r['normalized_entropy']:.3f}")


if __name__ == "__main__":
    main()
