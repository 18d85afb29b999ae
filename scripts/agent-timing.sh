#!/usr/bin/env bash
# The guest agent's wall time from start to secrets on disk on the simulated platform
# (median of RUNS runs, default 20), and the broker's share of it (the broker's own
# attestation time from its metrics). Release builds, one dev broker on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-20}
# The same build as make bench (every feature: the simulated platform included). Cargo 1.95
# ignored `-p broker -p guest-agent --features broker/simulator,…`, leaving a production build.
cargo build --release --locked -q --all-features --bins
B=$PWD/target/release/broker A=$PWD/target/release/guest-agent
W=$(mktemp -d); trap 'kill $PID 2>/dev/null; rm -rf "$W"' EXIT
PORT=18543
$B init --dev "$W/b" --listen 127.0.0.1:$PORT > /dev/null
$B serve --config "$W/b/broker.toml" 2> "$W/log" & PID=$!
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
export BROKER_ADMIN_CONFIG=$W/b/admin.toml
$B secret put web-tls --file "$W/b/web-tls.pem" --kind tls-key > /dev/null
$B secret generate db-key > /dev/null
$B policy set "$W/b/policy.json" > /dev/null
cat > "$W/agent.toml" <<TOML
broker_url = "https://127.0.0.1:$PORT"
broker_ca = "$W/b/ca.pem"
platform = "simulated"
secrets_dir = "$W/credstore"
[[secrets]]
name = "web-tls"
[[secrets]]
name = "db-key"
[simulated]
dir = "$W/b/sim"
TOML
times=()
for _ in $(seq 1 "$RUNS"); do
  rm -rf "$W/credstore"
  t0=$(date +%s%N); $A --config "$W/agent.toml" > /dev/null 2>&1; t1=$(date +%s%N)
  times+=($(( (t1 - t0) / 1000 )))
done
metrics=$(curl -sk "https://127.0.0.1:$PORT/metrics" 2>/dev/null || true)
sum=$(echo "$metrics" | awk '/^broker_attestation_duration_seconds_sum/ {print $2}')
count=$(echo "$metrics" | awk '/^broker_attestation_duration_seconds_count/ {print $2}')
median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')
echo "agent wall time, start to secrets on disk: median ${median} us over $RUNS runs (min $(printf '%s\n' "${times[@]}" | sort -n | head -1) us)"
if [ -n "$sum" ] && [ -n "$count" ]; then
  python3 -c "s=$sum; c=$count; m=$median; print(f'broker attestation time: mean {s/c*1e6:.0f} us over {c:.0f} attestations = {s/c*1e6/m*100:.1f}% of the agent median')"
fi
