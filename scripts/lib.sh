# Shared shell helpers for scripts/*. Source it; it sets PDROUTE_CACHE and paths.
# Heavy artifacts live in a stable directory outside the clone so CI and users
# reuse them across checkouts; everything is rebuilt when absent.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PDROUTE_CACHE="${PDROUTE_CACHE:-$HOME/.cache/pdroute}"
export UV_CACHE_DIR="${UV_CACHE_DIR:-$PDROUTE_CACHE/uv-cache}"
VENV="$REPO_ROOT/.venv"
mkdir -p "$PDROUTE_CACHE"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

ensure_uv() {
  if ! command -v uv >/dev/null 2>&1; then
    if [ ! -x "$PDROUTE_CACHE/uv/bin/uv" ]; then
      log "installing uv into $PDROUTE_CACHE/uv"
      python3 -m venv "$PDROUTE_CACHE/uv"
      "$PDROUTE_CACHE/uv/bin/pip" install -q "uv==0.13.8"
    fi
    export PATH="$PDROUTE_CACHE/uv/bin:$PATH"
  fi
}
