#!/usr/bin/env bash
# Bulwark's entry point on a fresh machine: installs `make` when it is missing (Debian/Ubuntu,
# apt), then runs `make` with the same arguments, so `./dev.sh demo` and `./dev.sh test` work
# with nothing installed by hand. Everything else is installed by the Makefile's `setup` step
# (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v make >/dev/null; then
    command -v apt-get >/dev/null || { echo "dev.sh: make is missing and there is no apt-get to install it" >&2; exit 1; }
    echo "==> installing make (apt)"
    as_root=()
    [ "$(id -u)" -eq 0 ] || as_root=(sudo)
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq make >/dev/null
fi
exec make "$@"
