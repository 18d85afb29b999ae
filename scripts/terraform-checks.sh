#!/usr/bin/env bash
# Offline checks of the Terraform code (no provider registry is reachable here):
# formatting, the provider-free cloud-init module's validate and `terraform test`, and the
# rendered user data checked by `cloud-init schema` and by the agent's own config parser.
# Ends with a line "terraform: N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if ! command -v terraform >/dev/null; then
  echo "terraform is not installed (terraform 1.11 is expected on PATH); failing rather than skipping"
  echo "terraform: 0 passed, 1 failed"
  exit 1
fi
export TF_CLI_CONFIG_FILE=/dev/null TF_IN_AUTOMATION=1 CHECKPOINT_DISABLE=1
passed=0 failed=0
check() { # name, command...
  local name=$1; shift
  if out=$("$@" 2>&1); then
    passed=$((passed + 1)); echo "ok    $name"
  else
    failed=$((failed + 1)); echo "FAIL  $name"; echo "$out" | tail -30
  fi
}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT

check "terraform fmt -check -recursive" terraform fmt -check -recursive terraform

mod=terraform/modules/guest-agent-cloud-init
for unit in guest-agent.service snp-secrets.target guest-agent-renew.service guest-agent-renew.timer; do
  check "$mod/files/$unit matches guest-agent/systemd/$unit" cmp "$mod/files/$unit" "guest-agent/systemd/$unit"
done
check "init $mod" terraform -chdir=$mod init -backend=false -input=false
check "validate $mod" terraform -chdir=$mod validate -no-color
if out=$(terraform -chdir=$mod test -no-color 2>&1); then :; fi
echo "$out" | grep -E '^\s+run "' | sed 's/^ */      /'
t_pass=$(echo "$out" | sed -n 's/.* \([0-9]\+\) passed, \([0-9]\+\) failed.*/\1/p' | tail -1)
t_fail=$(echo "$out" | sed -n 's/.* \([0-9]\+\) passed, \([0-9]\+\) failed.*/\2/p' | tail -1)
if [ -z "$t_pass" ]; then echo "$out" | tail -20; t_pass=0; t_fail=1; fi
passed=$((passed + t_pass)); failed=$((failed + t_fail))
if [ "$t_fail" = 0 ]; then echo "ok    terraform test: $t_pass passed"; else echo "FAIL  terraform test: $t_pass passed, $t_fail failed"; fi

# Render the sample, then check what a VM would receive.
cp -r terraform "$work/tf"
fixture="$work/tf/tests/render"
check "render sample user data" bash -c "terraform -chdir='$fixture' init -backend=false -input=false >/dev/null && terraform -chdir='$fixture' apply -auto-approve -input=false >/dev/null && terraform -chdir='$fixture' output -raw user_data > '$work/user-data.yaml' && terraform -chdir='$fixture' output -raw agent_config > '$work/config.toml'"
if command -v cloud-init >/dev/null; then
  check "cloud-init schema" cloud-init schema --config-file "$work/user-data.yaml"
else
  failed=$((failed + 1)); echo "FAIL  cloud-init schema: cloud-init is not installed (Debian package cloud-init)"
fi
agent="$ROOT/target/debug/guest-agent"
if [ -x "$agent" ]; then
  check "guest-agent config-check on the rendered config" "$agent" --config "$work/config.toml" config-check
else
  failed=$((failed + 1)); echo "FAIL  guest-agent is not built (cargo build --bins)"
fi
# Static checks of the cloud modules and examples (their providers cannot be downloaded here):
# checkov in a virtual environment, network features off, with this project's policies that
# fail a VM without SEV-SNP, vTPM or secure boot; a deliberately non-confidential fixture must
# fail every one of them.
venv="$ROOT/target/checkov-venv"
if [ ! -x "$venv/bin/checkov" ]; then
  echo "installing checkov into $venv"
  python3 -m venv "$venv" && "$venv/bin/pip" install --quiet --disable-pip-version-check "checkov==3.3.30" >/dev/null
fi
policies="CKV2_SNP_1,CKV2_SNP_2,CKV2_SNP_3"
checkov_counts() { # dir -> "passed failed"
  "$venv/bin/checkov" -d "$1" --framework terraform --external-checks-dir terraform/checkov/policies \
    --check "$policies" --skip-download --compact --quiet -o json 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); d=d if isinstance(d,list) else [d]; print(sum(r["summary"]["passed"] for r in d), sum(r["summary"]["failed"] for r in d), sum(r["summary"]["parsing_errors"] for r in d))'
}
if [ -x "$venv/bin/checkov" ]; then
  for dir in terraform/modules terraform/examples; do
    read -r p f e < <(checkov_counts "$dir" || echo "0 1 1")
    check "checkov $dir: $p VMs confidential, $f not, $e parse errors" test "$f" = 0 -a "$e" = 0 -a "$p" -ge 3
  done
  read -r p f e < <(checkov_counts terraform/checkov/fixtures/not-confidential || echo "0 0 1")
  check "checkov refuses the non-confidential fixture ($f of 3 VMs failed)" test "$f" = 3 -a "$p" = 0
else
  failed=$((failed + 1)); echo "FAIL  checkov could not be installed (PyPI, python3-venv)"
fi

echo "terraform: $passed passed, $failed failed"
[ "$failed" = 0 ]
