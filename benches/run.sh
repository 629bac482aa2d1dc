#!/usr/bin/env bash
# Runs every cowimg benchmark and renders benches/RESULTS.md.
#
#   benches/run.sh            full run (about 20 minutes on 2 cores)
#   QUICK=1 benches/run.sh    one repetition, short runs (about 5 minutes)
#
# Steps can be skipped: SKIP_CRITERION=1 SKIP_NBD=1 SKIP_CC=1 SKIP_SCALE=1 SKIP_EXPORTS=1
# SKIP_TLS=1. benches/ab_server.py (two builds of the server, alternating) is run by hand.
# Every script's knobs (REPS, RUNTIME, RAMP, SERVERS, WORKLOADS, DIRTY_MIB, SCALE_CLUSTERS,
# WORK_DIR, ...) are described in its docstring. Scratch files go to target/bench-work
# (WORK_DIR); results to benches/results/<run id>/.
# benches/profile.sh WORKLOAD profiles cowimg serve under one NBD workload (perf + strace).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fio >/dev/null || need+=(fio)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v qemu-nbd >/dev/null || need+=(qemu-utils)
[ -x /usr/bin/time ] || need+=(time)
command -v strace >/dev/null || need+=(strace)
command -v python3 >/dev/null || need+=(python3)
/usr/bin/python3 -c "import nbd" 2>/dev/null || need+=(python3-libnbd)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# fio's nbd engine and nbdkit's cow filter are separate packages on some releases.
fio --enghelp=nbd >/dev/null 2>&1 || { echo "fio lacks the nbd engine" >&2; exit 1; }

export BENCH_RUN_ID="${BENCH_RUN_ID:-$(date +%Y%m%d-%H%M%S)}"
echo "run $BENCH_RUN_ID (QUICK=${QUICK:-0})" >&2

cargo build --release --bin cowimg
cargo bench --no-run --bench image --bench nbd_load --bench scale

if [ "${SKIP_CRITERION:-0}" = 0 ]; then
    rm -rf target/criterion
    if [ "${QUICK:-0}" != 0 ]; then export CRITERION_QUICK=1; fi
    cargo bench --bench image
    python3 benches/report.py collect-criterion
fi
[ "${SKIP_NBD:-0}" = 0 ] && python3 benches/nbd.py
[ "${SKIP_CC:-0}" = 0 ] && python3 benches/commit_convert.py
[ "${SKIP_SCALE:-0}" = 0 ] && python3 benches/scale.py
[ "${SKIP_EXPORTS:-0}" = 0 ] && python3 benches/exports.py
[ "${SKIP_TLS:-0}" = 0 ] && python3 benches/tls.py
python3 benches/report.py
echo "results: benches/RESULTS.md, benches/results/$BENCH_RUN_ID/" >&2
