#!/usr/bin/env bash
# cowimg demo: a block-level copy-on-write overlay under an overlayfs upper layer.
#
#   bash demo.sh              (as root, from any directory)
#
# 1. builds cowimg (cargo build --release) and installs missing tools (Debian packages);
# 2. makes base.raw, an ext4 file system holding an overlayfs upperdir and workdir;
# 3. creates overlay.cow on top of it and serves it over NBD with `cowimg serve`;
# 4. attaches the export as a block device with `cowimg attach` (nbd-client when the kernel
#    has the nbd module, else
#    nbdfuse + a loop device), mounts the ext4 and an overlayfs that uses it as upper layer;
# 5. creates, modifies, renames and deletes files through the overlayfs: the copy-ups and
#    whiteouts land in overlay.cow, while base.raw stays byte-for-byte unchanged;
# 6. detaches, commits overlay.cow into base.raw, and mounts base.raw read-only to show
#    that the same merged view now comes from the base alone.
#
# Everything happens in a temporary directory that is removed at the end, also on Ctrl-C.
# Environment: COWIMG=/path/to/cowimg uses that binary instead of building one;
# KEEP=1 keeps the temporary directory; NO_INSTALL=1 never runs apt-get.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
EXPORT=demo
SIZE=64M

if [ -t 1 ]; then
    BOLD=$'\033[1m' DIM=$'\033[2m' GREEN=$'\033[32m' RED=$'\033[31m' RESET=$'\033[0m'
else
    BOLD='' DIM='' GREEN='' RED='' RESET=''
fi
STEP=0
step() { STEP=$((STEP + 1)); printf '\n%s==> %d. %s%s\n' "$BOLD" "$STEP" "$*" "$RESET"; }
show() { printf '%s$ %s%s\n' "$DIM" "$*" "$RESET"; }
run() { show "$@"; "$@"; }
run_sh() { show "$1"; sh -c "$1"; }
ok() { printf '%s✓ %s%s\n' "$GREEN" "$*" "$RESET"; }
die() { printf '%sdemo.sh: %s%s\n' "$RED" "$*" "$RESET" >&2; exit 1; }

# --- state that cleanup undoes; every piece is checked against the system, so cleanup can
# --- run at any point, more than once.
WORK=""
SERVER_PID=""
DEV=""
CLEANING=""

is_mounted() { [ -n "$1" ] && mountpoint -q "$1" 2>/dev/null; }

unmount() {
    local dir=$1 i
    for i in 1 2 3 4 5 6 7 8 9 10; do
        is_mounted "$dir" || return 0
        umount "$dir" 2>/dev/null && return 0
        sleep 0.5
    done
    # Still busy (a shell inside it?): detach it from the tree so the rest can go.
    umount -l "$dir" 2>/dev/null || true
}

# wait_for_exit PID SECONDS: true once PID is gone.
wait_for_exit() {
    local pid=$1 tenths=$(($2 * 10))
    while kill -0 "$pid" 2>/dev/null; do
        [ "$tenths" -le 0 ] && return 1
        tenths=$((tenths - 1))
        sleep 0.1
    done
}

stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    local status=0
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        # SIGTERM: the server flushes the image, closes its clients and exits.
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        if ! wait_for_exit "$SERVER_PID" 60; then
            echo "demo.sh: the server did not exit within 60 s; killing it" >&2
            kill -KILL "$SERVER_PID" 2>/dev/null || true
        fi
    fi
    wait "$SERVER_PID" 2>/dev/null || status=$?
    SERVER_PID=""
    return "$status"
}

detach_device() {
    if [ -n "$DEV" ]; then
        COWIMG_RUN_DIR="$WORK/run" "$COWIMG" detach "$DEV" 2>/dev/null || true
        DEV=""
    fi
}

cleanup() {
    local status=$?
    [ -n "$CLEANING" ] && return
    CLEANING=1
    set +e
    # A second signal must not cut the undoing short (every step below has a time limit).
    trap "" INT TERM
    if [ -n "$WORK" ]; then
        unmount "$WORK/verify"
        unmount "$WORK/base-ro"
        unmount "$WORK/merged"
        unmount "$WORK/ext4"
        detach_device
    fi
    stop_server
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ -n "${KEEP:-}" ]; then
            echo "demo.sh: kept $WORK"
        elif is_mounted "$WORK/ext4"; then
            echo "demo.sh: $WORK is still in use; not removing it" >&2
        else
            rm -rf "$WORK"
        fi
    fi
    if [ "$status" -ne 0 ]; then
        printf '%sdemo.sh: failed (exit status %d); everything it set up was undone%s\n' "$RED" "$status" "$RESET" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- setup -------------------------------------------------------------------------------

[ "$(id -u)" -eq 0 ] || die "run me as root (loop devices, mounts and overlayfs need it)"
export PATH="$PATH:/usr/sbin:/sbin"

step "Tools"
declare -A PACKAGE_OF=(
    [nbdfuse]=libnbd-bin [nbdinfo]=libnbd-bin [nbdkit]=nbdkit [nbd-client]=nbd-client
    [fio]=fio [qemu-img]=qemu-utils [mkfs.ext4]=e2fsprogs [losetup]=mount
)
missing=$(for t in "${!PACKAGE_OF[@]}"; do command -v "$t" >/dev/null 2>&1 || echo "${PACKAGE_OF[$t]}"; done | sort -u)
if [ -n "$missing" ]; then
    [ -z "${NO_INSTALL:-}" ] && command -v apt-get >/dev/null 2>&1 || die "missing packages:" $missing
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    run apt-get install -y -q --no-install-recommends $missing </dev/null \
        || { apt-get update -q </dev/null && apt-get install -y -q --no-install-recommends $missing </dev/null; } \
        || die "could not install:" $missing
fi
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || grep -qw overlay /proc/filesystems \
    || die "this kernel has no overlayfs"
ok "nbdfuse, nbd-client, mkfs.ext4, losetup and overlayfs are available"

step "Build cowimg"
if [ -n "${COWIMG:-}" ]; then
    echo "using COWIMG=$COWIMG"
else
    if ! command -v cargo >/dev/null 2>&1; then
        for env in "$HOME/.cargo/env" ${SUDO_USER:+"$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo/env"}; do
            # shellcheck disable=SC1090
            [ -f "$env" ] && . "$env" && break
        done
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (https://rustup.rs)"
    run cargo build --release --manifest-path "$REPO/Cargo.toml"
    COWIMG="$REPO/target/release/cowimg"
fi
[ -x "$COWIMG" ] || die "$COWIMG is not an executable"
cowimg() { run "$COWIMG" "$@"; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cowimg-demo.XXXXXX")
mkdir -p "$WORK"/{seed,lower,run,ext4,merged,base-ro,verify}
cd "$WORK"
SOCK="$WORK/nbd.sock"
echo "working in $WORK"

step "Base image: base.raw, an ext4 file system that will hold an overlayfs upper layer"
mkdir -p seed/upper seed/work
echo "This file system lives in base.raw." > seed/README.txt
run mkfs.ext4 -q -F -L cowimg-base -E lazy_itable_init=0,lazy_journal_init=0 -d seed base.raw "$SIZE"
base_sum_before=$(sha256sum < base.raw)
echo "base.raw: $SIZE, sha256 ${base_sum_before%% *}"

echo "The overlayfs lower layer is a plain directory:"
mkdir -p lower/docs
printf 'color=blue\nretries=3\n' > lower/app.conf
seq 1 1000 > lower/data.txt
echo "2024-01-01 started" > lower/old.log
echo "How to use the app." > lower/docs/guide.txt
run find lower -type f

step "Overlay: overlay.cow on top of base.raw"
cowimg create -b base.raw -F raw overlay.cow
cowimg info overlay.cow

step "Serve overlay.cow over NBD"
show "$COWIMG" serve --socket "$SOCK" --export-name "$EXPORT" overlay.cow "&"
# Its own session, so that a Ctrl-C reaches only this script; cleanup stops the server.
setsid "$COWIMG" serve --socket "$SOCK" --export-name "$EXPORT" overlay.cow > serve.log 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do
    [ -S "$SOCK" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat serve.log >&2; die "the server exited"; }
    sleep 0.1
done
[ -S "$SOCK" ] || { cat serve.log >&2; die "the server did not create $SOCK within 10 s"; }
URI="nbd+unix:///$EXPORT?socket=$SOCK"
run nbdinfo "$URI"

step "Attach the export as a block device"
# cowimg attach uses the kernel's NBD client when the kernel has the nbd module, and
# nbdfuse plus a loop device otherwise (it says which); it prints the device.
export COWIMG_RUN_DIR="$WORK/run"
show "$COWIMG" attach "'$URI'"
DEV=$("$COWIMG" attach "$URI") || die "cowimg attach failed"
ok "attached: $DEV"
run blkid "$DEV" || true

step "Mount the ext4 from the overlay, and an overlayfs that uses it as upper layer"
run mount "$DEV" ext4
run mount -t overlay overlay -o "lowerdir=$WORK/lower,upperdir=$WORK/ext4/upper,workdir=$WORK/ext4/work" merged
run ls -l merged

step "Change files through the overlayfs"
run_sh 'echo "a new file" > merged/new.txt'
run_sh 'echo "retries=5" >> merged/app.conf'      # copy-up of a lower file
run mv merged/data.txt merged/data-renamed.txt          # copy-up + whiteout of the old name
run rm merged/old.log                                   # whiteout
run_sh 'echo "my notes" > merged/docs/notes.txt'     # copy-up of the directory
run dd if=/dev/urandom of=merged/blob.bin bs=1M count=4 status=none
run sync -f merged
run ls -l merged
echo "The upper layer, inside the ext4 inside overlay.cow (whiteouts are c--------- 0, 0):"
run ls -lR ext4/upper
manifest() { (cd "$1" && find . -printf '%y %m %p\n' | sort && find . -type f -exec sha256sum {} + | sort -k2); }
manifest merged > manifest-before

step "What overlay.cow holds (read while the server has it open: --force-share)"
run sync
"$COWIMG" map -U overlay.cow > map.txt
show "$COWIMG" map -U overlay.cow
head -n 25 map.txt
[ "$(wc -l < map.txt)" -gt 25 ] && echo "... ($(wc -l < map.txt) lines)"
cowimg info -U overlay.cow
echo "The same through NBD: the cowimg:layer context says which layer holds each range"
echo "(1: overlay.cow, 2: base.raw):"
show nbdinfo --map=cowimg:layer "$URI"
nbdinfo --map=cowimg:layer "$URI" > layers.txt
head -n 12 layers.txt
[ "$(wc -l < layers.txt)" -gt 12 ] && echo "... ($(wc -l < layers.txt) lines)"

step "Detach: unmount, detach the device, stop the server (it flushes on SIGTERM)"
run umount merged
run umount ext4
device_sum=$(sha256sum < "$DEV")
# detach flushes the device, detaches it and stops what attach started (nbdfuse here; the
# server is this script's own and stays up until the next step).
run "$COWIMG" detach "$DEV"
DEV=""
echo "the exported disk, as the client saw it: sha256 ${device_sum%% *}"
show kill -TERM "$SERVER_PID" "&&" wait "$SERVER_PID"
stop_server || die "the server exited with an error: $(cat serve.log)"
ok "server stopped cleanly"

base_sum_after=$(sha256sum < base.raw)
[ "$base_sum_after" = "$base_sum_before" ] || die "base.raw changed while only the overlay should have"
ok "base.raw is unchanged: every change is in overlay.cow"
run ls -ls base.raw overlay.cow
cowimg check overlay.cow

step "Commit overlay.cow into base.raw"
cowimg commit overlay.cow
cowimg map overlay.cow
base_sum_committed=$(sha256sum < base.raw)
[ "$base_sum_committed" = "$device_sum" ] \
    || die "base.raw after commit differs from the disk the client saw (${base_sum_committed%% *})"
ok "base.raw now holds exactly the disk the client saw (sha256 ${device_sum%% *})"

step "Mount base.raw read-only: the changes are in the base"
run mount -o ro,loop base.raw base-ro
run ls -lR base-ro/upper
# The committed upper layer over the same lower directory, read-only (both as lower layers).
run mount -t overlay overlay -o "lowerdir=$WORK/base-ro/upper:$WORK/lower" verify
run cat verify/app.conf
run ls -l verify
manifest verify > manifest-after
if diff -u manifest-before manifest-after; then
    ok "the merged view from the committed base matches what was written through the overlay"
else
    die "the merged view differs (diff above)"
fi
run umount verify
run umount base-ro

step "Done"
echo "cowimg kept every change in overlay.cow, unit by unit, until the commit wrote them into base.raw."
