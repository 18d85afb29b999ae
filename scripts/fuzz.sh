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
for target in report hcl cert_table chain tpm_quote policy ovmf; do
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
  esac
done

export RUSTC_BOOTSTRAP=1
failed=0
passed=0
for target in report hcl cert_table chain tpm_quote policy ovmf; do
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
