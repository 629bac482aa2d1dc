#!/usr/bin/env bash
# Profiles `cowimg serve` under one NBD workload with perf (cpu-clock sampling, call graphs
# from DWARF; the release profile keeps debug info) and prints the hottest functions plus a
# system-call count from strace.
#
#   benches/profile.sh randwrite|randread|flush32 [seconds]
#
# Writes target/bench-work/profile-<workload>.{perf.data,txt,strace}.
set -euo pipefail
cd "$(dirname "$0")/.."
wl=${1:?usage: profile.sh randwrite|randread|flush32 [seconds]}
secs=${2:-10}
work=${WORK_DIR:-target/bench-work}
mkdir -p "$work"
cowimg=target/release/cowimg
sock=$work/profile.sock
img=$work/profile.cow
base=$work/base.raw
[ -f "$base" ] || { echo "run benches/nbd.py once first to make $base" >&2; exit 1; }
cargo build --release --bin cowimg >&2
load=$(cargo bench --bench nbd_load --no-run --message-format=json 2>/dev/null |
       python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="nbd_load": print(m["executable"])')

run_load() {
    case $wl in
    randwrite) fio --name=p --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw=randwrite \
                   --bs=4k --iodepth=16 --time_based --runtime="$1" --norandommap >/dev/null ;;
    randread)  fio --name=p --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw=randread \
                   --bs=4k --iodepth=16 --time_based --runtime="$1" --norandommap >/dev/null ;;
    flush32)   "$load" --socket "$sock" --runtime "$1" --ramp 0 ;;
    *) echo "unknown workload $wl" >&2; exit 2 ;;
    esac
}

start_server() {
    rm -f "$img" "$sock"
    "$cowimg" create -b "$(realpath "$base")" -F raw "$img" >/dev/null
    sync
    "$cowimg" serve --socket "$sock" "$img" 2>"$work/profile-serve.stderr" &
    pid=$!
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
}
stop_server() {
    kill -TERM "$pid"
    wait "$pid" || true
    rm -f "$img"
}

# 1. perf profile
start_server
perf record -e cpu-clock -F 2000 --call-graph dwarf,16384 -p "$pid" \
    -o "$work/profile-$wl.perf.data" -- sleep "$((secs + 1))" 2>/dev/null &
perf_pid=$!
sleep 0.5
run_load "$secs"
wait "$perf_pid" || true
stop_server
perf report -i "$work/profile-$wl.perf.data" --no-children --percent-limit 1.5 --stdio \
    --sort symbol 2>/dev/null | grep -v '^$' > "$work/profile-$wl.txt" || true
perf report -i "$work/profile-$wl.perf.data" --children --percent-limit 5 --stdio \
    --sort symbol -g none 2>/dev/null | grep -v '^$' > "$work/profile-$wl-children.txt" || true

# 2. system calls (a separate run: strace slows the server down)
start_server
strace -f -c -o "$work/profile-$wl.strace" -p "$pid" &
strace_pid=$!
sleep 0.5
run_load "$((secs / 2 > 0 ? secs / 2 : 1))"
kill -INT "$strace_pid"; wait "$strace_pid" || true
stop_server

echo "== self time ($work/profile-$wl.txt)"
grep -E '^ +[0-9.]+%' "$work/profile-$wl.txt" | head -30
echo "== inclusive time"
grep -E '^ +[0-9.]+%' "$work/profile-$wl-children.txt" | head -30
echo "== system calls"
head -25 "$work/profile-$wl.strace"
