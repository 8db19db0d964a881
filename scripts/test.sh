#!/usr/bin/env bash
# Sets up a venv (CPU torch), fetches the default model once, runs the whole test suite.
# Extra arguments go to pytest. pytest exits 5 when it collected no tests: that fails here too.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LORAPLEX_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 -e '.[dev]'
"$VENV/bin/loraplex" download
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q -ra "$@"
