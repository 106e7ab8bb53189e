#!/usr/bin/env bash
# Install everything dfsfuse needs on Debian/Ubuntu, idempotently:
#   system packages (apt-get, only those missing; sudo when not root),
#   a virtual environment in .venv with dfsfuse installed in editable mode.
# Usage: scripts/install.sh [--test]
#   --test  also install what the test suite needs (pytest, attr, sqlite3, rsync, git,
#           the PostgreSQL server the tests start themselves: tests/pgserver.py, and
#           iproute2 + util-linux for the network namespaces of tests/netns.py).
set -euo pipefail

with_tests=0
for arg in "$@"; do
    case "$arg" in
        --test) with_tests=1 ;;
        -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
    esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# --- system packages ------------------------------------------------------
# libpq5: the PostgreSQL client library that psycopg (pure Python) loads.
packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv libpq5)
if [ "$with_tests" = 1 ]; then
    # postgresql: server binaries in /usr/lib/postgresql/<major>/bin and the system
    # user postgres that the tests run them as (tests/pgserver.py).
    # iproute2 (ip netns, veth, bridge) and util-linux (nsenter, setpriv): the "machines" of
    # tests/netns.py. Bridges need the kernel's bridge support; without it the harness routes instead.
    packages+=(attr sqlite3 rsync git postgresql iproute2 util-linux)
fi

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    if ! command -v apt-get >/dev/null; then
        echo "install.sh: missing ${missing[*]} and no apt-get here; install them by hand" >&2
        exit 1
    fi
    sudo=()
    if [ "$(id -u)" != 0 ]; then
        sudo=(sudo)
    fi
    echo "install.sh: installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    log="$(mktemp)"
    if ! { "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "install.sh: apt-get failed" >&2
        exit 1
    fi
    rm -f "$log"
fi

# --- virtual environment ----------------------------------------------------
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys' 2>/dev/null; then
    rm -rf .venv
    "$python" -m venv .venv
fi

target="."
if [ "$with_tests" = 1 ]; then
    target=".[test]"
fi
log="$(mktemp)"
if ! .venv/bin/python -m pip install -q -e "$target" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "install.sh: pip install failed" >&2
    exit 1
fi
rm -f "$log"
