#!/bin/sh
# Starts the app under uvicorn on loopback with a low descriptor limit, as in the incident.
#   PORT=8000 NOFILE=64 LEAK=1 WORKERS=1 BACKLOG=2048 PYTHON=python3 ./serve.sh
# LOOP=uvloop HTTP=httptools runs it as `uvicorn[standard]` does (the default, asyncio and h11,
# is what plain `pip install uvicorn` runs).
# exec keeps the pid: attach fdtrace to it (with --follow when WORKERS > 1).
# ENTRY=script runs the `uvicorn` command installed beside PYTHON, as deployments do, so that the
# process is named uvicorn (what `fdtrace serve --comm uvicorn` selects) rather than python3.
set -eu
cd "$(dirname "$0")"
ulimit -n "${NOFILE:-64}"
if [ "${ENTRY:-module}" = script ]; then
  set -- "$(dirname "${PYTHON:-python3}")/uvicorn"
else
  set -- "${PYTHON:-python3}" -m uvicorn
fi
# UDS=/path/app.sock listens on a unix socket instead (nginx: server unix:/path/app.sock).
if [ -n "${UDS:-}" ]; then
  set -- "$@" app:app --uds "$UDS"
else
  set -- "$@" app:app --host 127.0.0.1 --port "${PORT:-8000}"
fi
exec "$@" \
  --workers "${WORKERS:-1}" --backlog "${BACKLOG:-2048}" --no-access-log \
  --loop "${LOOP:-asyncio}" --http "${HTTP:-h11}"
