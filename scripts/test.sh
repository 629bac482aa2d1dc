#!/usr/bin/env bash
# The test command: installs the tools the end-to-end tests drive when they are missing,
# builds every target and runs every test suite. Exits non-zero on any failure.
#
#   bash scripts/test.sh            # from anywhere; extra arguments go to `cargo test`
#
# Run as root on a fresh Debian/Ubuntu machine it installs what is missing (CI does this).
# As another user it installs nothing, and the tests that need root or a missing tool say
# why they skip (or fail, when CI is set).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The tool each test needs, and the Debian package that provides it.
declare -A PACKAGE_OF=(
    [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdfuse]=libnbd-bin
    [nbdkit]=nbdkit
    [nbd-client]=nbd-client
    [fio]=fio
    [qemu-img]=qemu-utils [qemu-io]=qemu-utils [qemu-nbd]=qemu-utils
    [mkfs.ext4]=e2fsprogs [e2fsck]=e2fsprogs
    [losetup]=mount
    [openssl]=openssl
)

missing_packages() {
    local tool
    for tool in "${!PACKAGE_OF[@]}"; do
        # /usr/sbin is not on every user's PATH; the tools there still count.
        if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1; then
            echo "${PACKAGE_OF[$tool]}"
        fi
    done | sort -u
}

install_missing_tools() {
    local packages
    packages=$(missing_packages)
    [ -z "$packages" ] && return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: not installing missing packages (needs root and apt-get):" $packages >&2
        return 0
    fi
    echo "test.sh: installing" $packages
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    # shellcheck disable=SC2086
    if ! "${apt[@]}" install --no-install-recommends $packages </dev/null; then
        # A fresh machine's package index may be stale or absent.
        "${apt[@]}" update </dev/null
        # shellcheck disable=SC2086
        "${apt[@]}" install --no-install-recommends $packages </dev/null
    fi
}

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { echo "test.sh: cargo not found; install a Rust toolchain" >&2; exit 1; }

install_missing_tools

# One build, in the test profile, of every target (benches included, so they keep
# compiling); `cargo test` below runs from the same artifacts instead of building again.
echo "== cargo test --no-run --all-targets"
cargo test --no-run --all-targets

echo "== cargo test"
log=$(mktemp "${TMPDIR:-/tmp}/cowimg-test.XXXXXX")
skips=$(mktemp "${TMPDIR:-/tmp}/cowimg-skips.XXXXXX")
trap 'rm -f "$log" "$skips"' EXIT
export COWIMG_SKIP_LOG="$skips"
status=0
cargo test --no-fail-fast "$@" 2>&1 </dev/null | tee "$log" || status=$?

# The model, crash and server tests once more over format version 2 (FORMAT-v2.md): the
# tests create their images in the version COWIMG_TEST_FORMAT_VERSION names. Only for the
# whole suite; a filtered run tests what it names.
if [ "$#" -eq 0 ]; then
    echo "== cargo test, images in format version 2"
    v2_suites=(model crash nbd_server nbd_clients nbd_exports nbd_faults nbd_control nbd_crash nbd_overlayfs)
    COWIMG_TEST_FORMAT_VERSION=2 cargo test --no-fail-fast "${v2_suites[@]/#/--test=}" 2>&1 </dev/null |
        tee -a "$log" || status=$?
fi

echo
echo "== summary"
# `Running`/`Doc-tests` name each suite; `test result:` is its outcome.
grep -E '^\s*(Running|Doc-tests) |^test result:' "$log" | sed -E 's/^\s+//' || true
failed=$(grep -c '^test result: FAILED' "$log" || true)
# Tests run in all suites: a filter that matches nothing is a mistake, not a pass.
read -r passed failed_tests < <(sed -nE 's/^test result: [A-Za-z]+\. ([0-9]+) passed; ([0-9]+) failed.*/\1 \2/p' "$log" |
    awk '{ p += $1; f += $2 } END { print p + 0, f + 0 }')
ran=$((passed + failed_tests))
skipped=$(sort -u "$skips" | grep -c . || true)
if [ -s "$skips" ]; then
    echo "skipped (passed without doing their work; under CI=true these fail instead):"
    sort -u "$skips" | sed 's/^/  /'
fi
echo "summary: $((passed - skipped)) passed, $failed_tests failed, $skipped skipped"
if [ "$status" -ne 0 ]; then
    echo "FAILED: cargo test exited with status $status ($failed suite(s) reported failures)"
    exit "$status"
fi
if [ "$ran" -eq 0 ]; then
    echo "FAILED: no test matched${*:+ the arguments: $*}"
    exit 1
fi
echo "OK: all suites passed"
