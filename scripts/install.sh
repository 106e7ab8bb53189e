#!/usr/bin/env bash
# Install everything dfsfuse needs on Debian/Ubuntu, idempotently:
#   system packages (apt-get, only those missing; sudo when not root),
#   a virtual environment in .venv with pyfuse3 built with patches/pyfuse3 applied
#   (docs/pyfuse3-patch.md) and dfsfuse installed in editable mode.
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
# patch: applies patches/pyfuse3 to the pyfuse3 sources.
packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv libpq5 patch)
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

# --- pyfuse3 with the dfsfuse patches -----------------------------------------
# pyfuse3 3.5 hands no file locks, no fallocate and no statfs inode to the file system
# (docs/pyfuse3-patch.md), so it is built from its sdist with patches/pyfuse3 applied,
# once: again only when the installed pyfuse3 lacks
# pyfuse3.DFSFUSE_PATCHES == $pyfuse3_patch_level (a new or changed patch raises both).
# Its version, 3.5.0+dfsfuse.N, satisfies pyproject.toml's pyfuse3>=3.2, so the pip
# install below keeps it.
pyfuse3_version=3.5.0
pyfuse3_patch_level=3
cython_version=3.2.4  # the Cython that generated the C sources of pyfuse3 3.5.0

build_pyfuse3() {
    # In the temp dir $1: a build venv, the sdist, the patches, a wheel; installed
    # into .venv. (errexit does not hold in a function called from an if: hence &&.)
    local build="$1" src="$1/pyfuse3-$pyfuse3_version" patchfile
    "$python" -m venv "$build/env" &&
        "$build/env/bin/python" -m pip install "cython==$cython_version" "setuptools>=78.1.1" \
            "setuptools_scm>=8" &&
        "$build/env/bin/python" -m pip download --no-binary :all: --no-deps -d "$build" \
            "pyfuse3==$pyfuse3_version" &&
        tar -xzf "$build/pyfuse3-$pyfuse3_version.tar.gz" -C "$build" || return 1
    for patchfile in patches/pyfuse3/*.patch; do
        patch -d "$src" -p1 --batch --forward <"$patchfile" || return 1
    done
    # Generated from the unpatched .pyx: without it the build must run Cython
    rm -f "$src/src/pyfuse3/__init__.c" &&
        SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3="$pyfuse3_version+dfsfuse.$pyfuse3_patch_level" \
            "$build/env/bin/python" -m pip wheel --no-build-isolation --no-deps -w "$build/dist" "$src" &&
        .venv/bin/python -m pip install --force-reinstall --no-deps "$build"/dist/pyfuse3-*.whl
}

if ! .venv/bin/python -c "import sys, pyfuse3; sys.exit(getattr(pyfuse3, 'DFSFUSE_PATCHES', 0) != $pyfuse3_patch_level)" \
        >/dev/null 2>&1; then
    echo "install.sh: building pyfuse3 $pyfuse3_version with patches/pyfuse3"
    build="$(mktemp -d)"
    if ! build_pyfuse3 "$build" >"$build/log" 2>&1; then
        cat "$build/log" >&2
        rm -rf "$build"
        echo "install.sh: building the patched pyfuse3 failed" >&2
        exit 1
    fi
    rm -rf "$build"
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
