#!/usr/bin/env bash
# Installs loraplex into the current Python environment: the one install step of deploy/docker/Dockerfile and
# Dockerfile.cuda, and what tests/deploy/test_install.py runs in a fresh venv (so what the images contain is
# tested, though no container engine runs on our machines).
#
#   deploy/docker/install.sh [SRC]          SRC: the loraplex source tree (default: this script's repo)
#   deploy/docker/install.sh --system       (images only, as root) the Debian packages the server needs at
#                                           run time (g++ builds the CPU kernels on first start) and the
#                                           non-root user `loraplex` (uid 10001) owning /data; with
#                                           PYTHON_PACKAGES (Debian names) a Python too (the CUDA base has none)
#
# Environment:
#   TORCH_VERSION     torch to install first (default 2.13.0)
#   TORCH_INDEX_URL   where pip finds that torch (the CPU or a CUDA wheel index); empty: pip's own index
#   EXTRAS            loraplex extras, comma-separated (default: structured)
#   BAKE_MODEL        1: fetch the default model now, into LORAPLEX_CACHE_DIR (default 0: at first start)
#   PIP_NO_CACHE_DIR  as pip reads it (the images set 1)
set -euo pipefail

if [ "${1:-}" = --system ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends g++ libgomp1 curl ca-certificates \
        ${PYTHON_PACKAGES:-}
    rm -rf /var/lib/apt/lists/*
    useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin loraplex
    mkdir -p /data && chown loraplex:loraplex /data
    exit 0
fi
SRC=${1:-$(cd "$(dirname "$0")/../.." && pwd)}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
EXTRAS=${EXTRAS:-structured}
PYTHON=${PYTHON:-python3}

log() { echo "[install.sh] $*" >&2; }

[ -f "$SRC/pyproject.toml" ] || { log "no pyproject.toml in $SRC"; exit 2; }
case "$EXTRAS" in *[!a-z0-9,_-]*) log "EXTRAS must be comma-separated extra names, got '$EXTRAS'"; exit 2;; esac

log "torch==$TORCH_VERSION${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
"$PYTHON" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"

target="$SRC"
[ -n "$EXTRAS" ] && target="$SRC[$EXTRAS]"
log "loraplex from $SRC${EXTRAS:+ with [$EXTRAS]}"
# a copy, not an editable install: the image must not depend on the build context staying around
"$PYTHON" -m pip install -q "$target" "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}

"$PYTHON" -c "import torch, loraplex.serve.cli; print('[install.sh] loraplex ready, torch', torch.__version__)" >&2
if [ "${BAKE_MODEL:-0}" = 1 ]; then
    log "fetching the default model into ${LORAPLEX_CACHE_DIR:-~/.cache/loraplex}"
    "$PYTHON" -m loraplex.serve.cli download
fi
