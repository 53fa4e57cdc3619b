#!/usr/bin/env bash
# Bad command-line input gets one clear error and a non-zero exit (run by scripts/test.sh):
# each case names the flag combination and a phrase the error must contain.
set -uo pipefail
duet="$1"
failed=0
expect_error() {
    local phrase="$1"; shift
    local out
    if out=$("$duet" "$@" 2>&1); then
        echo "FAIL: '$*' succeeded"; failed=1
    elif ! grep -qF -- "$phrase" <<<"$out"; then
        echo "FAIL: '$*' did not say '$phrase':"; echo "$out" | tail -3; failed=1
    else
        echo "ok: $*"
    fi
}
expect_error "--strategy gpu-only runs the experts as stored" generate --strategy gpu-only --expert-dtype q8 --prompt hi
expect_error "--gpu-memory must look like" generate --strategy fiddler --offload-device cpu --gpu-memory lots --prompt hi
expect_error "unknown synthetic geometry" bench scenarios --synthetic mixtral-9x9b --expert-dtype q4 --strategies cpu-only
expect_error "--gpu-sequences must be at least 1" generate --gpu-sequences 0 --prompt hi
expect_error "--max-context, --gpu-sequences and --max-tokens must be at least 1" plan --synthetic mixtral-8x7b --gpu-memory 24GiB --gpu-sequences 0
expect_error "is invalid for '--beam-dense" bench scenarios --synthetic mixtral-8x7b --beam-dense nowhere
exit $failed
