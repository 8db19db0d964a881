#!/usr/bin/env bash
# Sets up a venv (CPU torch) and starts the server on the default model at 127.0.0.1:8000.
# Extra arguments go to `loraplex serve` (e.g. --dtype float32, --port 8080, --model PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LORAPLEX_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 -e '.[structured]'
export HF_HUB_OFFLINE=1
exec "$VENV/bin/loraplex" serve "$@"
