#!/usr/bin/env bash
# `make dev`: local services (started if none answer), migrations, a demo tenant and key, and the
# gateway on :8080. Uses the fake Ollama only when OLLAMA_BASE_URL does not answer, and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export DATABASE_URL="${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/neuronetz}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
export OLLAMA_BASE_URL="${OLLAMA_BASE_URL:-http://127.0.0.1:11434}"
export GATEWAY_PORT="${GATEWAY_PORT:-8080}"
export LOG_FORMAT="${LOG_FORMAT:-console}"
export MODEL_DISCOVERY_REFRESH_S="${MODEL_DISCOVERY_REFRESH_S:-15}"
export AUDIT_SPOOL_DIR="${AUDIT_SPOOL_DIR:-$PWD/.dev/spool}"
export NEURONETZ_ACTOR="${NEURONETZ_ACTOR:-make-dev}"
mkdir -p .dev

deploy/services.sh up .dev

"$BIN/neuronetz-gateway" migrate

FAKE_PID=""
cleanup() { [ -n "$FAKE_PID" ] && kill "$FAKE_PID" 2>/dev/null || true; }
trap cleanup EXIT
if ! curl -fsS -m 2 "$OLLAMA_BASE_URL/api/version" >/dev/null 2>&1; then
  FAKE_PORT=$("$BIN/python" -c "import os, urllib.parse as u; print(u.urlsplit(os.environ['OLLAMA_BASE_URL']).port or 11434)")
  cat <<MSG

  ************************************************************************************
  *  No Ollama answers at $OLLAMA_BASE_URL.
  *  Starting the FAKE Ollama from tests/fake_ollama.py on port $FAKE_PORT instead.
  *  Its answers are canned words, not a model. Point OLLAMA_BASE_URL at a real Ollama.
  ************************************************************************************

MSG
  "$BIN/python" -m tests.fake_ollama --host 127.0.0.1 --port "$FAKE_PORT" > .dev/fake-ollama.log 2>&1 &
  FAKE_PID=$!
  for _ in $(seq 1 50); do curl -fsS -m 1 "$OLLAMA_BASE_URL/api/version" >/dev/null 2>&1 && break; sleep 0.1; done
fi

if ! out=$("$BIN/neuronetz-gateway" create-tenant --name demo --rpm 120 --tpm 200000 --concurrent 8 2>&1); then
  case "$out" in *"already exists"*) ;; *) echo "$out" >&2; exit 1 ;; esac
fi
"$BIN/neuronetz-gateway" set-models --tenant demo --allow-all >/dev/null
KEY=$("$BIN/neuronetz-gateway" create-key --tenant demo --name "dev-$(date +%Y%m%d-%H%M%S)" | sed -n 's/^key=//p')
MODEL=$(curl -fsS -m 2 "$OLLAMA_BASE_URL/api/tags" | "$BIN/python" -c \
  "import json,sys; m=[x['name'] for x in json.load(sys.stdin).get('models') or [] if 'embed' not in x['name']]; print(m[0] if m else 'llama3.1:8b')")
cat <<MSG

  demo tenant: demo (allow_all_models on)
  demo key:    $KEY      (shown once; 'make dev' makes a new one each run)

  Try it:
  curl -s http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" -d '{"model":"$MODEL","messages":[{"role":"user","content":"Hello"}]}'

MSG
"$BIN/neuronetz-gateway" serve
