# Slow tier: a real etcd + kube-apiserver (the envtest approach, no kubelet) and the
# Gateway API / InferencePool CRDs, for the `kube` test tier and the Helm chart checks.
#
#   $PDROUTE_CACHE/kube/bin/{etcd,kube-apiserver}   built from the Go module proxy
#   $PDROUTE_CACHE/kube/crds/*.yaml                 CRDs (gateway-api standard + InferencePool v1)
#
# Both are skipped when present. Built from tools/kube (a throwaway module that requires
# k8s.io/kubernetes and replaces every k8s.io staging module with its v0.N.M release).
# Knobs: PDROUTE_KUBE_BUILD_P (go build -p, default 2) for small machines.
if [ "${PDROUTE_FULL:-0}" = "1" ] || [ "${PDROUTE_KUBE:-0}" = "1" ]; then
  KUBE_DIR="$PDROUTE_CACHE/kube"
  KUBE_BIN="$KUBE_DIR/bin"
  KUBE_VERSION="v1.37.2"  # keep in sync with tools/kube/go.mod
  KUBE_BUILD_ID="$KUBE_VERSION-1"  # bump to force a rebuild when the build recipe changes
  GATEWAY_API_VERSION="v1.6.3"  # v1.7 needs go >= 1.27
  GIE_VERSION="v1.6.0"  # the newest on the module proxy
  mkdir -p "$KUBE_BIN" "$KUBE_DIR/crds"

  if ! command -v go >/dev/null 2>&1; then
    echo "50-kube.sh: the Go toolchain (>= 1.26) is required to build etcd and kube-apiserver;" \
      "install it from https://go.dev/dl/ and put it on PATH" >&2
    return 1
  fi

  if [ ! -x "$KUBE_BIN/kube-apiserver" ] || [ ! -x "$KUBE_BIN/etcd" ] \
    || [ "$(cat "$KUBE_BIN/.kube-apiserver.version" 2>/dev/null)" != "$KUBE_BUILD_ID" ]; then
    log "building etcd + kube-apiserver $KUBE_VERSION into $KUBE_BIN (slow: ~minutes)"
    start=$(date +%s)
    (
      cd "$REPO_ROOT/tools/kube" || exit 1
      export GOFLAGS="-mod=mod -trimpath" CGO_ENABLED=0
      minor="${KUBE_VERSION#v1.}"
      minor="${minor%%.*}"
      v=k8s.io/component-base/version
      go build -p "${PDROUTE_KUBE_BUILD_P:-2}" \
        -ldflags="-s -w -X $v.gitVersion=$KUBE_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor" \
        -o "$KUBE_BIN/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
      go build -p "${PDROUTE_KUBE_BUILD_P:-2}" -ldflags="-s -w" \
        -o "$KUBE_BIN/etcd.tmp" go.etcd.io/etcd/server/v3
    )
    mv "$KUBE_BIN/kube-apiserver.tmp" "$KUBE_BIN/kube-apiserver"
    mv "$KUBE_BIN/etcd.tmp" "$KUBE_BIN/etcd"
    echo "$KUBE_BUILD_ID" >"$KUBE_BIN/.kube-apiserver.version"
    log "kube binaries built in $(($(date +%s) - start))s"
  fi

  if [ ! -f "$KUBE_DIR/crds/.done-$GATEWAY_API_VERSION-$GIE_VERSION" ]; then
    log "fetching CRDs (gateway-api $GATEWAY_API_VERSION, inference extension $GIE_VERSION)"
    rm -f "$KUBE_DIR/crds/"*.yaml
    # Outside any module: `go mod download` only fills the module cache.
    crd_tmp="$(mktemp -d)"
    gw_dir="$(cd "$crd_tmp" && go mod download -json \
      "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
    gie_dir="$(cd "$crd_tmp" && go mod download -json \
      "sigs.k8s.io/gateway-api-inference-extension@$GIE_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
    rmdir "$crd_tmp"
    if [ -z "$gw_dir" ] || [ -z "$gie_dir" ]; then
      echo "50-kube.sh: could not download the CRD modules from the Go module proxy" >&2
      return 1
    fi
    # Only single-document CRDs (standard/ also holds a ValidatingAdmissionPolicy).
    for f in "$gw_dir"/config/crd/standard/*.yaml \
      "$gie_dir"/config/crd/bases/inference.networking.k8s.io_inferencepools.yaml; do
      if grep -q '^kind: CustomResourceDefinition' "$f" && ! grep -q '^---' "$f"; then
        cp "$f" "$KUBE_DIR/crds/"
      fi
    done
    chmod 644 "$KUBE_DIR/crds/"*.yaml
    touch "$KUBE_DIR/crds/.done-$GATEWAY_API_VERSION-$GIE_VERSION"
  fi
  export PDROUTE_KUBE_BIN="$KUBE_BIN"
  export PDROUTE_KUBE_CRDS="$KUBE_DIR/crds"
fi
