"""The King James Bible dump (scripts/fetch_corpus.sh) as chapters, and the demo model's
held-out split: every 20th chapter (index % 20 == 7), as scripts/train_demo_moe.py holds out.

    python3 scripts/kjv.py --held-out .corpus/kjv-heldout.txt   # the held-out chapters, one per paragraph
"""
import argparse
import re


def chapters(path):
    """The KJV dump -> [(book chapter, text)], verses joined with single spaces."""
    out, title, verses, current = [], None, [], None
    for line in open(path, encoding="utf-8"):
        line = line.rstrip("\n")
        m = re.match(r"^\s+(\d+) (.*)$", line)
        if m:
            if current is not None:
                verses.append(current)
            current = m.group(2).strip()
        elif line.strip() == "":
            continue
        elif re.match(r"^\S.* \d+$", line):
            if current is not None:
                verses.append(current)
            if title is not None and verses:
                out.append((title, " ".join(verses)))
            title, verses, current = line.strip(), [], None
        elif current is not None:
            current += " " + line.strip()
    if current is not None:
        verses.append(current)
    if title is not None and verses:
        out.append((title, " ".join(verses)))
    return out


def held_out(docs):
    return [d for i, d in enumerate(docs) if i % 20 == 7]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=".corpus/kjv.txt")
    ap.add_argument("--held-out", required=True, help="where to write the held-out chapters' text")
    a = ap.parse_args()
    docs = held_out(chapters(a.corpus))
    with open(a.held_out, "w", encoding="utf-8") as f:
        f.write("\n\n".join(text for _, text in docs) + "\n")
    print(f"wrote {len(docs)} chapters to {a.held_out}")
