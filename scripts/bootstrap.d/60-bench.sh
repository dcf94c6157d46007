# Peer routers for `pdroute bench` (vllm-router, sglang-router: Rust wheels from PyPI,
# ~10 s each with a warm uv cache), each in its own environment under $PDROUTE_CACHE,
# never in .venv. Installed here on the full tier (CI); otherwise `pdroute bench`
# installs them on first use (pdroute/bench/arms.py: ensure_peer, same paths).
if [ "${PDROUTE_FULL:-0}" = "1" ]; then
  for req in "vllm-router==0.1.17" "sglang-router==0.3.2"; do
    name="${req%%==*}"
    env="$PDROUTE_CACHE/peers/$name-${req##*==}"
    if [ ! -x "$env/bin/$name" ]; then
      ensure_uv
      log "installing $req into $env"
      rm -rf "$env"
      uv venv -q -p python3.11 "$env"
      VIRTUAL_ENV="$env" uv pip install -q "$req"
    fi
  done
fi
