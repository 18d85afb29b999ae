#!/usr/bin/env bash
# The demo: what the broker can do today, on real AMD-signed evidence.
# It verifies genuine SEV-SNP reports from Milan and Genoa (one of them inside an Azure vTPM
# HCL report) and shows how broken evidence is refused, each with the check that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
BROKER=${BROKER:-target/debug/broker}
DATA=attestation/tests/data
AT=2025-09-01T00:00:00Z   # inside the validity of every certificate used below

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; echo "(exit status $?)"; }

step "1. A genuine AMD Genoa report, delivered by an Azure confidential VM's vTPM (HCL report)."
echo "   The broker checks AMD's key chain (pinned ARK -> ASK -> VCEK), the VCEK's chip and TCB"
echo "   against the report, the ECDSA P-384 signature over the received bytes, and that the"
echo "   report binds the vTPM's variable data."
run "$BROKER" verify --report $DATA/trustee-azure-genoa-v3/hcl-report.bin \
  --vek $DATA/trustee-azure-genoa-v3/vek.der --at $AT

step "2. An AWS guest signed by a VLEK (CHIP_ID masked), checked as of $AT."
run "$BROKER" verify --report $DATA/trustee-aws-vlek-milan-v3/report.bin \
  --vek $DATA/trustee-aws-vlek-milan-v3/vek.der --at $AT

step "3. The same VLEK today: it expired on 2025-12-10, so the evidence is refused."
run "$BROKER" verify --report $DATA/trustee-aws-vlek-milan-v3/report.bin \
  --vek $DATA/trustee-aws-vlek-milan-v3/vek.der

step "4. One bit flipped in a reserved byte of a genuine report (a re-encoding verifier accepts it)."
run "$BROKER" verify --report $DATA/invalid/derived-tampered-go-sev-guest-milan-v2/flip_03a_current_tcb_reserved_byte.bin \
  --vek $DATA/invalid/derived-tampered-go-sev-guest-milan-v2/vcek.der --at $AT

step "5. One bit flipped in the measurement: the signature no longer verifies."
run "$BROKER" verify --report $DATA/invalid/derived-tampered-go-sev-guest-milan-v2/flip_090_measurement0.bin \
  --vek $DATA/invalid/derived-tampered-go-sev-guest-milan-v2/vcek.der --at $AT

step "6. A genuine report offered with the genuine VCEK of another chip."
run "$BROKER" verify --report $DATA/invalid/kinvolk-azure-wrong-chip-vcek/report.bin \
  --vek $DATA/invalid/kinvolk-azure-wrong-chip-vcek/certs.pem --at $AT

step "7. The claims a release policy decides on, as JSON (first lines)."
"$BROKER" verify --report $DATA/go-sev-guest-milan-v2/report.bin \
  --vek $DATA/go-sev-guest-milan-v2/vek.der --at $AT --json | head -n 20

printf '\nDone: genuine evidence verified, broken evidence refused with the failed check named.\n'
