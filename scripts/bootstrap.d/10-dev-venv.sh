# The EPP / sidecar / simulator environment: the repo's .venv (editable install).
ensure_uv
if [ ! -x "$VENV/bin/python" ]; then
  uv venv -q -p python3.11 "$VENV"
fi
VIRTUAL_ENV="$VENV" uv pip install -q -e "${REPO_ROOT}[dev,bench]"
