# Bulwark's single entry point. `make demo` and `make test` set up everything they need.
#   make demo    build what is missing, then boot a VM that runs the Wasm self-test
#   make test    unit tests and end-to-end tests on real VMs (needs /dev/kvm)
#   make bench   start-up benchmark (process start to ready line, to exit; peak RSS)
#   make lint    rustfmt and clippy, for the host crates and the guest
#   make guest   build the guest image, the binaries and the precompiled self-test into build/

export PATH := $(HOME)/.cargo/bin:$(PATH)
BUILD_DIR ?= build
export BULWARK_BUILD_DIR := $(abspath $(BUILD_DIR))

.PHONY: all setup guest demo test bench lint clean
all: guest

setup:
	@scripts/setup.sh

guest: setup
	@BUILD_DIR=$(BUILD_DIR) images/build.sh

demo: guest
	@echo "==> booting a Bulwark VM: guest $(BUILD_DIR)/bulwark-guest.elf, payload $(BUILD_DIR)/selftest.cwasm"
	@target/release/bulwark-vmm --console - --timings --timeout 30 \
		--payload $(BUILD_DIR)/selftest.cwasm $(BUILD_DIR)/bulwark-guest.elf

# --release reuses what `guest` just built (wasmtime and Cranelift take minutes to compile).
test: guest
	cargo test --release --locked

bench: guest
	cargo bench --locked -p bulwark-tests --bench boot

lint: setup
	cargo fmt --all --check
	cargo clippy --release --locked --all-targets -- -D warnings
	cargo clippy --release --locked -p bulwark-guest --target x86_64-unknown-none -- -D warnings

clean:
	rm -rf $(BUILD_DIR)
	cargo clean
