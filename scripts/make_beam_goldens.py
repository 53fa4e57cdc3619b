#!/usr/bin/env python3
"""Beam-search goldens: HF transformers' generate(num_beams=W, do_sample=False,
num_return_sequences=W) on the committed golden checkpoints (Tests/Fixtures/mixtral-tiny-*),
in fp32 on the CPU. Records the returned sequences (generated part), sequences_scores and the
settings. A second set uses an EOS id the models actually produce, so finished hypotheses,
length normalisation and early stopping are exercised (the checkpoint's EOS, id 2, and the
third token of the greedy continuation).

    python3 scripts/make_beam_goldens.py OUT.json      (torch + transformers: the GPU host)
"""
import json, sys

import torch
import transformers
from transformers import MixtralForCausalLM

CASES = [
    # (model, prompt, width, max_new_tokens, length_penalty, early_stopping, eos)
    ("mixtral-tiny-a", [1, 17, 250, 3, 99, 400, 12], 2, 12, 1.0, False, None),
    ("mixtral-tiny-a", [1, 17, 250, 3, 99, 400, 12], 4, 12, 1.0, False, None),
    ("mixtral-tiny-b", [1, 9, 99, 199, 299, 399, 499, 599, 42, 43, 44, 45, 46], 2, 10, 1.0, False, None),
    ("mixtral-tiny-b", [1, 9, 99, 199, 299, 399, 499, 599, 42, 43, 44, 45, 46], 4, 10, 1.0, False, None),
    ("mixtral-tiny-b", [1, 600, 2, 33], 4, 10, 0.5, False, None),
]


@torch.no_grad()
def main():
    out = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": []}
    models = {}
    for name, prompt, width, new, lp, early, eos in CASES:
        if name not in models:
            models[name] = MixtralForCausalLM.from_pretrained(f"Tests/Fixtures/{name}", dtype=torch.float32).eval()
        model = models[name]
        ids = torch.tensor([prompt])
        # Pick an EOS the model will emit: the token greedy decoding produces 3rd.
        greedy = model.generate(ids, do_sample=False, max_new_tokens=3, min_new_tokens=3, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        for eos_id in ([2, greedy[2]] if eos is None else [eos]):  # the checkpoint's EOS, and one it emits
            kwargs = dict(num_beams=width, do_sample=False, num_return_sequences=width, max_new_tokens=new,
                          length_penalty=lp, early_stopping=early, return_dict_in_generate=True, output_scores=True,
                          pad_token_id=0)
            kwargs["eos_token_id"] = eos_id
            r = model.generate(ids, **kwargs)
            seqs = [s[len(prompt):].tolist() for s in r.sequences]
            # Drop right padding after an EOS (HF pads finished beams with pad_token_id).
            clean = []
            for s in seqs:
                if eos_id in s:
                    s = s[: s.index(eos_id) + 1]
                clean.append(s)
            out["cases"].append({"model": name, "prompt": prompt, "num_beams": width, "max_new_tokens": new,
                                 "length_penalty": lp, "early_stopping": early, "eos_token_id": eos_id,
                                 "sequences": clean, "sequences_scores": r.sequences_scores.tolist()})
            print(name, width, "eos", eos_id, [len(s) for s in clean], [round(x, 4) for x in r.sequences_scores.tolist()])
    json.dump(out, open(sys.argv[1], "w"), indent=0)


if __name__ == "__main__":
    main()
