#!/usr/bin/env bash
# Deletes the kind cluster created by e2e/kind-up.sh and stops its port-forward.
#   PDROUTE_KIND_CLUSTER   cluster name (default pdroute)
set -euo pipefail

CLUSTER="${PDROUTE_KIND_CLUSTER:-pdroute}"
STATE_DIR="${XDG_STATE_HOME:-$HOME/.local/state}/pdroute-kind/$CLUSTER"

log() { printf '[kind-down %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ -f "$STATE_DIR/port-forward.pid" ]; then
  pid="$(cat "$STATE_DIR/port-forward.pid")"
  # Only our own port-forward: check the command line before signalling.
  if ps -p "$pid" -o args= 2>/dev/null | grep -q "port-forward"; then
    kill "$pid" || true
  fi
  rm -f "$STATE_DIR/port-forward.pid"
fi

command -v kind >/dev/null 2>&1 || { log "kind is not installed"; exit 1; }
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "deleting kind cluster $CLUSTER"
  kind delete cluster --name "$CLUSTER"
else
  log "no kind cluster named $CLUSTER"
fi
rm -rf "$STATE_DIR"
