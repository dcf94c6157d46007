#!/usr/bin/env bash
# Creates a kind cluster running pdroute behind Envoy Gateway, end to end:
#   kind cluster -> InferencePool CRDs -> Envoy Gateway (+ Gateway API CRDs) with the
#   Envoy AI Gateway extension server (InferencePool backends) -> the pdroute image
#   (built here, loaded into kind) -> charts/pdroute with simulated model servers
#   (real EPP and sidecar) -> Gateway + HTTPRoute -> a port-forward to the gateway.
# Needs: docker, kind, kubectl, helm (v3) on PATH, and internet access for images/charts.
# Idempotent: re-running upgrades what is there. Tear down with e2e/kind-down.sh.
#
# Settings (environment):
#   PDROUTE_KIND_CLUSTER   cluster name                  (default pdroute)
#   PDROUTE_E2E_PORT       local port of the gateway     (default 8080)
#   PDROUTE_IMAGE          image to build and load       (default ghcr.io/pdroute/pdroute:0.1.0)
#   PDROUTE_VALUES         chart values file             (default charts/pdroute/examples/simulator.yaml)
#   PDROUTE_E2E_MODEL      model the readiness request names (default sim-model)
#   ENVOY_GATEWAY_VERSION  (default v1.7.0)   AI_GATEWAY_VERSION (default v0.5.0)
#   GIE_VERSION            InferencePool CRDs (default v1.6.0)
#   KIND_NODE_IMAGE        optional kindest/node image
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER="${PDROUTE_KIND_CLUSTER:-pdroute}"
PORT="${PDROUTE_E2E_PORT:-8080}"
IMAGE="${PDROUTE_IMAGE:-ghcr.io/pdroute/pdroute:0.1.0}"
VALUES="${PDROUTE_VALUES:-$ROOT/charts/pdroute/examples/simulator.yaml}"
MODEL="${PDROUTE_E2E_MODEL:-sim-model}"
EG_VERSION="${ENVOY_GATEWAY_VERSION:-v1.7.0}"
AIGW_VERSION="${AI_GATEWAY_VERSION:-v0.5.0}"
GIE_VERSION="${GIE_VERSION:-v1.6.0}"
NS="default"
STATE_DIR="${XDG_STATE_HOME:-$HOME/.local/state}/pdroute-kind/$CLUSTER"
CTX="kind-$CLUSTER"

log() { printf '[kind-up %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
kc() { kubectl --context "$CTX" "$@"; }

for tool in docker kind kubectl helm curl; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (see docs/kubernetes.md)"
done
docker info >/dev/null 2>&1 || die "docker is not running"
mkdir -p "$STATE_DIR"

# 1. Cluster -----------------------------------------------------------------------
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "cluster $CLUSTER exists"
else
  log "creating kind cluster $CLUSTER"
  node_args=()
  if [ -n "${KIND_NODE_IMAGE:-}" ]; then node_args=(--image "$KIND_NODE_IMAGE"); fi
  kind create cluster --name "$CLUSTER" "${node_args[@]}" --wait 120s
fi

# 2. InferencePool CRDs (Gateway API CRDs come with the Envoy Gateway chart) --------
log "installing InferencePool CRDs ($GIE_VERSION)"
kc apply --server-side -k \
  "https://github.com/kubernetes-sigs/gateway-api-inference-extension/config/crd?ref=$GIE_VERSION"

# 3. Envoy Gateway + Envoy AI Gateway ---------------------------------------------
log "installing Envoy Gateway $EG_VERSION"
helm --kube-context "$CTX" upgrade --install eg oci://docker.io/envoyproxy/gateway-helm \
  --version "$EG_VERSION" -n envoy-gateway-system --create-namespace \
  -f "$ROOT/gateway-manifests/envoy-gateway/eg-values.yaml" --wait --timeout 5m
kc apply -f "$ROOT/e2e/manifests/envoy-gateway-inferencepool-rbac.yaml"
log "installing Envoy AI Gateway $AIGW_VERSION"
helm --kube-context "$CTX" upgrade --install aieg-crd oci://docker.io/envoyproxy/ai-gateway-crds-helm \
  --version "$AIGW_VERSION" -n envoy-ai-gateway-system --create-namespace --wait
helm --kube-context "$CTX" upgrade --install aieg oci://docker.io/envoyproxy/ai-gateway-helm \
  --version "$AIGW_VERSION" -n envoy-ai-gateway-system --wait --timeout 5m
# Envoy Gateway reads its extension config at start.
kc -n envoy-gateway-system rollout restart deployment/envoy-gateway
kc -n envoy-gateway-system rollout status deployment/envoy-gateway --timeout=180s

# 4. The pdroute image --------------------------------------------------------------
log "building $IMAGE"
DOCKER_BUILDKIT=1 docker build -f "$ROOT/e2e/Dockerfile" -t "$IMAGE" "$ROOT"
kind load docker-image "$IMAGE" --name "$CLUSTER"

# 5. pdroute chart (EPP + InferencePool + simulated prefill/decode pods) ------------
log "installing charts/pdroute with $(basename "$VALUES")"
helm --kube-context "$CTX" upgrade --install pdroute "$ROOT/charts/pdroute" -n "$NS" \
  -f "$VALUES" --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" \
  --wait --timeout 5m

# 6. Gateway + HTTPRoute --------------------------------------------------------------
log "applying the Envoy Gateway manifests"
kc -n "$NS" apply -f "$ROOT/gateway-manifests/envoy-gateway/gateway.yaml"
kc -n "$NS" wait --for=condition=Programmed gateway/inference-gateway --timeout=180s
kc -n "$NS" wait --for=condition=Available deployment --all --timeout=300s

# 7. Port-forward to the gateway's Envoy -----------------------------------------------
svc="$(kc -n envoy-gateway-system get service \
  -l "gateway.envoyproxy.io/owning-gateway-name=inference-gateway,gateway.envoyproxy.io/owning-gateway-namespace=$NS" \
  -o jsonpath='{.items[0].metadata.name}')"
[ -n "$svc" ] || die "no Envoy service for gateway inference-gateway"
if [ -f "$STATE_DIR/port-forward.pid" ]; then
  kill "$(cat "$STATE_DIR/port-forward.pid")" 2>/dev/null || true
fi
nohup kubectl --context "$CTX" -n envoy-gateway-system port-forward "service/$svc" \
  "$PORT:80" >"$STATE_DIR/port-forward.log" 2>&1 &
echo $! >"$STATE_DIR/port-forward.pid"

log "waiting for the route to answer on 127.0.0.1:$PORT"
for _ in $(seq 1 60); do
  if curl -fsS -o /dev/null -H 'content-type: application/json' \
    -d "{\"model\":\"$MODEL\",\"prompt\":\"ping\",\"max_tokens\":1}" \
    "http://127.0.0.1:$PORT/v1/completions"; then
    log "ready"
    echo "export PDROUTE_E2E_GATEWAY_URL=http://127.0.0.1:$PORT"
    exit 0
  fi
  sleep 2
done
die "the gateway did not answer on 127.0.0.1:$PORT (see $STATE_DIR/port-forward.log)"
