#!/usr/bin/env bash
# Verification cost, as ratios against baselines measured in the same run:
#   - `openssl speed -seconds 3 ecdsap384` (ECDSA P-384 verifies per second, OpenSSL)
#   - the raw aws-lc ECDSA P-384 verify, benchmarked beside the verifier
# Prints a table; criterion's full results stay under target/criterion/.
set -euo pipefail
cd "$(dirname "$0")/.."

load_only=${LOAD_ONLY:-0}
if [ "$load_only" != 1 ]; then
echo "== baseline: openssl speed -seconds 3 ecdsap384"
openssl_out=$(openssl speed -seconds 3 ecdsap384 2>/dev/null)
# Last line: " 384 bits ecdsa (nistp384)   0.0011s   0.0009s    909.7   1111.9"
openssl_verify=$(echo "$openssl_out" | awk '/ecdsa \(nistp384\)/ {v=$NF} END {print v}')
echo "openssl ECDSA P-384 verify/s: $openssl_verify"

echo "== cargo bench -p attestation --bench verify"
cargo bench -p attestation --bench verify --locked -- --noplot 2>&1 | grep -E "^(report|chain|ecdsa)|time:" || true

echo "== cargo bench -p attestation --features simulator --bench azure"
cargo bench -p attestation --features simulator --bench azure --locked -- --noplot 2>&1 | grep -E "^(azure)|time:" || true

echo "== cargo bench -p broker --bench attest"
cargo bench -p broker --bench attest --locked -- --noplot 2>&1 | grep -E "^(attest)|time:" || true

mean_ns() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['mean']['point_estimate'])" "target/criterion/$1/new/estimates.json"; }
report_ns=$(mean_ns report_verify_cached_chain)
chain_ns=$(mean_ns chain_verify)
ecdsa_ns=$(mean_ns ecdsa_p384_verify_baseline)
attest_ns=$(mean_ns attest/attest_simulated_one_core)
attest_ecdsa_ns=$(mean_ns attest/ecdsa_p384_verify_baseline)
az_ns=$(mean_ns azure_az_snp_vtpm_verify)
az_snp_ns=$(mean_ns azure_snp_report_verify_baseline)
az_rsa_ns=$(mean_ns azure_rsa2048_pkcs1_verify_baseline)

python3 - "$openssl_verify" "$report_ns" "$chain_ns" "$ecdsa_ns" "$attest_ns" "$attest_ecdsa_ns" "$az_ns" "$az_snp_ns" "$az_rsa_ns" <<'PY'
import sys
openssl, report, chain, ecdsa, attest, attest_ecdsa, az, az_snp, az_rsa = (float(x) for x in sys.argv[1:])
rows = [
    ("parse + full verify, cached chain", report),
    ("chain verification alone (ARK->ASK->VCEK)", chain),
    ("raw ECDSA P-384 verify (aws-lc)", ecdsa),
    ("attest path, simulated evidence, one core", attest),
    ("raw ECDSA P-384 verify (aws-lc), attest run", attest_ecdsa),
    ("Azure HCL + quote verify + binding, cached", az),
    ("bare SNP report verify, same chip, Azure run", az_snp),
    ("raw RSA-2048 PKCS#1 verify (aws-lc)", az_rsa),
]
print()
print(f"{'measurement':45} {'mean':>12} {'per second':>12} {'vs openssl verify':>18}")
for name, ns in rows:
    per_s = 1e9 / ns
    print(f"{name:45} {ns/1000:>9.1f} us {per_s:>12.0f} {per_s/openssl:>17.2f}x")
print(f"{'openssl speed ecdsap384 verify':45} {1e6/openssl:>9.1f} us {openssl:>12.0f} {1.0:>17.2f}x")
print()
print(f"full report verify costs {report/ecdsa:.2f}x one raw aws-lc ECDSA P-384 verify")
print(f"attestations per second on one core: {1e9/attest:.0f} = {attest_ecdsa/attest:.3f}x the raw aws-lc verify rate "
      f"and {1e9/attest/openssl:.2f}x openssl's, measured in the same run")
print(f"Azure evidence (HCL report + vTPM quote) costs {az/az_snp:.2f}x a bare SNP report from the same chip "
      f"in the same run; the quote's RSA verify is {az_rsa/az_snp:.2f}x of that")
PY
fi

# End to end over real HTTPS on loopback: a release broker on the embedded store and the
# simulated platform, driven by broker-load (tests/src/bin/broker-load.rs). With two or more
# CPUs the broker is pinned to CPU 0 and the load generator to CPU 1; the crypto floor is
# measured on CPU 0 in the same run, before the broker starts.
echo "== broker-load: challenge + attest flows over HTTPS (release build)"
cargo build --release --locked --bins
B=target/release/broker
L=target/release/broker-load
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$B" init --dev "$work/dev" --listen "127.0.0.1:$port" > /dev/null
pin_broker=() pin_load=()
if [ "$(nproc)" -ge 2 ] && command -v taskset > /dev/null; then
  pin_broker=(taskset -c 0) pin_load=(taskset -c 1)
fi
floor=$("${pin_broker[@]}" "$L" floor --duration 5 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["floor_per_second"])')
echo "crypto floor (one P-384 verify + one HPKE seal) on the broker's core: $floor/s"
RUST_LOG=warn "${pin_broker[@]}" "$B" serve --config "$work/dev/broker.toml" 2> "$work/broker.log" &
pid=$!
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
export BROKER_ADMIN_CONFIG="$work/dev/admin.toml"
"$B" secret generate db-key > /dev/null
"$B" policy set "$work/dev/policy.json" > /dev/null
for mode in keepalive resumed new-conn; do
  out=$("${pin_load[@]}" "$L" run --url "https://127.0.0.1:$port" --ca "$work/dev/ca.pem" \
    --sim-dir "$work/dev/sim" --mode "$mode" --concurrency 16 --duration 10 --broker-pid "$pid" --json)
  python3 - "$mode" "$floor" "$out" <<'PY'
import json, sys
mode, floor, v = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
per_cpu = v["flows_per_broker_cpu_second"] or 0.0
l = v["latency_ms"]
print(f"{mode:10} {v['flows_per_second']:8.0f} flows/s  {per_cpu:8.0f} per broker CPU-s = {per_cpu/floor:.2f}x the floor  "
      f"p50 {l['p50']:.1f} ms p99 {l['p99']:.1f} ms  errors {v['errors']}  RSS {v['broker_rss_bytes']/2**20:.0f} MiB")
PY
done
