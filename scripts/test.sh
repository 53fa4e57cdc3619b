#!/usr/bin/env bash
# The test command (README, .ci/run): the Swift tests, the CLI's errors on bad flags, then
# the server's end-to-end test with the official `openai` Python client against a running
# `duet serve`.
set -euo pipefail
cd "$(dirname "$0")/.."

swift test

swift build --product duet
bash scripts/test_cli_errors.sh "$(swift build --product duet --show-bin-path)/duet"
venv=.build/e2e-venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check "openai==3.54.0"
"$venv/bin/python" scripts/test_server_openai.py "$(swift build --product duet --show-bin-path)/duet"
