#!/usr/bin/env bash
# Runs every fuzz target of the attestation crate for SECONDS each (default 20).
# Uses cargo-fuzz (libFuzzer) on the machine's stable toolchain: the sanitizer is off
# (`-s none`, which needs no nightly flag) and RUSTC_BOOTSTRAP lets cargo-fuzz pass the
# coverage options it needs. Seeds come from the real evidence in tests/data (a small policy
# document for the policy loader, and Debian's OVMF table for the firmware parser).
set -euo pipefail
SECONDS_EACH=${1:-20}
cd "$(dirname "$0")/../attestation/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi

data=../tests/data
seed() { mkdir -p "corpus/$1"; shift; for f in "$@"; do [ -f "$f" ] && cp "$f" "corpus/${target}/" ; done; true; }
for target in report hcl cert_table chain tpm_quote policy ovmf kbs_evidence broker_evidence csr ocsp_request ocsp_response; do
  case $target in
    report) seed report $data/*/report.bin $data/invalid/derived-tampered-go-sev-guest-milan-v2/*.bin ;;
    hcl) seed hcl $data/*/hcl-report.bin $data/invalid/kinvolk-azure-wrong-chip-vcek/hcl-report-snp.bin ;;
    cert_table) seed cert_table ;;
    chain) seed chain $data/*/vek.der $data/*/ask_ark.pem ;;
    tpm_quote) seed tpm_quote $data/swtpm-quote/quote.msg ;;
    policy) seed policy
      printf '%s' '{"rules":{"r":{"allOf":[{"claim":"vmpl","equals":0},{"claim":"measurement","in":["'"$(printf '00%.0s' $(seq 48))"'"]}]}},"secrets":{"s":["r"]}}' \
        > corpus/policy/seed.json ;;
    ovmf) seed ovmf
      # The OVMF table of Debian's OVMF (unpacked by `make measure-deps`), when present.
      fw=../../target/ovmf/usr/share/ovmf/OVMF.fd
      [ -f "$fw" ] && python3 -c 'import sys; d=open(sys.argv[1],"rb").read(); f=len(d)-50; n=int.from_bytes(d[f:f+2],"little"); sys.stdout.buffer.write(d[f+18-n:f])' "$fw" \
        > corpus/ovmf/debian-table.bin || true ;;
    kbs_evidence) seed kbs_evidence
      # A genuine Genoa report in the JSON form KBS clients send (the `sev` crate's serde).
      python3 - "$data/trustee-e2e-genoa-v3/report.bin" > corpus/kbs_evidence/genoa.json <<'PY'
import json, struct, sys
b = open(sys.argv[1], "rb").read()
u32 = lambda o: struct.unpack_from("<I", b, o)[0]
u64 = lambda o: struct.unpack_from("<Q", b, o)[0]
arr = lambda o, n: list(b[o:o + n])
tcb = lambda o: {"fmc": None, "bootloader": b[o], "tee": b[o + 1], "snp": b[o + 6], "microcode": b[o + 7]}
ver = lambda o: {"major": b[o + 2], "minor": b[o + 1], "build": b[o]}
r = {"version": u32(0), "guest_svn": u32(4), "policy": u64(8), "family_id": arr(0x10, 16),
     "image_id": arr(0x20, 16), "vmpl": u32(0x30), "sig_algo": u32(0x34), "current_tcb": tcb(0x38),
     "plat_info": u64(0x40), "key_info": u32(0x48), "report_data": arr(0x50, 64),
     "measurement": arr(0x90, 48), "host_data": arr(0xC0, 32), "id_key_digest": arr(0xE0, 48),
     "author_key_digest": arr(0x110, 48), "report_id": arr(0x140, 32), "report_id_ma": arr(0x160, 32),
     "reported_tcb": tcb(0x180), "cpuid_fam_id": b[0x188], "cpuid_mod_id": b[0x189],
     "cpuid_step": b[0x18A], "chip_id": arr(0x1A0, 64), "committed_tcb": tcb(0x1E0),
     "current": ver(0x1E8), "committed": ver(0x1EC), "launch_tcb": tcb(0x1F0),
     "launch_mit_vector": None, "current_mit_vector": None,
     "signature": {"r": arr(0x2A0, 72), "s": arr(0x2E8, 72)}}
json.dump({"attestation_report": r, "cert_chain": [{"cert_type": "VCEK", "data": [48, 3, 2, 1, 0]}]}, sys.stdout)
PY
      ;;
    csr) seed csr
      # A request as OpenSSL makes one: P-256, a subjectAltName extension request.
      openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout /dev/null \
        -subj /CN=web -addext subjectAltName=DNS:web.internal,URI:spiffe://example.org/web \
        -outform DER -out corpus/csr/openssl-p256.der 2>/dev/null || true ;;
    ocsp_request) seed ocsp_request
      # Requests as OpenSSL makes them (SHA-1 and SHA-256 CertIDs, with a nonce).
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout /dev/null \
        -subj /CN=ca -days 1 -out corpus/ocsp_request/ca.pem 2>/dev/null &&
      openssl ocsp -issuer corpus/ocsp_request/ca.pem -serial 0x0123456789abcdef \
        -reqout corpus/ocsp_request/sha1.der 2>/dev/null &&
      openssl ocsp -sha256 -issuer corpus/ocsp_request/ca.pem -serial 0x01 -serial 0x02 \
        -reqout corpus/ocsp_request/sha256.der 2>/dev/null
      rm -f corpus/ocsp_request/ca.pem; true ;;
    ocsp_response) seed ocsp_response
      # A response as OpenSSL's responder signs one (good, with a nextUpdate).
      t=$(mktemp -d)
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$t/ca.key" \
        -subj /CN=ca -days 1 -out "$t/ca.pem" 2>/dev/null &&
      printf 'V\t300101000000Z\t\t0123456789ABCDEF\tunknown\t/CN=web\n' > "$t/index.txt" &&
      openssl ocsp -issuer "$t/ca.pem" -serial 0x0123456789abcdef -reqout "$t/req.der" 2>/dev/null &&
      openssl ocsp -index "$t/index.txt" -rsigner "$t/ca.pem" -rkey "$t/ca.key" -CA "$t/ca.pem" \
        -ndays 1 -reqin "$t/req.der" -respout corpus/ocsp_response/openssl.der >/dev/null 2>&1
      rm -rf "$t"; true ;;
    broker_evidence) seed broker_evidence
      # A genuine Genoa report and its VCEK in the shape of a broker's own evidence.
      python3 - "$data/trustee-e2e-genoa-v3" > corpus/broker_evidence/genoa.json <<'PY'
import base64, json, sys
d = sys.argv[1]
b64 = lambda p: base64.b64encode(open(f"{d}/{p}", "rb").read()).decode()
json.dump({"version": 1, "nonce": "00" * 32, "spki_sha256": "00" * 32,
           "evidence": {"kind": "snp", "report": b64("report.bin"),
                        "certificates": [{"kind": "vcek", "der": b64("vek.der")}]}}, sys.stdout)
PY
      ;;
  esac
done

export RUSTC_BOOTSTRAP=1
failed=0
passed=0
for target in report hcl cert_table chain tpm_quote policy ovmf kbs_evidence broker_evidence csr ocsp_request ocsp_response; do
  echo "fuzzing $target for ${SECONDS_EACH}s"
  if cargo fuzz run --sanitizer none "$target" "corpus/$target" -- \
      -max_total_time="$SECONDS_EACH" -rss_limit_mb=4096 -print_final_stats=0 2> "fuzz-$target.log"; then
    passed=$((passed + 1))
    grep -E "^(Done|#[0-9]+\s+DONE)" "fuzz-$target.log" | tail -1 || true
  else
    failed=$((failed + 1))
    echo "fuzz target $target FAILED; its log:"
    tail -40 "fuzz-$target.log"
  fi
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" = 0 ]
