#!/usr/bin/env python3
"""Before/after for `cowimg serve`: two builds, alternating, on the same workloads.

On a shared 2-core machine throughput swings by 2x between minutes, so a change to the
server is judged by two figures taken in alternation (A, B, A, B, ...) and compared as
medians: the rate, and the server's own CPU time per request (user + system, from
/proc/PID/stat), which other load disturbs much less than the rate.

    COWIMG_A=target/release/cowimg COWIMG_B=/path/to/old/cowimg python3 benches/ab_server.py

Knobs: ROUNDS (6), RUNTIME (5 s), SIZE_MIB (1024), WORKLOADS (comma-separated subset of
randwrite-4k, randread-4k, randwrite-4k-flush32). Each round serves a fresh overlay on one
base of random bytes. Prints a Markdown table; writes JSON to RESULTS_DIR/<run id>/ab.json.
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    MIB, WORK_DIR, Server, cargo_bench_exe, env_int, log, make_random_file, remove,
    save_json, settle, sh,
)

ROUNDS = env_int("ROUNDS", 6, 2)
RUNTIME = env_int("RUNTIME", 5, 2)
SIZE = env_int("SIZE_MIB", 1024) * MIB
WORKLOADS = {
    "randwrite-4k": ["--rw", "randwrite", "--flush-every", "0"],
    "randread-4k": ["--rw", "randread", "--flush-every", "0"],
    "randwrite-4k-flush32": ["--rw", "randwrite", "--flush-every", "32"],
}
BASE = WORK_DIR / "base.raw"
SOCK = WORK_DIR / "ab.sock"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def one_run(exe, workload, load_exe):
    overlay = WORK_DIR / "ab.cow"
    remove(overlay)
    sh([exe, "create", "-b", BASE, "-F", "raw", overlay])
    settle()
    server = Server("ab", [exe, "serve", "--socket", SOCK, overlay], SOCK)
    try:
        before = cpu_seconds(server.proc.pid)
        out = json.loads(sh([load_exe, "--socket", SOCK, "--bs", "4096", "--iodepth", "16",
                             "--runtime", str(RUNTIME), "--ramp", "1"] + WORKLOADS[workload]))
        used = cpu_seconds(server.proc.pid) - before
    finally:
        server.stop()
    ops = max(out["ops"], 1)
    return {"iops": out["iops"], "cpu_us_per_op": used * 1e6 / ops}


def main():
    a = os.environ.get("COWIMG_A")
    b = os.environ.get("COWIMG_B")
    if not (a and b):
        sys.exit("set COWIMG_A and COWIMG_B to the two cowimg binaries")
    names = {"A": a, "B": b}
    wanted = os.environ.get("WORKLOADS")
    workloads = wanted.split(",") if wanted else list(WORKLOADS)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    if not BASE.exists() or BASE.stat().st_size != SIZE:
        make_random_file(BASE, SIZE)
    load_exe = cargo_bench_exe("nbd_load")
    results = {w: {"A": [], "B": []} for w in workloads}
    for r in range(ROUNDS):
        for w in workloads:
            # Alternate which build goes first, so neither always runs on a warmer cache.
            order = ["A", "B"] if r % 2 == 0 else ["B", "A"]
            for k in order:
                res = one_run(names[k], w, load_exe)
                results[w][k].append(res)
                log(f"round {r + 1}/{ROUNDS} {w:22} {k} {res['iops']:8.0f} IOPS "
                    f"{res['cpu_us_per_op']:6.1f} us CPU/op")
    print(f"\nA = {a}\nB = {b}\n")
    print("| workload | A IOPS (median) | B IOPS (median) | A/B | A CPU us/op | B CPU us/op | A/B |")
    print("|---|---|---|---|---|---|---|")
    table = {}
    for w in workloads:
        med = {k: (statistics.median(x["iops"] for x in results[w][k]),
                   statistics.median(x["cpu_us_per_op"] for x in results[w][k])) for k in "AB"}
        table[w] = med
        print(f"| {w} | {med['A'][0]:.0f} | {med['B'][0]:.0f} | {med['A'][0] / med['B'][0]:.2f} "
              f"| {med['A'][1]:.1f} | {med['B'][1]:.1f} | {med['A'][1] / med['B'][1]:.2f} |")
    save_json("ab.json", {"a": a, "b": b, "rounds": ROUNDS, "runtime": RUNTIME,
                          "results": results, "medians": table,
                          "when": time.strftime("%Y-%m-%d %H:%M:%S")})


if __name__ == "__main__":
    main()
