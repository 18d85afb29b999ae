#!/usr/bin/env bash
# Releases while admin writes storm the store: WRITERS loops of `broker secret generate`
# (each a new store generation, so every release decided before it commits is decided
# again) against a release-built dev broker on SQLite, while broker-load attests for 10 s at
# concurrency 4. Prints the flows, the refusals by status, the writes, and the broker's
# stale-decision and group counters. Usage: scripts/admin-storm.sh [WRITERS] (default 8).
# Reported in docs/benchmarks.md ("Releases during a burst of admin writes").
set -euo pipefail
cd "$(dirname "$0")/.."
writers=${1:-8}
cargo build --release --locked --all-features --bins
B=target/release/broker
L=target/release/broker-load
work=$(mktemp -d)
pid=
cleanup() {
  touch "$work/stop"
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  sleep 1
  rm -rf "$work"
}
trap cleanup EXIT
dev="$work/dev"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$B" init --dev "$dev" --listen "127.0.0.1:$port" > /dev/null
RUST_LOG=warn "$B" serve --config "$dev/broker.toml" 2> "$work/broker.log" &
pid=$!
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
export BROKER_ADMIN_CONFIG="$dev/admin.toml"
"$B" secret generate db-key > /dev/null
"$B" policy set "$dev/policy.json" > /dev/null
for w in $(seq 1 "$writers"); do
  (
    i=0
    while [ ! -e "$work/stop" ]; do
      "$B" secret generate "storm-$w-$i" > /dev/null 2>&1 || true
      i=$((i + 1))
    done
    echo "$i" > "$work/writes-$w"
  ) &
done
"$L" run --url "https://127.0.0.1:$port" --ca "$dev/ca.pem" --sim-dir "$dev/sim" \
  --broker-pid "$pid" --json --concurrency 4 --duration 10 > "$work/load.json"
touch "$work/stop"
sleep 2
python3 - "$work/load.json" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
print(f"flows released: {v['flows']}  refused: {v['errors'] or 'none'}")
PY
echo "admin writes: $(cat "$work"/writes-* | awk '{ s += $1 } END { print s }') in ~10 s by $writers writers"
curl -sk "https://127.0.0.1:$port/metrics" |
  grep -E '^broker_store_stale_decisions_total|^broker_store_commit_group_size_(sum|count)' || true
