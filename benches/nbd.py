#!/usr/bin/env python3
"""NBD throughput, peak memory and write amplification: cowimg serve against its peers.

Every server exports the same 1 GiB backing file of random bytes over a Unix socket, on a
fresh overlay for each run:

  cowimg        cowimg serve --socket S overlay.cow   (cowimg create -b base.raw -F raw)
  qcow2         qemu-nbd -f qcow2 on a qcow2 overlay   (qemu-img create -f qcow2 -b base.raw -F raw)
  qcow2-el2     the same with -o extended_l2=on,cluster_size=128k
  nbdkit-cow    nbdkit --filter=cow file base.raw      (overlay in an unlinked temp file)
  raw           nbdkit file copy.raw on a raw copy     (no copy-on-write at all: the limit)

Workloads (fio --ioengine=nbd, one connection, iodepth 16): 4 KiB random write, 4 KiB
random read, 1 MiB sequential write, 1 MiB sequential read, and 4 KiB random write with a
FLUSH every 32 writes. The last one is driven by benches/nbd_load.rs, not fio: fio 3.33
issues a flush for every free queue slot while a flush is in flight (see that file).

Servers alternate within each repetition (round robin), every figure is the median over
REPS repetitions. Knobs (environment): REPS, RUNTIME, RAMP (seconds), SIZE_MIB, WA_MIB, SKIP_WA,
SERVERS (comma-separated subset; cowimg-4k, cowimg with 4 KiB clusters, runs only when named
there, and so does cowimg-prev, the cowimg binary COWIMG_PREV names, labelled
COWIMG_PREV_LABEL: a before/after pair in one run), WORKLOADS (subset), QUICK=1.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    COWIMG, GIB, MIB, QUICK, WORK_DIR, Server, allocated_bytes, cargo_bench_exe, copy_file,
    env_int, fio, have_cowimg_command, log, machine, make_random_file, median, remove,
    save_json, settle, sh, tool_version,
)

REPS = env_int("REPS", 3, 1)
RUNTIME = env_int("RUNTIME", 8, 3)
RAMP = env_int("RAMP", 2, 1)
SIZE = env_int("SIZE_MIB", 1024) * MIB
WA_BYTES = env_int("WA_MIB", 256, 64) * MIB
IODEPTH = 16
FLUSH_EVERY = 32

WORKLOADS = {
    "randwrite-4k": {"rw": "randwrite", "bs": "4k", "label": "4K rand write", "unit": "IOPS"},
    "randread-4k": {"rw": "randread", "bs": "4k", "label": "4K rand read", "unit": "IOPS"},
    "seqwrite-1m": {"rw": "write", "bs": "1m", "label": "1M seq write", "unit": "GiB/s"},
    "seqread-1m": {"rw": "read", "bs": "1m", "label": "1M seq read", "unit": "GiB/s"},
    "randwrite-4k-flush32": {"rw": "randwrite", "bs": "4k", "label": "4K rand write + flush/32",
                             "unit": "IOPS", "load": "nbd_load"},
}

BASE = WORK_DIR / "base.raw"
SOCK = WORK_DIR / "nbd.sock"


class Setup:
    """How to make a fresh image for one server and start the server on it."""

    def __init__(self, name, label, make, cmd, image):
        self.name, self.label, self.make, self.cmd, self.image = name, label, make, cmd, image


def servers():
    cow = WORK_DIR / "overlay.cow"
    q = WORK_DIR / "overlay.qcow2"
    q2 = WORK_DIR / "overlay-el2.qcow2"
    raw = WORK_DIR / "copy.raw"
    cow4k = WORK_DIR / "overlay-4k.cow"
    all_ = [
        Setup("cowimg", "cowimg serve",
              lambda: (remove(cow), sh([COWIMG, "create", "-b", BASE, "-F", "raw", cow])),
              [COWIMG, "serve", "--socket", SOCK, cow], cow),
        Setup("qcow2", "qemu-nbd qcow2",
              lambda: (remove(q), sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", BASE,
                                      "-F", "raw", q])),
              ["qemu-nbd", "-f", "qcow2", "-t", "-e", "4", "--socket", SOCK, q], q),
        Setup("qcow2-el2", "qemu-nbd qcow2 extended_l2,128k",
              lambda: (remove(q2), sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                                       "extended_l2=on,cluster_size=128k", "-b", BASE,
                                       "-F", "raw", q2])),
              ["qemu-nbd", "-f", "qcow2", "-t", "-e", "4", "--socket", SOCK, q2], q2),
        # The cow filter keeps its overlay in an unlinked file under TMPDIR: point it at
        # the same filesystem as everyone else's image.
        Setup("nbdkit-cow", "nbdkit cow filter",
              lambda: None,
              ["nbdkit", "-f", "--unix", SOCK, "--filter=cow", "file", BASE], None),
        Setup("raw", "nbdkit file (raw copy, no COW)",
              lambda: copy_file(BASE, raw),
              ["nbdkit", "-f", "--unix", SOCK, "file", raw], raw),
    ]
    # Not in the default set: 4 KiB clusters, where every new unit is a new cluster placed
    # at the end of the file (see RESULTS.md on flushes and file-system allocation).
    optional = [
        Setup("cowimg-4k", "cowimg serve, -c 4K clusters",
              lambda: (remove(cow4k), sh([COWIMG, "create", "-c", "4K", "-b", BASE, "-F", "raw",
                                          cow4k])),
              [COWIMG, "serve", "--socket", SOCK, cow4k], cow4k),
    ]
    # Before/after in one run: COWIMG_PREV names another build of cowimg (e.g. of the
    # commit before a change), served the same way as "cowimg".
    prev = os.environ.get("COWIMG_PREV")
    if prev:
        cow_prev = WORK_DIR / "overlay-prev.cow"
        optional.append(
            Setup("cowimg-prev", os.environ.get("COWIMG_PREV_LABEL", "cowimg serve, COWIMG_PREV build"),
                  lambda: (remove(cow_prev), sh([prev, "create", "-b", BASE, "-F", "raw",
                                                 cow_prev])),
                  [prev, "serve", "--socket", SOCK, cow_prev], cow_prev))
    wanted = os.environ.get("SERVERS")
    if wanted:
        names = wanted.split(",")
        all_ = [s for s in all_ + optional if s.name in names]
    if any(s.name == "cowimg" for s in all_) and not (
            have_cowimg_command("serve") and have_cowimg_command("create")):
        log("cowimg serve/create are not available in", COWIMG, "- skipping cowimg")
        all_ = [s for s in all_ if s.name != "cowimg"]
    return all_


def start(setup):
    setup.make()
    settle()
    return Server(setup.name, setup.cmd, SOCK, env={"TMPDIR": str(WORK_DIR)})


def uri():
    return f"nbd+unix:///?socket={SOCK}"


def run_workload(wl, load_exe):
    spec = WORKLOADS[wl]
    if spec.get("load") == "nbd_load":
        out = sh([load_exe, "--socket", SOCK, "--rw", spec["rw"], "--bs", "4096",
                  "--iodepth", str(IODEPTH), "--flush-every", str(FLUSH_EVERY),
                  "--runtime", str(RUNTIME), "--ramp", str(RAMP)])
        r = json.loads(out)
        return {"iops": r["iops"], "bw": r["bytes_per_sec"], "flushes": r["flushes"],
                "ops": r["ops"]}
    job = fio(uri(), [f"--rw={spec['rw']}", f"--bs={spec['bs']}", f"--iodepth={IODEPTH}",
                      "--time_based", f"--runtime={RUNTIME}", f"--ramp_time={RAMP}",
                      "--norandommap", "--randrepeat=1"])
    side = job["write"] if "write" in spec["rw"] else job["read"]
    return {"iops": side["iops"], "bw": side["bw_bytes"],
            "lat_p99_us": side.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0) / 1e3}


def write_amplification(setup):
    """Bytes the image grows on disk per byte written by WA_BYTES of 4 KiB random writes,
    each to a distinct block, into a fresh overlay; the server is stopped with SIGTERM
    (which flushes) before measuring."""
    if setup.name == "raw":
        return None
    before = 0
    srv = start(setup)
    try:
        if setup.image:
            before = allocated_bytes(setup.image)
        job = fio(uri(), ["--rw=randwrite", "--bs=4k", f"--iodepth={IODEPTH}",
                          f"--io_size={WA_BYTES}", "--randrepeat=1"])
        written = job["write"]["io_bytes"]
        temp = None
        if setup.image is None:
            # nbdkit cow: the overlay is the unlinked temp file it holds open.
            files = [f for f in srv.open_files() if "(deleted)" in f[0]]
            temp = max(files, key=lambda f: f[1]) if files else None
    finally:
        code = srv.stop()
    if code != 0:
        raise RuntimeError(f"{setup.name} exited {code} on SIGTERM")
    if setup.image:
        grown = allocated_bytes(setup.image) - before
        note = os.path.basename(str(setup.image))
    elif temp:
        grown = temp[1]
        note = "temp overlay " + os.path.basename(temp[0].replace(" (deleted)", ""))
    else:
        return None
    return {"written": written, "grown": grown, "ratio": grown / written, "file": note}


def device_writes():
    """(write requests, bytes written, flushes) so far on the block device under WORK_DIR,
    from /sys/dev/block/MAJ:MIN/stat; None where the kernel does not show it."""
    dev = os.stat(WORK_DIR).st_dev
    try:
        f = (pathlib.Path("/sys/dev/block") / f"{os.major(dev)}:{os.minor(dev)}" / "stat") \
            .read_text().split()
    except OSError:
        return None
    flushes = int(f[15]) if len(f) > 15 else 0
    return int(f[4]), int(f[6]) * 512, flushes


def flush_load(load_exe, seconds):
    return json.loads(sh([load_exe, "--socket", SOCK, "--rw", "randwrite", "--bs", "4096",
                          "--iodepth", str(IODEPTH), "--flush-every", str(FLUSH_EVERY),
                          "--runtime", str(seconds), "--ramp", "0"]))


def flush_syscalls(setup, load_exe):
    """What one NBD FLUSH costs each server in system calls: strace counts fsync/fdatasync
    (and hole punches) during a short flush-every-32 run. A server that syncs nothing on
    FLUSH is not offering the same durability, whatever its IOPS. A second, untraced run
    counts what the block device under WORK_DIR wrote meanwhile."""
    srv = start(setup)
    trace = WORK_DIR / f"{setup.name}.flush-strace"
    remove(trace)
    tracer = subprocess.Popen(["strace", "-f", "-c", "-o", str(trace), "-e",
                               "trace=fsync,fdatasync,sync_file_range,fallocate",
                               "-p", str(srv.proc.pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = flush_load(load_exe, 2)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait()
        srv.stop()
        if setup.image:
            remove(setup.image)
    counts = {}
    for line in trace.read_text().splitlines():
        f = line.split()
        if len(f) >= 5 and f[-1] in ("fsync", "fdatasync", "sync_file_range", "fallocate"):
            counts[f[-1]] = int(f[3])
    flushes = max(out["flushes"], 1)
    res = {"flushes": out["flushes"], "counts": counts,
           "syncs_per_flush": (counts.get("fsync", 0) + counts.get("fdatasync", 0)) / flushes}
    settle()
    srv = start(setup)
    try:
        before = device_writes()
        out = flush_load(load_exe, RUNTIME)
        after = device_writes()
    finally:
        srv.stop()
        if setup.image:
            remove(setup.image)
    if before and after:
        # What the device had to write per byte the client wrote: data plus whatever the
        # server and the file system add (journal, extent tree, bitmaps) to make it durable.
        # Other tenants of the disk add noise; the ratio between servers is what matters.
        res["device_bytes_per_byte"] = (after[1] - before[1]) / max(out["ops"] * 4096, 1)
        res["device_flushes_per_flush"] = (after[2] - before[2]) / max(out["flushes"], 1)
    return res


def main():
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    make_random_file(BASE, SIZE)
    load_exe = cargo_bench_exe("nbd_load")
    setups = servers()
    wanted = os.environ.get("WORKLOADS")
    workloads = [w for w in WORKLOADS if not wanted or w in wanted.split(",")]
    log(f"servers {[s.name for s in setups]}, workloads {workloads}, reps {REPS}, "
        f"runtime {RUNTIME}s + ramp {RAMP}s")
    raw = {s.name: {w: [] for w in workloads} for s in setups}
    mem = {s.name: [] for s in setups}
    cpu = {s.name: {w: [] for w in workloads} for s in setups}
    for rep in range(REPS):
        for wl in workloads:
            # Round robin over servers inside each repetition, rotating the start so no
            # server always runs first after the page cache was churned.
            order = setups[rep % len(setups):] + setups[:rep % len(setups)]
            for s in order:
                srv = start(s)
                try:
                    res = run_workload(wl, load_exe)
                    st = srv.status()
                finally:
                    code = srv.stop()
                if code != 0:
                    raise RuntimeError(f"{s.name} exited {code} on SIGTERM after {wl}")
                res["peak_rss"] = st["peak_rss"]
                res["cpu_seconds"] = st["cpu_seconds"]
                raw[s.name][wl].append(res)
                mem[s.name].append(st["peak_rss"])
                cpu[s.name][wl].append(st["cpu_seconds"])
                log(f"rep {rep + 1}/{REPS} {wl:22} {s.name:11} "
                    f"{res['iops']:10.0f} IOPS {res['bw'] / GIB:6.2f} GiB/s "
                    f"rss {st['peak_rss'] / MIB:6.1f} MiB")
                if s.image:
                    remove(s.image)
                settle()
    wa = {}
    if os.environ.get("SKIP_WA", "0") in ("", "0"):
        for s in setups:
            r = write_amplification(s)
            if r:
                wa[s.name] = r
                log(f"write amplification {s.name}: {r['grown'] / MIB:.1f} MiB grown for "
                    f"{r['written'] / MIB:.1f} MiB written = {r['ratio']:.3f}")
            if s.image:
                remove(s.image)
            settle()
    flush_costs = {}
    if "randwrite-4k-flush32" in workloads and shutil.which("strace"):
        for s in setups:
            flush_costs[s.name] = flush_syscalls(s, load_exe)
            log(f"flush syscalls {s.name}: {flush_costs[s.name]}")
            settle()
    summary = {}
    for s in setups:
        summary[s.name] = {"label": s.label, "peak_rss_max": max(mem[s.name]) if mem[s.name] else None}
        for wl in workloads:
            runs = raw[s.name][wl]
            summary[s.name][wl] = {
                "iops": median([r["iops"] for r in runs]),
                "bw": median([r["bw"] for r in runs]),
                "runs": len(runs),
            }
    save_json("nbd.json", {
        "machine": machine(),
        "versions": {
            "fio": tool_version(["fio", "--version"]),
            "qemu-nbd": tool_version(["qemu-nbd", "--version"]),
            "nbdkit": tool_version(["nbdkit", "--version"]),
            "cowimg": tool_version([str(COWIMG), "--version"]),
        },
        "params": {"reps": REPS, "runtime": RUNTIME, "ramp": RAMP, "size": SIZE,
                   "iodepth": IODEPTH, "flush_every": FLUSH_EVERY, "wa_bytes": WA_BYTES,
                   "quick": QUICK},
        "workloads": {w: WORKLOADS[w] for w in workloads},
        "servers": [s.name for s in setups],
        "summary": summary,
        "runs": raw,
        "write_amplification": wa,
        "flush_syscalls": flush_costs,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    })


if __name__ == "__main__":
    main()
