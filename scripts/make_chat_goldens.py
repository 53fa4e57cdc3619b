#!/usr/bin/env python3
"""Chat-template goldens: transformers' apply_chat_template (jinja2, trim_blocks and
lstrip_blocks as transformers sets them) renders each template of
Tests/Fixtures/chat/templates.json over a set of conversations, with and without the
generation prompt; token ids where Duet has the family's tokenizer (Mixtral's, Qwen's);
and, for Mistral instruct, mistral-common's own chat encoding.

    pip install "transformers==4.46.3" tokenizers==0.20.3 mistral-common==1.13.1 jinja2
    python3 scripts/make_chat_goldens.py        # writes Tests/Fixtures/chat/goldens.json
"""
import gzip, json

import jinja2, transformers
from transformers import PreTrainedTokenizerFast

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
     {"role": "user", "content": "C"}],
    [{"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "Silent pond\nfrog jumps"}],
    [{"role": "user", "content": "  spaces around  \n\ttabs  "}, {"role": "assistant", "content": " reply with ünïcödé 日本語 🙂 "},
     {"role": "user", "content": "<s> special </s> text\n\nwith 'quotes' and \"double\" and {{ braces }}"}],
    [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}],
    [{"role": "system", "content": "only a system message"}],
    [{"role": "user", "content": "Weather?"},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "id": "c1",
      "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C", "days": 2}}}]},
     {"role": "tool", "name": "get_weather", "content": "{\"temp\": 21.5}"}],
]


def tokenizer_for(name, spec):
    if name.startswith("qwen"):
        raw = gzip.open("Tests/Fixtures/tokenizers/qwen/tokenizer.json.gz").read().decode()
        from tokenizers import Tokenizer
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(raw))
    elif name.startswith("mistral") or name.startswith("mixtral"):
        tok = PreTrainedTokenizerFast(tokenizer_file="Models/duet-demo-moe/tokenizer.json")
    else:
        tok = PreTrainedTokenizerFast(tokenizer_file="Models/duet-demo-moe/tokenizer.json")  # rendering only
    tok.bos_token = spec["bos"] or None
    tok.eos_token = spec["eos"]
    tok.chat_template = spec["template"]
    return tok, name.startswith(("qwen", "mistral", "mixtral"))


def mistral_common_ids(conversation):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    kinds = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}
    try:
        request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in conversation])
        return MistralTokenizer.v1().encode_chat_completion(request).tokens
    except Exception as e:
        return {"error": type(e).__name__}


def main():
    templates = json.load(open("Tests/Fixtures/chat/templates.json"))
    out = {"transformers": transformers.__version__, "jinja2": jinja2.__version__, "conversations": CONVERSATIONS,
           # The same conversations as JSON text, keys in their original order (for tojson).
           "conversations_json": [json.dumps(c, ensure_ascii=False) for c in CONVERSATIONS], "cases": []}
    for name, spec in templates.items():
        tok, with_ids = tokenizer_for(name, spec)
        for ci, conversation in enumerate(CONVERSATIONS):
            for gen in (False, True):
                case = {"template": name, "conversation": ci, "add_generation_prompt": gen}
                try:
                    case["prompt"] = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)
                    if with_ids:
                        case["ids"] = tok.apply_chat_template(conversation, tokenize=True, add_generation_prompt=gen)
                except jinja2.exceptions.TemplateError as e:
                    case["error"] = str(e)
                if name == "mistral-instruct" and not gen:
                    case["mistral_common_ids"] = mistral_common_ids(conversation)
                out["cases"].append(case)
    json.dump(out, open("Tests/Fixtures/chat/goldens.json", "w"), ensure_ascii=False, indent=0)
    agree = [c for c in out["cases"] if isinstance(c.get("mistral_common_ids"), list) and "ids" in c]
    same = sum(c["ids"] == c["mistral_common_ids"] for c in agree)
    print(f"{len(out['cases'])} cases; mistral-common == HF template ids on {same}/{len(agree)} conversations")
    for c in agree:
        if c["ids"] != c["mistral_common_ids"]:
            print("  differs:", c["conversation"], c["ids"][:16], c["mistral_common_ids"][:16])


if __name__ == "__main__":
    main()
