# Bulwark's single entry point. `make demo` and `make test` set up everything they need.
#   make demo    build what is missing, boot a VM that runs the Wasm self-test, run tool calls
#   make test    unit tests and end-to-end tests on real VMs (needs /dev/kvm)
#   make bench   benchmarks: VM start-up, vsock, and `bulwark run` (hello, compute-bound tool)
#   make lint    rustfmt, clippy and the docs build (no warnings), for the host crates and the guest
#   make fuzz    fuzz the vsock device's queue and packet parsing (nightly + cargo-fuzz; FUZZ_SECONDS)
#   make guest   build the guest image, the binaries and the precompiled self-test into build/
#   make runtimes  fetch the pinned language runtimes (images/runtimes.txt) into build/runtimes/
#                for `bulwark python` and `bulwark js` (`make guest` does this too)

export PATH := $(HOME)/.cargo/bin:$(PATH)
BUILD_DIR ?= build
export BULWARK_BUILD_DIR := $(abspath $(BUILD_DIR))

FUZZ_SECONDS ?= 60

.PHONY: all setup guest runtimes demo test bench lint fuzz clean
all: guest

setup:
	@scripts/setup.sh

guest: setup
	@BUILD_DIR=$(BUILD_DIR) images/build.sh

runtimes: setup
	@BUILD_DIR=$(BUILD_DIR) images/runtimes.sh

demo: guest
	@echo "==> booting a Bulwark VM: guest $(BUILD_DIR)/bulwark-guest.elf, payload $(BUILD_DIR)/selftest.cwasm"
	@target/release/bulwark-vmm --console - --timings --timeout 30 \
		--payload $(BUILD_DIR)/selftest.cwasm $(BUILD_DIR)/bulwark-guest.elf
	@echo "==> a tool call: bulwark run examples/hello.wat"
	@BULWARK_GUEST=$(BUILD_DIR)/bulwark-guest.elf target/release/bulwark run examples/hello.wat
	@echo "==> a tool call with stdin and arguments: bulwark run $(BUILD_DIR)/json-rank.wasm points"
	@echo '[{"who":"ada","points":7},{"who":"bo","points":2},{"who":"cy","points":3}]' | \
		BULWARK_GUEST=$(BUILD_DIR)/bulwark-guest.elf target/release/bulwark run $(BUILD_DIR)/json-rank.wasm points
	@echo "==> Python in a VM: bulwark python -c ... (the first call compiles CPython once, ~15 s)"
	@BULWARK_GUEST=$(BUILD_DIR)/bulwark-guest.elf target/release/bulwark python -c \
		"import sys, platform; print('hello from CPython', platform.python_version(), 'on', sys.platform)"
	@echo "==> JavaScript in a VM: bulwark js -e ..."
	@BULWARK_GUEST=$(BUILD_DIR)/bulwark-guest.elf target/release/bulwark js -e \
		"console.log('hello from QuickJS,', [1, 2, 3].map(x => x * x).join(' '))"

# --release reuses what `guest` just built (wasmtime and Cranelift take minutes to compile).
test: guest
	@[ -n "$$BULWARK_WASI_TESTSUITE" ] || [ -d "$(BUILD_DIR)/wasi-testsuite/tests" ] || \
		echo "==> NOT RUN: the WASI test suite is not on this machine, so tests/tests/wasi_testsuite.rs will skip it (README: 'The WASI test suite')"
	cargo test --release --locked

bench: guest
	cargo bench --locked -p bulwark-tests --bench boot --bench vsock --bench run --bench serve

lint: setup
	cargo fmt --all --check
	cargo clippy --release --locked --all-targets -- -D warnings
	cargo clippy --release --locked -p bulwark-guest --target x86_64-unknown-none -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --release --locked --no-deps
	RUSTDOCFLAGS="-D warnings" cargo doc --release --locked --no-deps -p bulwark-guest --target x86_64-unknown-none

fuzz: setup
	@command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	cd fuzz && cargo +nightly fuzz run vsock_queues -- -max_total_time=$(FUZZ_SECONDS)

clean:
	rm -rf $(BUILD_DIR)
	cargo clean
