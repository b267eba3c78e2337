#!/usr/bin/env bash
# Builds the real command-line programs listed in images/real-programs.txt (pinned crates.io
# versions) for wasm32-wasip1. Builds are kept in $BULWARK_BUILD_CACHE/real-programs (default
# ~/.cache/bulwark/real-programs), outside the checkout, so a fresh clone (CI) reuses them:
#   <crate>-<version>.wasm        the build, with <crate>-<version>.wasm.stamp beside it
# and copied into $BUILD_DIR/real (default: build/real):
#   <binary>.wasm                 the program under its own name (rg.wasm, ...): what
#                                 tests/tests/real_programs.rs runs
# Each crate is built with `cargo install --locked`, so its own published Cargo.lock pins every
# dependency; cargo verifies each download against the registry checksum, and this script checks
# the crate's .crate file against the sha256 in the manifest. Debug info is left out (ripgrep's
# release profile keeps it: 19 MB instead of 4 MB), nothing else of the crate's profile changes.
#
# A build is reused while its stamp (crate, version, features, `rustc -vV`) still matches, so
# only the first run, or a new rustc, downloads from crates.io and compiles (a minute or two
# each on two cores). Called by images/build.sh.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
build_dir="${BUILD_DIR:-build}"
manifest="images/real-programs.txt"
out="$build_dir/real"
cache="${BULWARK_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bulwark}/real-programs"
mkdir -p "$out" "$cache"

say() { printf '==> %s\n' "$*"; }
die() { printf 'real-programs: %s\n' "$*" >&2; exit 1; }

rustc_id="$(rustc -vV)" || die "rustc is missing: run scripts/setup.sh"
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1 \
    || die "the Rust target wasm32-wasip1 is missing: run scripts/setup.sh"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"

built=()
while read -r crate version binary features sha256 extra; do
    case "$crate" in '' | '#'*) continue ;; esac
    [ -n "$sha256" ] && [ -z "${extra:-}" ] || die "$manifest: malformed line for $crate"
    [[ "$sha256" =~ ^[0-9a-f]{64}$ ]] || die "$manifest: $crate: the sha256 is not 64 hex digits"
    flags=()
    case "$features" in
        default) ;;
        -) flags+=(--no-default-features) ;;
        *) flags+=(--no-default-features --features "$features") ;;
    esac
    wasm="$cache/$crate-$version.wasm"
    stamp="$wasm.stamp"
    key="$(printf '%s %s %s %s\n%s\n' "$crate" "$version" "$features" "$sha256" "$rustc_id")"
    if [ -f "$wasm" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
        say "$crate $version for wasm32-wasip1: up to date ($wasm)"
    else
        say "building $crate $version for wasm32-wasip1 (first time: a minute or two)"
        started=$SECONDS
        tmp="$(mktemp -d "$cache/.install.XXXXXX")"
        trap 'rm -rf "$tmp"' EXIT
        CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=debuginfo \
            cargo install --quiet --locked --no-track --force --target wasm32-wasip1 \
            --root "$tmp" "${flags[@]}" "$crate@$version"
        # cargo checked the download against the index; check it against the pinned checksum.
        crate_file="$(find "$cargo_home/registry/cache" -name "$crate-$version.crate" -print -quit 2>/dev/null || true)"
        [ -n "$crate_file" ] || die "cannot find $crate-$version.crate under $cargo_home/registry/cache to check its checksum"
        got="$(sha256sum "$crate_file" | cut -d' ' -f1)"
        [ "$got" = "$sha256" ] || die "$crate $version: the .crate's sha256 is $got, the manifest pins $sha256"
        [ -f "$tmp/bin/$binary.wasm" ] || die "$crate $version installed no $binary.wasm"
        mv "$tmp/bin/$binary.wasm" "$wasm"
        printf '%s\n' "$key" >"$stamp.tmp"
        mv "$stamp.tmp" "$stamp"
        rm -rf "$tmp"
        trap - EXIT
        say "built $crate $version in $((SECONDS - started)) s"
    fi
    cp "$wasm" "$out/$binary.wasm.tmp"
    mv "$out/$binary.wasm.tmp" "$out/$binary.wasm"
    built+=("$binary.wasm")
done <"$manifest"

[ ${#built[@]} -gt 0 ] || die "$manifest lists no program"
(cd "$out" && sha256sum "${built[@]}" && ls -l "${built[@]}" | awk '{print "    " $5 " bytes  " $9}')
