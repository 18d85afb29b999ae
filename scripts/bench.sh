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
attest_cert_ns=$(mean_ns attest/attest_with_certificate_request)
attest_ecdsa_ns=$(mean_ns attest/ecdsa_p384_verify_baseline)
az_ns=$(mean_ns azure_az_snp_vtpm_verify)
az_snp_ns=$(mean_ns azure_snp_report_verify_baseline)
az_rsa_ns=$(mean_ns azure_rsa2048_pkcs1_verify_baseline)

python3 - "$openssl_verify" "$report_ns" "$chain_ns" "$ecdsa_ns" "$attest_ns" "$attest_ecdsa_ns" "$az_ns" "$az_snp_ns" "$az_rsa_ns" "$attest_cert_ns" <<'PY'
import sys
openssl, report, chain, ecdsa, attest, attest_ecdsa, az, az_snp, az_rsa, attest_cert = (float(x) for x in sys.argv[1:])
rows = [
    ("parse + full verify, cached chain", report),
    ("chain verification alone (ARK->ASK->VCEK)", chain),
    ("raw ECDSA P-384 verify (aws-lc)", ecdsa),
    ("attest path, simulated evidence, one core", attest),
    ("the same with one certificate request", attest_cert),
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
print(f"an attestation with one certificate request (CSR verified, bound, issued, recorded) costs "
      f"{attest_cert/attest:.2f}x one without, in the same run")
print(f"Azure evidence (HCL report + vTPM quote) costs {az/az_snp:.2f}x a bare SNP report from the same chip "
      f"in the same run; the quote's RSA verify is {az_rsa/az_snp:.2f}x of that")
PY
fi

# End to end over real HTTPS on loopback: a release broker on the embedded store and the
# simulated platform, driven by broker-load (tests/src/bin/broker-load.rs). With two or more
# CPUs the broker is pinned to CPU 0 and the load generator to CPU 1; the crypto floor is
# measured on CPU 0 in the same run, before the broker starts. Every result goes into
# target/bench/load.jsonl, which `make bench-report` turns into tables and plots.
echo "== broker-load: challenge + attest flows over HTTPS (release build)"
cargo build --release --locked --all-features --bins
B=target/release/broker
L=target/release/broker-load
out_dir=target/bench
mkdir -p "$out_dir"
results="$out_dir/load.jsonl"
: > "$results"
work=$(mktemp -d)
pid=
stop_broker() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; pid=; fi; }
cleanup() { stop_broker; rm -rf "$work"; }
trap cleanup EXIT
pin_broker=() pin_load=() pin_both=()
if [ "$(nproc)" -ge 2 ] && command -v taskset > /dev/null; then
  pin_broker=(taskset -c 0) pin_load=(taskset -c 1) pin_both=(taskset -c 0,1)
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
url="https://127.0.0.1:$port"
dev="$work/dev"
"$B" init --dev "$dev" --listen "127.0.0.1:$port" > /dev/null
# start_broker CONFIG [PIN...]: serves CONFIG in the background, under the given pinning.
start_broker() {
  local config=$1; shift
  RUST_LOG=warn "$@" "$B" serve --config "$config" 2>> "$work/broker.log" &
  pid=$!
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && return 0; sleep 0.1; done
  echo "broker did not start: $(cat "$work/broker.log")" >&2
  return 1
}
# record KIND JSON [EXTRA-JSON]: appends one result line.
record() {
  python3 -c 'import json,sys; v=json.loads(sys.argv[2]); v.update(json.loads(sys.argv[3])); v["kind"]=sys.argv[1]; print(json.dumps(v))' \
    "$1" "$2" "${3:-"{}"}" >> "$results"
}
load() { "${pin_load[@]}" "$L" run --url "$url" --ca "$dev/ca.pem" --sim-dir "$dev/sim" --broker-pid "$pid" --json "$@"; }
show() {
  python3 - "$1" "$floor" "$2" <<'PY'
import json, sys
label, floor, v = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
per_cpu = v["flows_per_broker_cpu_second"] or 0.0
l = v["latency_ms"]
print(f"{label:16} {v['flows_per_second']:7.0f} flows/s {per_cpu:7.0f} per broker CPU-s = {per_cpu/floor:.2f}x the floor  "
      f"p50 {l['p50']:.1f} ms p99 {l['p99']:.1f} ms  errors {v['errors']}  RSS {v['broker_rss_bytes']/2**20:.0f} MiB")
PY
}

floor=$("${pin_broker[@]}" "$L" floor --duration 5 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["floor_per_second"])')
echo "crypto floor (one P-384 verify + one HPKE seal) on the broker's core: $floor/s"
record floor "{\"floor_per_second\": $floor}"
start_broker "$dev/broker.toml" "${pin_broker[@]}"
export BROKER_ADMIN_CONFIG="$dev/admin.toml"
"$B" secret generate db-key > /dev/null
# The same data key for KBS clients: the resource default/key/db is the secret default.key.db.
"$B" secret generate default.key.db > /dev/null
python3 - "$dev/policy.json" "$dev/policy-kbs.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
p["secrets"]["default.key.db"] = p["secrets"]["db-key"]
json.dump(p, open(sys.argv[2], "w"))
PY
"$B" policy set "$dev/policy-kbs.json" > /dev/null
# Memory with 1 000 idle keep-alive connections open (each made one request), on the fresh broker.
v=$("${pin_load[@]}" "$L" hold --url "$url" --ca "$dev/ca.pem" --connections 1000 --broker-pid "$pid")
record hold "$v"
python3 - "$v" <<'PY'
import json, sys
v = json.loads(sys.argv[1])
print(f"RSS with {v['connections']} idle keep-alive connections open: {v['broker_rss_held_bytes']/2**20:.1f} MiB "
      f"(before: {v['broker_rss_before_bytes']/2**20:.1f} MiB; errors {v['errors']})")
PY
for mode in keepalive resumed new-conn; do
  v=$(load --mode "$mode" --concurrency 16 --duration 10)
  record flows "$v"
  show "$mode c=16" "$v"
done
# KBS flows (auth + attest with the sev JSON evidence + resource, JWE answer) beside native
# ones in the same run: the JSON form and the third round trip should cost little.
echo "== KBS (/kbs/v0) vs native (/v1), keep-alive, c=16 (8 s each)"
native=$(load --mode keepalive --concurrency 16 --duration 8)
record kbs "$native"
show "native c=16" "$native"
kbs=$(load --protocol kbs --secret default/key/db --mode keepalive --concurrency 16 --duration 8)
record kbs "$kbs"
show "kbs c=16" "$kbs"
python3 - "$native" "$kbs" <<'PY'
import json, sys
n, k = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ratio = (k["flows_per_broker_cpu_second"] or 0) / max(n["flows_per_broker_cpu_second"] or 1, 1e-9)
print(f"KBS/native per broker CPU-second: {ratio:.2f}x "
      f"(Trustee's KBS measured earlier on this machine kind: ~258 SNP resource deliveries per KBS core-second)")
PY
# The OCSP responder beside OpenSSL's (`openssl ocsp -index … -port …`), both on the broker's
# core, answering about the same serial set: 32 certificates the broker's CA issued to a
# simulated guest, and the same serials in an OpenSSL CA's index. OpenSSL's responder speaks
# HTTP/1.0 and closes every connection; the broker's is measured over HTTPS with keep-alive and
# with a new TLS connection per request. Every 8th answer is checked (signature, serial,
# current, good) by attestation::ocsp::status.
echo "== OCSP responses per responder CPU-second: broker vs openssl ocsp (5 s each)"
"$B" ca init --days 30 > /dev/null
python3 - "$dev/policy-kbs.json" "$dev/policy-ocsp.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
p["certificates"] = {"bench": {"rules": list(p["rules"]), "dns": ["*.bench.internal"], "usages": ["serverAuth"]}}
json.dump(p, open(sys.argv[2], "w"))
PY
"$B" policy set "$dev/policy-ocsp.json" > /dev/null
ocsp_dir="$work/ocsp"
mkdir -p "$ocsp_dir"
{
  printf 'broker_url = "%s"\nbroker_ca = "%s"\nplatform = "simulated"\nsecrets_dir = "%s"\n' "$url" "$dev/ca.pem" "$ocsp_dir/credstore"
  for i in 1 2 3 4 5 6 7 8; do printf '[[certificate]]\nprofile = "bench"\nname = "c%s"\ndns = ["c%s.bench.internal"]\nocsp = false\n' "$i" "$i"; done
  printf '[simulated]\ndir = "%s"\n' "$dev/sim"
} > "$ocsp_dir/agent.toml"
for _ in 1 2 3 4; do target/release/guest-agent --config "$ocsp_dir/agent.toml" > /dev/null 2>> "$ocsp_dir/agent.log"; done
"$B" cert list | python3 -c 'import json,sys; print("\n".join(c["serial"] for c in json.load(sys.stdin)["certificates"]))' > "$ocsp_dir/serials"
# The issuing CA: the first certificate of the chain file (self-signed here).
sed -n '1,/END CERTIFICATE/p' "$ocsp_dir/credstore/c1.ca.pem" > "$ocsp_dir/broker-ca.pem"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$ocsp_dir/ca.key" \
  -out "$ocsp_dir/ca.pem" -subj "/CN=bench OpenSSL CA" -days 2 2> /dev/null
while read -r serial; do
  printf 'V\t301231000000Z\t\t%s\tunknown\t/CN=bench-%s\n' "$(echo "$serial" | tr a-f A-F)" "$serial"
done < "$ocsp_dir/serials" > "$ocsp_dir/index.txt"
ocsp_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"${pin_broker[@]}" openssl ocsp -index "$ocsp_dir/index.txt" -port "$ocsp_port" -rsigner "$ocsp_dir/ca.pem" \
  -rkey "$ocsp_dir/ca.key" -CA "$ocsp_dir/ca.pem" -nmin 60 -ignore_err > /dev/null 2> "$ocsp_dir/openssl.log" &
openssl_pid=$!
# Ready when it says so (a bare probe connection would wedge it: one connection at a time).
for _ in $(seq 1 100); do grep -q "waiting for OCSP client connections" "$ocsp_dir/openssl.log" && break; sleep 0.1; done
grep -q "waiting for OCSP client connections" "$ocsp_dir/openssl.log" ||
  { echo "openssl ocsp did not start: $(cat "$ocsp_dir/openssl.log")" >&2; exit 1; }
ocsp_load() { "${pin_load[@]}" "$L" ocsp --serials "$ocsp_dir/serials" --duration 5 --concurrency 4 --json "$@"; }
b_keep=$(ocsp_load --url "$url/v1/pki/ocsp" --ca "$dev/ca.pem" --issuer "$ocsp_dir/broker-ca.pem" --server-pid "$pid" --mode keepalive)
b_new=$(ocsp_load --url "$url/v1/pki/ocsp" --ca "$dev/ca.pem" --issuer "$ocsp_dir/broker-ca.pem" --server-pid "$pid" --mode new-conn)
o_new=$(ocsp_load --url "http://127.0.0.1:$ocsp_port/" --issuer "$ocsp_dir/ca.pem" --server-pid "$openssl_pid" --mode new-conn)
kill "$openssl_pid" 2> /dev/null; wait "$openssl_pid" 2> /dev/null || true
record ocsp "$b_keep" '{"responder": "broker", "transport": "https keep-alive"}'
record ocsp "$b_new" '{"responder": "broker", "transport": "https new connection"}'
record ocsp "$o_new" '{"responder": "openssl", "transport": "http/1.0 new connection"}'
python3 - "$b_keep" "$b_new" "$o_new" <<'PY'
import json, sys
rows = [("broker, HTTPS keep-alive", json.loads(sys.argv[1])), ("broker, HTTPS new connection", json.loads(sys.argv[2])),
        ("openssl ocsp, HTTP/1.0", json.loads(sys.argv[3]))]
base = rows[2][1]["responses_per_server_cpu_second"] or 1e-9
for label, v in rows:
    per = v["responses_per_server_cpu_second"] or 0
    print(f"{label:30} {v['responses_per_second']:7.0f}/s {per:7.0f} per responder CPU-s = {per/base:.2f}x openssl  "
          f"p50 {v['latency_ms']['p50']:.2f} ms p99 {v['latency_ms']['p99']:.2f} ms  checked {v['checked']} errors {v['errors']}")
PY
echo "== concurrency sweep (4 s each)"
for mode in keepalive resumed new-conn; do
  for c in 1 2 4 8 16 32 64; do
    v=$(load --mode "$mode" --concurrency "$c" --duration 4)
    record sweep "$v"
    show "$mode c=$c" "$v"
  done
done
# Latency at half the maximum throughput (issue #12: p99 <= 5 ms), open loop: flows start at
# an even rate whether or not earlier ones have finished, and each is timed from when it was
# due, so queueing in the broker counts. The maximum is the best keep-alive point of the sweep.
half=$(python3 - "$results" <<'PY'
import json, sys
points = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
best = max(v["flows_per_second"] for v in points if v.get("kind") == "sweep" and v.get("mode") == "keepalive")
print(f"{best / 2:.0f}")
PY
)
echo "== open loop at half the maximum keep-alive throughput: $half flows/s (10 s)"
v=$(load --mode keepalive --concurrency 64 --rate "$half" --duration 10)
record halfload "$v"
show "keepalive $half/s" "$v"
python3 - "$v" <<'PY'
import json, sys
v = json.loads(sys.argv[1])
p99 = v["latency_ms"]["p99"]
print(f"p99 at half the maximum throughput: {p99:.1f} ms (target <= 5 ms: {'met' if p99 <= 5 else 'not met'}); "
      f"{v['flows_per_second']:.0f} flows/s achieved, {v['missed']} due flows never started")
PY
if [ ${#pin_both[@]} -gt 0 ]; then
  echo "== one broker core vs two (with two, the load generator shares them)"
  v=$(load --mode keepalive --concurrency 32 --duration 8)
  record cores "$v" '{"broker_cores": 1}'
  show "1 core c=32" "$v"
  stop_broker
  start_broker "$dev/broker.toml" "${pin_both[@]}"
  v=$("${pin_both[@]}" "$L" run --url "$url" --ca "$dev/ca.pem" --sim-dir "$dev/sim" --broker-pid "$pid" --json \
        --mode keepalive --concurrency 32 --duration 8)
  record cores "$v" '{"broker_cores": 2}'
  show "2 cores c=32" "$v"
fi

# What a TLS setup costs the broker: new connections (handshake + one GET /healthz), with the
# ECDSA P-256 certificate of init --dev and with an RSA-2048 one.
echo "== TLS connection setup (3 s each)"
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$dev/rsa-ca.key" -out "$dev/rsa-ca.pem" -days 2 \
  -subj "/CN=bench RSA CA" 2> /dev/null
openssl req -newkey rsa:2048 -nodes -keyout "$dev/rsa.key" -out "$dev/rsa.csr" -subj "/CN=localhost" 2> /dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$dev/rsa.ext"
openssl x509 -req -in "$dev/rsa.csr" -CA "$dev/rsa-ca.pem" -CAkey "$dev/rsa-ca.key" -CAcreateserial \
  -out "$dev/rsa.pem" -days 2 -extfile "$dev/rsa.ext" 2> /dev/null
chmod 600 "$dev/rsa.key"
sed -e 's/^cert = .*/cert = "rsa.pem"/' -e 's/^key = .*/key = "rsa.key"/' "$dev/broker.toml" > "$dev/broker-rsa.toml"
setups="tls1.3-x25519 --kx x25519
tls1.3-x25519mlkem768 --kx x25519mlkem768
tls1.2-x25519 --tls12 --kx x25519
tls1.3-resumed --kx x25519 --resume
tls1.2-resumed --tls12 --kx x25519 --resume
tls1.3-mutual --kx x25519 --client-cert $dev/operator.pem --client-key $dev/operator.key"
for cert in ecdsa-p256 rsa-2048; do
  stop_broker
  if [ "$cert" = rsa-2048 ]; then config="$dev/broker-rsa.toml" ca="$dev/rsa-ca.pem"; else config="$dev/broker.toml" ca="$dev/ca.pem"; fi
  start_broker "$config" "${pin_broker[@]}"
  while read -r label args; do
    # shellcheck disable=SC2086 # args is a list of options
    v=$("${pin_load[@]}" "$L" handshake --url "$url" --ca "$ca" --broker-pid "$pid" --duration 3 --json $args)
    record handshake "$v" "{\"certificate\": \"$cert\", \"label\": \"$label\"}"
    python3 - "$cert" "$label" "$v" <<'PY'
import json, sys
cert, label, v = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
print(f"{cert:10} {label:22} {v['connections_per_second']:6.0f}/s {v['connections_per_broker_cpu_second'] or 0:6.0f} per broker CPU-s  "
      f"first answer p50 {v['first_answer_ms']['p50']:.2f} ms p99 {v['first_answer_ms']['p99']:.2f} ms  errors {v['errors']}")
PY
  done <<< "$setups"
done
# The master key's providers: time from start to accepting connections, and release
# throughput, with the key in a file and with it wrapped in a PKCS#11 token (SoftHSM2). The
# unwrapped key is cached in memory, so the ratio should be ~1.
if [ -f /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util > /dev/null; then
  echo "== master key providers: start-up and keep-alive c=16 (8 s each)"
  hsm="$work/hsm"
  mkdir -p "$hsm/tokens"
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$hsm/tokens" > "$hsm/softhsm2.conf"
  export SOFTHSM2_CONF="$hsm/softhsm2.conf"
  softhsm2-util --init-token --free --label bench --pin bench-pin --so-pin bench-so > /dev/null
  printf 'bench-pin\n' > "$hsm/pin" && chmod 600 "$hsm/pin"
  hdev="$work/dev-hsm"
  "$B" init --dev "$hdev" --listen "127.0.0.1:$port" > /dev/null
  rm "$hdev/master.key"
  python3 - "$hdev/broker.toml" "$hsm/pin" <<'PY'
import re, sys
path, pin = sys.argv[1], sys.argv[2]
text = open(path).read()
section = ('[master_key]\npkcs11_module = "/usr/lib/softhsm/libsofthsm2.so"\npkcs11_token = "bench"\n'
           f'pkcs11_key = "bench-kek"\npkcs11_pin_file = "{pin}"\n')
open(path, "w").write(re.sub(r"\[master_key\]\n[^\[]*", section + "\n", text))
PY
  "$B" keys create-kek --config "$hdev/broker.toml" 2> /dev/null
  for provider in file pkcs11; do
    stop_broker
    if [ "$provider" = file ]; then cfg="$dev/broker.toml" d="$dev"; else cfg="$hdev/broker.toml" d="$hdev"; fi
    # Not in a $(…): the broker would inherit that pipe and the substitution never end.
    t0=$(date +%s%N)
    start_broker "$cfg" "${pin_broker[@]}"
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    BROKER_ADMIN_CONFIG="$d/admin.toml" "$B" secret generate db-key > /dev/null
    BROKER_ADMIN_CONFIG="$d/admin.toml" "$B" policy set "$d/policy.json" > /dev/null
    v=$("${pin_load[@]}" "$L" run --url "$url" --ca "$d/ca.pem" --sim-dir "$d/sim" --broker-pid "$pid" --json \
          --mode keepalive --concurrency 16 --duration 8)
    record provider "$v" "{\"provider\": \"$provider\", \"startup_ms\": $ms}"
    show "$provider c=16" "$v"
    echo "$provider: ready in $ms ms"
  done
fi

# Reference measurements (issue #15): broker measure beside sev-snp-measure on the same 4 MiB
# firmware, 15 MiB kernel and 50 MiB initrd, best of 5 whole processes each (both must agree).
echo "== broker measure vs sev-snp-measure"
make -s measure-deps
m=$(MEASURE_BROKER="$PWD/$B" cargo test -q -p e2e --test measure -- --ignored --nocapture \
      measurement_time_beside_sev_snp_measure 2>/dev/null | grep '"kind":"measure"')
echo "$m" >> "$results"
echo "$m"

# Data-key rotation (issue #16): broker keys rotate over 100 000 records, SQLite and PostgreSQL
# (fsync on), release build, default batch.
echo "== broker keys rotate, 100 000 records"
ROTATE_BROKER="$PWD/$B" cargo test -q -p e2e --test key_rotation -- --ignored --nocapture \
    rotation_speed_over_100k_records 2>/dev/null | grep '"kind":"rotation"' | tee -a "$results"
echo "results: $results (make bench-report: tables and plots)"
