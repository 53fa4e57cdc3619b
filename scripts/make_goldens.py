#!/usr/bin/env python3
"""Golden checkpoints and HF transformers reference outputs for Duet's Mixtral tests.

Runs where torch + transformers are installed (the GPU host; everything here runs on
the CPU in fp32, so results are deterministic). For each geometry it:
  1. builds a MixtralForCausalLM from a config with random weights (std 0.08, norms
     perturbed away from 1 so a missing norm is caught),
  2. saves it in the stored dtype in the *canonical Hub layout* (per-expert
     `block_sparse_moe.experts.E.w1/w2/w3`, as real Mixtral checkpoints have),
     sharded when asked, with config.json from `save_pretrained`,
  3. reloads those files with `from_pretrained(dtype=float32)` and records, computed by
     HF in fp32 on the stored weights: the last-position logits after prefill, the
     logits after 8 greedy decode steps, 32 greedy tokens and the top-2 logit margin of
     every greedy step.

Usage: python3 scripts/make_goldens.py OUTDIR   (then tar OUTDIR and bring it back)
"""
import json, os, re, sys

import torch
import transformers
from transformers import MixtralConfig, MixtralForCausalLM
from safetensors.torch import save_file, load_file

GEOMETRIES = {
    # fp32, single file, tied embeddings, default head_dim, 4 experts, rope_theta 1e6.
    "mixtral-tiny-a": dict(
        config=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, max_position_embeddings=256),
        dtype=torch.float32, shard_bytes=None),
    # bf16, sharded, untied, explicit head_dim 32 (!= 96/4), 8 experts, sliding window 8.
    "mixtral-tiny-b": dict(
        config=dict(vocab_size=640, hidden_size=96, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=8,
                    num_experts_per_tok=2, rope_theta=10000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, max_position_embeddings=256, sliding_window=8),
        dtype=torch.bfloat16, shard_bytes=400_000),
}

PROMPTS = {
    "mixtral-tiny-a": [[1], [1, 17, 250, 3, 99, 400, 12], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]],
    "mixtral-tiny-b": [[1, 600, 2, 33], [1, 9, 99, 199, 299, 399, 499, 599, 42, 43, 44, 45, 46]],
}
GREEDY_TOKENS = 32
DECODE_LOGIT_STEPS = 8


def canonical_state_dict(model, cfg):
    """Maps whatever layout this transformers version keeps in memory to the Hub layout."""
    out = {}
    E, I = cfg.num_local_experts, cfg.intermediate_size
    for key, t in model.state_dict().items():
        t = t.detach().contiguous()
        m = re.match(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.(.*)", key)
        if not m:
            if key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            out[key] = t
            continue
        layer, rest = m.groups()
        pre = f"model.layers.{layer}.block_sparse_moe."
        if rest == "gate.weight":
            out[pre + "gate.weight"] = t
        elif re.match(r"experts\.\d+\.w[123]\.weight", rest):
            out[pre + rest] = t
        elif rest in ("experts.gate_up_proj", "experts.gate_up_proj.weight"):
            H = cfg.hidden_size
            if t.shape == (E, 2 * I, H):
                gate, up = t[:, :I, :], t[:, I:, :]
            elif t.shape == (E, H, 2 * I):
                gate, up = t[:, :, :I].transpose(1, 2), t[:, :, I:].transpose(1, 2)
            else:
                raise SystemExit(f"unexpected gate_up_proj shape {tuple(t.shape)}")
            for e in range(E):
                out[pre + f"experts.{e}.w1.weight"] = gate[e].contiguous()
                out[pre + f"experts.{e}.w3.weight"] = up[e].contiguous()
        elif rest in ("experts.down_proj", "experts.down_proj.weight"):
            H = cfg.hidden_size
            if t.shape == (E, H, I):
                down = t
            elif t.shape == (E, I, H):
                down = t.transpose(1, 2)
            else:
                raise SystemExit(f"unexpected down_proj shape {tuple(t.shape)}")
            for e in range(E):
                out[pre + f"experts.{e}.w2.weight"] = down[e].contiguous()
        else:
            raise SystemExit(f"unknown MoE tensor {key}")
    return out


def save_canonical(state, outdir, shard_bytes):
    if shard_bytes is None:
        save_file(state, os.path.join(outdir, "model.safetensors"), metadata={"format": "pt"})
        return
    shards, cur, size = [], {}, 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += n
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(outdir, name), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    with open(os.path.join(outdir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


@torch.no_grad()
def reference(model, prompt):
    ids = torch.tensor([prompt])
    out = model(input_ids=ids, use_cache=True)
    logits, past = out.logits[0, -1], out.past_key_values
    case = {"prompt": prompt, "prefill_logits": logits.tolist()}
    greedy, margins = [], []
    for step in range(GREEDY_TOKENS):
        top = torch.topk(logits, 2)
        tok = int(top.indices[0])
        greedy.append(tok)
        margins.append(float(top.values[0] - top.values[1]))
        if step == GREEDY_TOKENS - 1:
            break
        out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        logits, past = out.logits[0, -1], out.past_key_values
        if step + 1 == DECODE_LOGIT_STEPS:
            case["decode_logits"] = logits.tolist()
            case["decode_steps"] = DECODE_LOGIT_STEPS
    # Cross-check the cached loop against one uncached forward over the whole sequence.
    full = model(input_ids=torch.tensor([prompt + greedy[:-1]]), use_cache=False).logits[0]
    again = full[len(prompt) - 1:].argmax(-1).tolist()
    assert again == greedy, f"cached and uncached greedy differ: {again} vs {greedy}"
    case["greedy"], case["margins"] = greedy, margins
    return case


def build(name, spec, outroot):
    torch.manual_seed(1234 + len(name) + ord(name[-1]))
    cfg = MixtralConfig(initializer_range=0.08, bos_token_id=1, eos_token_id=2,
                        attn_implementation="eager", **spec["config"])
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    outdir = os.path.join(outroot, name)
    os.makedirs(outdir, exist_ok=True)
    model = model.to(spec["dtype"])
    save_kwargs = {"max_shard_size": spec["shard_bytes"]} if spec["shard_bytes"] else {}
    model.save_pretrained(outdir, **save_kwargs)
    saved = set()
    for f in os.listdir(outdir):
        if f.endswith(".safetensors"):
            saved |= set(load_file(os.path.join(outdir, f)).keys())
    state = canonical_state_dict(model, cfg)
    layout = "canonical" if saved == set(state) else "rewritten"
    if layout == "rewritten":
        for f in os.listdir(outdir):
            if f.startswith("model") and ("safetensors" in f):
                os.remove(os.path.join(outdir, f))
        save_canonical(state, outdir, spec["shard_bytes"])
    print(f"{name}: save_pretrained layout {layout}; {len(state)} tensors")

    ref = MixtralForCausalLM.from_pretrained(outdir, dtype=torch.float32, attn_implementation="eager").eval()
    # The reload must see exactly the weights that were saved (compare parameters, not
    # logits: `.to(bf16)` also rounds the rotary inv_freq buffer of the in-memory model).
    reloaded = canonical_state_dict(ref, cfg)
    assert set(reloaded) == set(state), "reloaded tensor names differ"
    for k, t in state.items():
        assert torch.equal(reloaded[k], t.float()), f"reloaded tensor {k} differs"
    cases = [reference(ref, p) for p in PROMPTS[name]]
    golden = {"model": name, "stored_dtype": str(spec["dtype"]).replace("torch.", ""),
              "transformers": transformers.__version__, "torch": torch.__version__,
              "save_pretrained_layout": layout, "cases": cases}
    with open(os.path.join(outroot, f"{name}.golden.json"), "w") as f:
        json.dump(golden, f)
    for c in cases:
        print(f"  prompt {c['prompt']}: greedy {c['greedy'][:8]}... min margin {min(c['margins']):.4f}")


if __name__ == "__main__":
    outroot = sys.argv[1]
    for name, spec in GEOMETRIES.items():
        build(name, spec, outroot)
