#!/usr/bin/env bash
# `make app` from a clone brings the app up: start it, wait for its port, call one
# endpoint with gradio_client, stop it (the whole process group, by its id).
#
#   scripts/check_make_app.sh [CLONE_DIR]       # default: this repository
#
# On a fresh clone `make app` first creates .venv and installs the project (minutes), so
# the wait is long (CHECK_TIMEOUT, default 1800 s). Environment: BLIP2LAB_MODEL (default
# shapes-opt), BLIP2LAB_PORT (default: a free port), BLIP2LAB_THREADS (default 1).
set -euo pipefail

dir=$(cd "${1:-$(dirname "$0")/..}" && pwd)
timeout=${CHECK_TIMEOUT:-1800}
port=${BLIP2LAB_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log=$(mktemp -t make-app.XXXXXX.log)

# setsid: `make app` and the python it starts get a process group of their own to stop.
BLIP2LAB_PORT=$port BLIP2LAB_HOST=127.0.0.1 BLIP2LAB_THREADS=${BLIP2LAB_THREADS:-1} \
    setsid make -C "$dir" app >"$log" 2>&1 &
pid=$!
trap 'kill -TERM -- "-$pid" 2>/dev/null || true' EXIT

start=$(date +%s)
echo "make app in $dir (log $log), waiting for port $port ..."
until python3 -c "import socket, sys; s = socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $port)))" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "make app exited before listening:"; tail -n 40 "$log"; exit 1
    fi
    if (( $(date +%s) - start > timeout )); then
        echo "no answer on port $port after $timeout s:"; tail -n 40 "$log"; exit 1
    fi
    sleep 1
done
echo "listening after $(( $(date +%s) - start )) s"

"$dir/.venv/bin/python" - "$port" <<'PY'
import sys
from gradio_client import Client

client = Client(f"http://127.0.0.1:{sys.argv[1]}/", verbose=False)
info = client.predict(api_name="/model_info")
assert "parameters" in info, info
print("model_info:", info.splitlines()[0])
PY
echo "ok: make app serves requests"
