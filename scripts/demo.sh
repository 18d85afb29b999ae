#!/usr/bin/env bash
# The demo: the whole flow on one machine, with the embedded store and the simulated platform.
# A broker is set up and started, an operator uploads a TLS key, generates a data key and sets
# a policy; a simulated measured guest receives both secrets, a guest with another
# measurement is refused, an emulated Azure confidential VM receives them through its vTPM,
# and the measured guest gets a certificate from the broker's CA, which is revoked and renewed.
# Everything happens in a temporary directory, removed at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
BROKER=${BROKER:-$PWD/target/debug/broker}
AGENT=${AGENT:-$PWD/target/debug/guest-agent}
EMULATOR=${EMULATOR:-$PWD/target/debug/azure-cvm-emulator}
DATA=attestation/tests/data
WORK=$(mktemp -d)
SERVER_PID=
EMULATOR_PID=
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  # Closing its stdin stops the emulated Azure VM (and its swtpm).
  exec 4>&- 2>/dev/null
  [ -n "$EMULATOR_PID" ] && wait "$EMULATOR_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "1. The broker verifies genuine AMD evidence: a Genoa report from an Azure confidential VM."
run "$BROKER" verify --report $DATA/trustee-azure-genoa-v3/hcl-report.bin \
  --vek $DATA/trustee-azure-genoa-v3/vek.der --at 2025-09-01T00:00:00Z | head -n 4
echo "...and refuses a genuine report offered with the VCEK of another chip:"
run "$BROKER" verify --report $DATA/invalid/kinvolk-azure-wrong-chip-vcek/report.bin \
  --vek $DATA/invalid/kinvolk-azure-wrong-chip-vcek/certs.pem --at 2025-09-01T00:00:00Z
echo "(exit status $?)"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 18443)
step "2. Set up a development broker (CA, certificates, master key, SIMULATED AMD root, policy)."
run "$BROKER" init --dev "$WORK/broker" --listen "127.0.0.1:$PORT" > /dev/null
ls "$WORK/broker"

step "3. Start it (it warns loudly that it trusts a simulated root)."
"$BROKER" serve --config "$WORK/broker/broker.toml" 2> "$WORK/broker.log" &
SERVER_PID=$!
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
grep -m1 -o 'DANGER: this broker trusts a SIMULATED AMD root' "$WORK/broker.log"
run curl -s --cacert "$WORK/broker/ca.pem" "https://127.0.0.1:$PORT/readyz"

export BROKER_ADMIN_CONFIG="$WORK/broker/admin.toml"
step "4. As the operator (mutual TLS): upload the workload's TLS key, generate a data key, set the policy."
run "$BROKER" secret put web-tls --file "$WORK/broker/web-tls.pem" --kind tls-key
run "$BROKER" secret generate db-key --bytes 32
run "$BROKER" policy set "$WORK/broker/policy.json"
run "$BROKER" secret list

agent_config() { # $1 = name, $2 = extra [simulated] fields
  mkdir -p "$WORK/$1"
  cat > "$WORK/$1/agent.toml" <<TOML
broker_url = "https://127.0.0.1:$PORT"
broker_ca = "$WORK/broker/ca.pem"
platform = "simulated"
deadline_secs = 20
secrets_dir = "$WORK/$1/credstore"
[[secrets]]
name = "web-tls"
mode = "0440"
[[secrets]]
name = "db-key"
[simulated]
dir = "$WORK/broker/sim"
$2
TOML
}

step "5. A simulated guest with the measurement the policy expects boots its agent."
agent_config measured ""
run "$AGENT" --config "$WORK/measured/agent.toml" 2>/dev/null
ls -l "$WORK/measured/credstore"
cmp -s "$WORK/measured/credstore/web-tls" "$WORK/broker/web-tls.pem" && echo "web-tls is byte-identical to the uploaded key."
echo "What the guest received is no admin credential (its certificate is not an operator certificate):"
run curl -s --cacert "$WORK/broker/ca.pem" --cert "$WORK/measured/credstore/web-tls" \
  --key "$WORK/measured/credstore/web-tls" "https://127.0.0.1:$PORT/v1/admin/secrets"
echo

step "6. A guest with another measurement asks for the same secrets."
agent_config unmeasured "measurement = \"$(printf '11%.0s' $(seq 48))\""
run "$AGENT" --config "$WORK/unmeasured/agent.toml" 2>&1 | grep -v WARN | tail -n 1
echo "(nothing written: $(ls "$WORK/unmeasured/credstore" 2>/dev/null | wc -l) files)"

step "7. An Azure confidential VM: no /dev/sev-guest; the SNP report comes through the vTPM (emulated here: swtpm, Azure's paravisor and THIM)."
mkfifo "$WORK/emulator.in"
"$EMULATOR" --sim-dir "$WORK/broker/sim" < "$WORK/emulator.in" > "$WORK/azure.toml" 2> "$WORK/emulator.log" &
EMULATOR_PID=$!
exec 4> "$WORK/emulator.in"
for _ in $(seq 1 300); do grep -q thim_url "$WORK/azure.toml" 2>/dev/null && break; sleep 0.1; done
mkdir -p "$WORK/azure"
cat > "$WORK/azure/agent.toml" <<TOML
broker_url = "https://127.0.0.1:$PORT"
broker_ca = "$WORK/broker/ca.pem"
platform = "azure-vtpm"
deadline_secs = 30
secrets_dir = "$WORK/azure/credstore"
[[secrets]]
name = "web-tls"
mode = "0440"
[[secrets]]
name = "db-key"
$(cat "$WORK/azure.toml")
TOML
run "$AGENT" --config "$WORK/azure/agent.toml" 2>/dev/null
ls -l "$WORK/azure/credstore"
echo "The evidence it sent: HCL report, vTPM quote (binding as qualifying data and user data), PCRs:"
run "$AGENT" --config "$WORK/azure/agent.toml" report --out "$WORK/azure/evidence.bin" > /dev/null 2>&1
run "$BROKER" verify --report "$WORK/azure/evidence.bin" --vek "$WORK/azure/evidence.bin.certs.pem" \
  --quote "$WORK/azure/evidence.bin.quote.json" --dangerous-trust-simulated-root "$WORK/broker/sim/ark.pem" 2>/dev/null \
  | grep -E 'verified|azure|vTPM|pcr (0|7) '

step "8. The private CA: the measured guest gets a certificate for a key it makes, with OCSP to staple."
run "$BROKER" ca init --subject "Demo workload CA" --days 30 | grep -E '"(state|subject)"' | head -n 2
python3 - "$WORK/broker/policy.json" "$WORK/broker/policy-pki.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
p["certificates"] = {"web": {"rules": list(p["rules"]), "dns": ["web.demo.internal"],
                             "uri": ["spiffe://demo.internal/web"], "usages": ["serverAuth", "clientAuth"],
                             "max_lifetime_hours": 24}}
json.dump(p, open(sys.argv[2], "w"), indent=2)
PY
run "$BROKER" policy set "$WORK/broker/policy-pki.json" > /dev/null
mkdir -p "$WORK/pki"
cat > "$WORK/pki/agent.toml" <<TOML
broker_url = "https://127.0.0.1:$PORT"
broker_ca = "$WORK/broker/ca.pem"
platform = "simulated"
secrets_dir = "$WORK/pki/credstore"
[[certificate]]
profile = "web"
dns = ["web.demo.internal"]
uri = ["spiffe://demo.internal/web"]
[simulated]
dir = "$WORK/broker/sim"
TOML
run "$AGENT" --config "$WORK/pki/agent.toml" 2>/dev/null
C="$WORK/pki/credstore"
run openssl verify -CAfile "$C/web.ca.pem" "$C/web.pem"
openssl x509 -noout -ext subjectAltName -in "$C/web.pem" | tail -n 1
sed -n '1,/END CERTIFICATE/p' "$C/web.ca.pem" > "$WORK/pki/issuer.pem"
echo "The OCSP response the agent keeps for the server to staple, checked by OpenSSL:"
openssl ocsp -respin "$C/web.ocsp.der" -issuer "$WORK/pki/issuer.pem" -cert "$C/web.pem" \
  -CAfile "$C/web.ca.pem" 2>&1 | grep -E 'verify|: good|: revoked'
echo "The renewal timer's run: nothing is due yet."
run "$AGENT" --config "$WORK/pki/agent.toml" renew 2>/dev/null
SERIAL=$(openssl x509 -noout -serial -in "$C/web.pem" | cut -d= -f2)
run "$BROKER" cert revoke "$SERIAL" --reason keyCompromise | grep -E '"(serial|revocation_reason)"'
echo "The next run learns of the revocation by OCSP and renews with fresh evidence:"
run "$AGENT" --config "$WORK/pki/agent.toml" renew 2>/dev/null

step "9. The audit log records every decision."
run "$BROKER" audit --action attest

printf '\nDone: the measured guest and the Azure guest received their TLS key and data key, the measured guest a certificate (renewed after its revocation); the other guest received nothing.\n'
