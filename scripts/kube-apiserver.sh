#!/usr/bin/env bash
# A throwaway control plane on loopback: etcd + kube-apiserver (no kubelet, no
# controller-manager), for tests and local experiments. Binaries and CRDs come from
# scripts/bootstrap.d/50-kube.sh (PDROUTE_FULL=1 scripts/bootstrap).
#
#   scripts/kube-apiserver.sh start DIR          start etcd + apiserver, install CRDs
#   scripts/kube-apiserver.sh stop DIR           stop both (data stays in DIR)
#   scripts/kube-apiserver.sh stop-apiserver DIR  stop only the apiserver (etcd keeps data)
#   scripts/kube-apiserver.sh start-apiserver DIR start it again on the same port
#
# After `start`, DIR/env holds KUBE_URL, KUBE_TOKEN (admin, group system:masters),
# KUBE_TOKEN_FILE, KUBE_CA_FILE (the apiserver's self-signed serving cert) and
# KUBE_EPP_TOKEN_FILE (user "epp", no permissions until RBAC grants some).
# Authorization is RBAC (the real thing: tests grant the EPP's ClusterRole).
# Admission: ServiceAccount is disabled (no controller-manager creates default SAs).
# Ports are allocated free on 127.0.0.1; logs go to DIR/*.log.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

cmd="${1:-}"
dir="${2:-}"
if [ -z "$cmd" ] || [ -z "$dir" ]; then
  echo "usage: $0 start|stop|stop-apiserver|start-apiserver DIR" >&2
  exit 2
fi
KUBE_BIN="${PDROUTE_KUBE_BIN:-$PDROUTE_CACHE/kube/bin}"
KUBE_CRDS="${PDROUTE_KUBE_CRDS:-$PDROUTE_CACHE/kube/crds}"
READY_TIMEOUT_S="${PDROUTE_KUBE_READY_TIMEOUT_S:-120}"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

stop_pid() {  # stop_pid FILE: TERM, wait up to 10 s, then KILL; only our own recorded pid
  local f="$1" pid
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

start_apiserver() {
  # shellcheck source=/dev/null
  source "$dir/ports"
  "$KUBE_BIN/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
    --cert-dir="$dir/certs" \
    --token-auth-file="$dir/tokens.csv" \
    --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$dir/sa.pub" \
    --service-account-signing-key-file="$dir/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 \
    --disable-admission-plugins=ServiceAccount \
    --allow-privileged=true \
    --endpoint-reconciler-type=none \
    --enable-priority-and-fairness=false \
    --profiling=false \
    >>"$dir/apiserver.log" 2>&1 &
  echo $! >"$dir/apiserver.pid"
  wait_ready
}

api() {  # api METHOD PATH [curl args...]
  local m="$1" p="$2"
  shift 2
  curl -sS --cacert "$dir/certs/apiserver.crt" -H "Authorization: Bearer $(cat "$dir/admin.token")" \
    -X "$m" "https://127.0.0.1:$API_PORT$p" "$@"
}

wait_ready() {
  local deadline=$((SECONDS + READY_TIMEOUT_S))
  until [ -f "$dir/certs/apiserver.crt" ] \
    && [ "$(api GET /readyz -o /dev/null -w '%{http_code}' 2>/dev/null)" = "200" ]; do
    if ! kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null; then
      echo "kube-apiserver exited; see $dir/apiserver.log:" >&2
      tail -20 "$dir/apiserver.log" >&2
      return 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "kube-apiserver not ready after ${READY_TIMEOUT_S}s; see $dir/apiserver.log" >&2
      return 1
    fi
    sleep 0.2
  done
}

install_crds() {
  local f code
  for f in "$KUBE_CRDS"/*.yaml; do
    code="$(api POST /apis/apiextensions.k8s.io/v1/customresourcedefinitions \
      -H 'Content-Type: application/yaml' --data-binary @"$f" -o "$dir/crd.out" -w '%{http_code}')"
    if [ "$code" != "201" ] && [ "$code" != "409" ]; then
      echo "installing CRD $f failed: HTTP $code: $(head -c 500 "$dir/crd.out")" >&2
      return 1
    fi
  done
  local deadline=$((SECONDS + 60))
  until [ "$(api GET /apis/inference.networking.k8s.io/v1/inferencepools -o /dev/null -w '%{http_code}')" = "200" ]; do
    if [ $SECONDS -ge $deadline ]; then
      echo "InferencePool CRD not served after 60s" >&2
      return 1
    fi
    sleep 0.2
  done
}

case "$cmd" in
  start)
    for b in etcd kube-apiserver; do
      if [ ! -x "$KUBE_BIN/$b" ]; then
        echo "$KUBE_BIN/$b missing: run \`PDROUTE_FULL=1 scripts/bootstrap\`" >&2
        exit 1
      fi
    done
    if ! ls "$KUBE_CRDS"/*.yaml >/dev/null 2>&1; then
      echo "no CRDs in $KUBE_CRDS: run \`PDROUTE_FULL=1 scripts/bootstrap\`" >&2
      exit 1
    fi
    mkdir -p "$dir/certs" "$dir/etcd"
    chmod 700 "$dir"
    ETCD_PORT="$(free_port)"
    ETCD_PEER_PORT="$(free_port)"
    API_PORT="$(free_port)"
    printf 'ETCD_PORT=%s\nETCD_PEER_PORT=%s\nAPI_PORT=%s\n' "$ETCD_PORT" "$ETCD_PEER_PORT" "$API_PORT" >"$dir/ports"
    openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
    openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
    openssl rand -hex 24 >"$dir/admin.token"
    openssl rand -hex 24 >"$dir/epp.token"
    {
      echo "$(cat "$dir/admin.token"),admin,admin,\"system:masters\""
      echo "$(cat "$dir/epp.token"),epp,epp,\"pdroute:epp\""
    } >"$dir/tokens.csv"
    chmod 600 "$dir/tokens.csv" "$dir/sa.key" "$dir/admin.token" "$dir/epp.token"
    "$KUBE_BIN/etcd" --name default --data-dir "$dir/etcd" \
      --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
      --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
      --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
      --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
      --initial-cluster "default=http://127.0.0.1:$ETCD_PEER_PORT" \
      --unsafe-no-fsync --quota-backend-bytes=1073741824 \
      >>"$dir/etcd.log" 2>&1 &
    echo $! >"$dir/etcd.pid"
    # Leave nothing running behind a failed start.
    trap 'stop_pid "$dir/apiserver.pid"; stop_pid "$dir/etcd.pid"' ERR
    start_apiserver
    install_crds
    {
      echo "KUBE_URL=https://127.0.0.1:$API_PORT"
      echo "KUBE_TOKEN=$(cat "$dir/admin.token")"
      echo "KUBE_TOKEN_FILE=$dir/admin.token"
      echo "KUBE_EPP_TOKEN_FILE=$dir/epp.token"
      echo "KUBE_CA_FILE=$dir/certs/apiserver.crt"
    } >"$dir/env"
    trap - ERR
    log "kube-apiserver ready at https://127.0.0.1:$API_PORT (env: $dir/env)"
    ;;
  start-apiserver)
    start_apiserver
    ;;
  stop-apiserver)
    stop_pid "$dir/apiserver.pid"
    ;;
  stop)
    stop_pid "$dir/apiserver.pid"
    stop_pid "$dir/etcd.pid"
    ;;
  *)
    echo "unknown command $cmd" >&2
    exit 2
    ;;
esac
