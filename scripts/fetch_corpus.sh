#!/usr/bin/env bash
# Public-domain English text for benchmarks and the demo model: the King James Bible as
# Debian ships it (bible-kjv-text 4.38 holds the text, bible-kjv 4.38 the program that
# prints it). Writes .corpus/kjv.txt (4.3 MB; ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
out=.corpus/kjv.txt
[ -s "$out" ] && { echo "$out exists"; exit 0; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download bible-kjv-text=4.38 bible-kjv=4.38 >/dev/null 2>&1) || {
    apt-get update -qq >/dev/null && (cd "$tmp" && apt-get download bible-kjv-text=4.38 bible-kjv=4.38 >/dev/null); }
for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$tmp/root"; done
mkdir -p .corpus
"$tmp/root/usr/bin/bible" -p "$tmp/root/usr/lib" "gen1:1-rev22:21" > "$out"
echo "wrote $out ($(wc -c < "$out") bytes)"
