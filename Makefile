# The project's two promises: `make demo` runs the demo, `make test` runs every check.
# Both install what they need on a fresh Debian machine (packages via apt-get when run as
# root; crates via cargo).

SHELL := /bin/bash
CARGO ?= cargo
# Debian packages the build, tests and benchmarks need.
#   build-essential: the C compiler aws-lc-sys builds with.
#   pkg-config:      used by -sys crates to find system libraries.
#   openssl:         `openssl speed`, the baseline of `make bench`.
#   cloud-init:      `cloud-init schema` checks the user data the Terraform module renders.
#   curl:            scripts/agent-timing.sh reads the broker's metrics.
#   python3-venv:    checkov (PyPI) runs in a virtual environment for the Terraform checks.
#   libtss2-dev:     the TPM software stack the guest agent's Azure vTPM source links (tss-esapi).
#   swtpm, swtpm-tools, tpm2-tools: the emulated Azure vTPM of the end-to-end tests, and
#                    the tools to inspect it by hand (docs/guest-agent.md).
#   postgresql:      initdb/pg_ctl for the tests of the PostgreSQL store and of several replicas.
DEB_PACKAGES := build-essential pkg-config openssl cloud-init curl python3 python3-venv swtpm swtpm-tools tpm2-tools libtss2-dev postgresql softhsm2
FUZZ_SECONDS ?= 20

.PHONY: all deps measure-deps build test fmt-check clippy unit terraform-checks fuzz-smoke fuzz bench bench-report demo clean

all: build

# Install missing Debian packages when running as root; otherwise say what is missing.
deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  else \
	    echo "missing Debian packages:$$missing (run make as root, or install them)"; exit 1; \
	  fi; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "cargo is not installed (https://rustup.rs)"; exit 1; }

# The production build first (broker and guest-agent without the `simulator` feature, kept
# in target/production/ for the tests that check it refuses every simulator setting), then
# every binary with every feature (the simulator on: tests, demo, benchmarks).
build: deps
	$(CARGO) build -p broker -p guest-agent --locked --bins
	mkdir -p target/production
	cp target/debug/broker target/debug/guest-agent target/production/
	$(CARGO) build --workspace --all-features --locked --bins

fmt-check: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt --manifest-path attestation/fuzz/Cargo.toml --all -- --check

clippy: deps
	$(CARGO) clippy --workspace --all-targets --all-features --locked -- -D warnings
	$(CARGO) clippy -p broker -p guest-agent --locked -- -D warnings   # the production build
	$(CARGO) clippy --manifest-path attestation/fuzz/Cargo.toml --all-targets --locked -- -D warnings

# The independent reference for `broker measure` (sev-snp-measure from PyPI, in a virtual
# environment) and real firmware to measure (Debian's ovmf package, unpacked, not installed).
MEASURE_VENV := target/measure-venv
measure-deps:
	@$(MEASURE_VENV)/bin/python -c 'import sevsnpmeasure' 2>/dev/null || { \
	  echo "installing sev-snp-measure into $(MEASURE_VENV)"; \
	  python3 -m venv $(MEASURE_VENV) && \
	  $(MEASURE_VENV)/bin/pip install --quiet --disable-pip-version-check "sev-snp-measure==0.0.13"; }
	@[ -f target/ovmf/usr/share/ovmf/OVMF.fd ] || { \
	  mkdir -p target/ovmf && cd target/ovmf && \
	  { apt-get download ovmf 2>/dev/null || { apt-get update -q >/dev/null && apt-get download ovmf; }; } && \
	  dpkg -x ovmf_*.deb . ; }

# Binaries first: the end-to-end tests run them as real processes.
unit: build measure-deps
	$(CARGO) test --workspace --all-features --locked

# Each fuzz target for a short time (cargo-fuzz, libFuzzer, stable toolchain).
fuzz-smoke: deps
	scripts/fuzz.sh $(FUZZ_SECONDS)

# Terraform: fmt, validate and `terraform test` of the provider-free module, and the rendered
# user data through `cloud-init schema` and the agent's config parser (offline).
terraform-checks: build
	scripts/terraform-checks.sh

test: fmt-check clippy unit terraform-checks fuzz-smoke

# Longer fuzzing run: make fuzz FUZZ_SECONDS=600
fuzz: deps
	scripts/fuzz.sh $(FUZZ_SECONDS)

bench: deps
	scripts/bench.sh

# Tables (stdout) and SVG plots (docs/bench/) from the results of the last `make bench`.
bench-report:
	$(CARGO) run --release --locked --bin bench-report -- target/bench/load.jsonl docs/bench

demo: build
	scripts/demo.sh

clean:
	$(CARGO) clean
