#!/usr/bin/env bash
# Starts a local Substrate chain (the Penpal runtime under chopsticks) from registry packages only; see README.md.
set -euo pipefail
cd "$(dirname "$0")"
PORT="${PORT:-9944}"
ZN_VER=0.7.1
# 1. chopsticks (npm)
[ -x node_modules/.bin/chopsticks ] || npm ci --no-audit --no-fund --loglevel=error
# 2. runtime: plain chain spec shipped inside the crates.io crate zombienet-orchestrator (testing/rococo-penpal-local-plain.json)
if [ ! -f penpal-dev-raw.json ]; then
  cargo info "zombienet-orchestrator@${ZN_VER}" >/dev/null 2>&1 || true
  CRATE=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/zombienet-orchestrator-${ZN_VER}.crate | head -1)
  tar xzf "$CRATE" -O "zombienet-orchestrator-${ZN_VER}/testing/rococo-penpal-local-plain.json" > penpal-plain.json
  # 3. plain -> raw genesis using the runtime's GenesisBuilder API ("development" preset: Alice..Ferdie funded, sudo=Alice)
  node mkraw.mjs penpal-plain.json penpal-dev-raw.json development
fi
# --prepare: install and build the genesis only (tests start the chain themselves)
[ "${1:-}" = "--prepare" ] && { echo "chain prepared in $(pwd)"; exit 0; }
# 4. run
node node_modules/.bin/chopsticks --genesis penpal-dev-raw.json --port "$PORT" --build-block-mode Instant > chopsticks.log 2>&1 &
echo $! > chopsticks.pid
for i in $(seq 1 120); do grep -q "RPC listening" chopsticks.log && { echo "chain up on ws://127.0.0.1:$PORT (pid $(cat chopsticks.pid))"; exit 0; }; sleep 0.5; done
echo "chopsticks failed to start"; cat chopsticks.log; exit 1
