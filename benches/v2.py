#!/usr/bin/python3
"""Format version 2 against version 1 and qcow2, side by side in one run: the targets of
issue 13 (format-spec/FORMAT-v2.md, "Why it meets its targets").

Run with /usr/bin/python3 (it needs python3-libnbd). Peers:

  v2     cowimg serve on a version-2 image (default page cache, 32 MiB)
  v1     cowimg serve on a version-1 image (64 KiB clusters)
  qcow2  qemu-nbd -t -e 4 (as benches/nbd.py) with --image-opts ...,l2-cache-size=32M
  raw    nbdkit file on a raw copy (the limit; dense placement only)

Sections (SECTIONS=open,reads,flush,dense,space,depth; all by default):

  open   1 TiB images with one 4 KiB block written at the start of each of N 64 KiB clusters
         (N in OPEN_CLUSTERS, default 1000,1000000,4000000), scattered: cluster i is
         i * 0x9e3779b97f4a7c15 mod 2^24. cowimg images are written with the library
         (benches/scale.rs populate); the qcow2 image is laid out by this script in the
         qcow2 v3 format, as qemu would allocate it (metadata, then one host cluster per
         data cluster in write order) except that each host cluster holds only the 4 KiB
         written and a hole, where qemu would allocate the other 60 KiB as unwritten extents:
         that keeps 4M clusters at 16 GiB of disk instead of 256 GiB; `qemu-img check`
         passes on it. Measured, alternating the formats for OPEN_REPS repetitions: serve
         start (process spawn) to the first NBD reply (a 4 KiB read of a written block,
         through libnbd), `cowimg info` / `qemu-img info` wall time and peak RSS; the server's
         VmRSS/VmHWM right after that reply and after RSS_SECONDS of random 4 KiB reads of
         written blocks (depth 16). The largest N is measured one format at a time (each image
         is 16 GiB), made and deleted in turn, OPEN_REPS_ALONE times; then, for v2 and v1, the
         flush section runs on it.
  reads  random 4 KiB reads (fio, iodepth 16, --ba=64k: every read is a written block) over a
         64 GiB disk with all of its 1M clusters written the same way (READS_CLUSTERS), equal
         caches (32 MiB); REPS repetitions alternating v2, qcow2, v1.
  flush  FLUSH latency: fio --fsync=32 (iodepth 1, so fio sends exactly one FLUSH per 32
         writes; see benches/nbd_load.rs on fio 3.33 at higher depths), 4 KiB random writes
         over the whole 1 TiB disk for FLUSH_RUNTIME seconds; percentiles of fio's sync
         latency, on a fresh image with 1k clusters and on the largest one of `open`,
         alternating, FLUSH_REPS repetitions.
  dense  4 KiB random writes with a FLUSH every 32 (benches/nbd_load.rs, iodepth 16) on a
         fresh overlay of benches/nbd.py's 1 GiB random backing file, as in nbd.py, for v2,
         v1, qcow2 and raw, with each server's /proc/PID/io write_bytes; then the write
         amplification of WA_MIB of distinct 4 KiB blocks written with fio --fsync=32
         (allocated growth and write_bytes, each per byte written); then nbd.py's other
         workloads (OTHER_WORKLOADS) for v2 and v1, to compare the versions.
  space  a SPACE_MIB (default 512) MiB disk, no backing, overwritten SPACE_PASSES (5) times
         by a libnbd client: 4 KiB writes at random blocks, one operation in five a TRIM of
         a random aligned 64 KiB, a FLUSH every SPACE_FLUSH_EVERY (256) operations, depth 16,
         for at most SPACE_MAX_SECONDS (300) per format (qemu-nbd gets --discard=unmap so
         TRIMs free space). Issue 13 asks for 16 GiB: at the 2-7k operations per second these
         servers reach with this mix on the 2-core machine, five passes over 16 GiB would take
         hours. Then: data a reader sees (the client's own record of live blocks, and NBD
         block status), the file's allocated bytes and apparent size after the server
         stopped, and `cowimg check` for cowimg.
  depth  a chain of 16 layers over a DEPTH_MIB disk (1024), layer i writing every other 4 KiB
         block of the i-th sixteenth, against one layer holding the same blocks; fio
         random 4 KiB reads over the whole disk (half fall through every layer), v2 and v1.

Knobs: REPS, RUNTIME, RAMP, OPEN_REPS, OPEN_REPS_ALONE (3), ALONE_ABOVE (1500000),
RSS_SECONDS, OPEN_CLUSTERS, READS_CLUSTERS, FLUSH_RUNTIME, FLUSH_REPS, WA_MIB,
OTHER_WORKLOADS (comma list or "none"), SPACE_MIB, SPACE_PASSES, SPACE_FLUSH_EVERY,
SPACE_MAX_SECONDS, DEPTH_MIB, SECTIONS, QUICK=1 (small sizes, short runs). COWIMG names the
cowimg binary; CARGO_TARGET_DIR is honoured for the helpers. A full run takes about an hour
on the 2-core machine (most of it making and deleting the 16 GiB images of 4M clusters).
"""

import importlib.util
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from benchlib import (  # noqa: E402
    COWIMG, GIB, MIB, QUICK, WORK_DIR, Server, allocated_bytes, cargo_bench_exe, env_int,
    fio, log, machine, make_random_file, median, remove, save_json, settle, sh, timed,
    tool_version,
)

# benches/nbd.py would shadow libnbd's module.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
import nbd  # noqa: E402

_spec = importlib.util.spec_from_file_location("nbdbench", os.path.join(HERE, "nbd.py"))
nbdbench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nbdbench)

TIB = 1 << 40
CLUSTER = 64 * 1024
BLOCK = 4096
STRIDE = 0x9E3779B97F4A7C15
REPS = env_int("REPS", 3, 1)
RUNTIME = env_int("RUNTIME", 8, 3)
RAMP = env_int("RAMP", 2, 1)
OPEN_REPS = env_int("OPEN_REPS", 5, 2)
OPEN_REPS_ALONE = env_int("OPEN_REPS_ALONE", 3, 1)
RSS_SECONDS = env_int("RSS_SECONDS", 6, 3)
ALONE_ABOVE = env_int("ALONE_ABOVE", 1_500_000)
OPEN_CLUSTERS = [int(x) for x in (os.environ.get("OPEN_CLUSTERS") or
                                  ("1000,100000" if QUICK else "1000,1000000,4000000")).split(",")]
READS_CLUSTERS = env_int("READS_CLUSTERS", 1 << 20, 1 << 17)
FLUSH_RUNTIME = env_int("FLUSH_RUNTIME", 20, 5)
FLUSH_REPS = env_int("FLUSH_REPS", 2, 1)
WA_BYTES = env_int("WA_MIB", 128, 64) * MIB
SPACE_BYTES = env_int("SPACE_MIB", 512, 128) * MIB
SPACE_PASSES = env_int("SPACE_PASSES", 5)
SPACE_FLUSH_EVERY = env_int("SPACE_FLUSH_EVERY", 256)
SPACE_MAX_SECONDS = env_int("SPACE_MAX_SECONDS", 300, 120)
DEPTH_BYTES = env_int("DEPTH_MIB", 1024, 256) * MIB
DEPTH_LAYERS = 16
OTHER = os.environ.get("OTHER_WORKLOADS",
                       "randwrite-4k,randread-4k,seqwrite-1m,seqread-1m")
OTHER = [] if OTHER in ("", "none") else OTHER.split(",")
SECTIONS = (os.environ.get("SECTIONS") or "open,reads,flush,dense,space,depth").split(",")
SOCK = WORK_DIR / "v2.sock"
URI = f"nbd+unix:///?socket={SOCK}"
FORMATS = ["v2", "v1", "qcow2"]
LABELS = {"v2": "cowimg v2", "v1": "cowimg v1", "qcow2": "qcow2 (qemu-nbd)",
          "raw": "raw (nbdkit file)"}
SCALE = None  # the scale helper's executable, built in main()


# ---------------------------------------------------------------- images


def image_path(fmt, tag):
    return WORK_DIR / f"v2b-{tag}.{'qcow2' if fmt == 'qcow2' else fmt + '.cow'}"


def cluster_of(i, total):
    return (i * STRIDE) & (total - 1)


def make_qcow2(path, size, clusters):
    """A qcow2 v3 image (64 KiB clusters, no backing) with 4 KiB of 0xa5 at the start of
    each of `clusters` virtual clusters chosen as scale.rs populate chooses them. Layout:
    header, refcount table, L1, refcount blocks, the L2 tables in use, then one host
    cluster per data cluster in write order, of which only the first 4 KiB is written."""
    total = size // CLUSTER
    assert total & (total - 1) == 0 and clusters <= total
    l2_entries = CLUSTER // 8
    l1_size = -(-total // l2_entries)
    l1_clusters = -(-(l1_size * 8) // CLUSTER)
    order = [cluster_of(i, total) for i in range(clusters)]
    tables = sorted({c // l2_entries for c in order})
    fixed = 1 + l1_clusters + len(tables) + clusters
    rt = rb = 1
    while True:
        hosts = fixed + rt + rb
        rb2 = -(-hosts // (CLUSTER // 2))
        rt2 = -(-(rb2 * 8) // CLUSTER)
        if (rb2, rt2) == (rb, rt):
            break
        rb, rt = rb2, rt2
    rt_off = 1 * CLUSTER
    l1_off = (1 + rt) * CLUSTER
    rb_first = 1 + rt + l1_clusters
    l2_first = rb_first + rb
    data_first = l2_first + len(tables)
    copied = 1 << 63
    remove(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        hdr = struct.pack(">4sIQIIQIIQQIIQQQQII", b"QFI\xfb", 3, 0, 0, 16, size, 0, l1_size,
                          l1_off, rt_off, rt, 0, 0, 0, 0, 0, 4, 104)
        os.pwrite(fd, hdr, 0)
        os.pwrite(fd, b"".join(struct.pack(">Q", (rb_first + k) * CLUSTER) for k in range(rb)),
                  rt_off)
        slot = {t: k for k, t in enumerate(tables)}
        l1 = bytearray(l1_size * 8)
        for t, k in slot.items():
            struct.pack_into(">Q", l1, t * 8, (l2_first + k) * CLUSTER | copied)
        os.pwrite(fd, bytes(l1), l1_off)
        refs = b"\x00\x01" * hosts
        os.pwrite(fd, refs, rb_first * CLUSTER)
        l2 = {t: bytearray(CLUSTER) for t in tables}
        for j, c in enumerate(order):
            struct.pack_into(">Q", l2[c // l2_entries], (c % l2_entries) * 8,
                             (data_first + j) * CLUSTER | copied)
        for t, buf in l2.items():
            os.pwrite(fd, bytes(buf), (l2_first + slot[t]) * CLUSTER)
        del l2
        block = b"\xa5" * BLOCK
        for j in range(clusters):
            os.pwrite(fd, block, (data_first + j) * CLUSTER)
        os.ftruncate(fd, hosts * CLUSTER)
    finally:
        os.close(fd)


def make_image(fmt, path, size, clusters):
    """Makes `path` (v2, v1 or qcow2) with `clusters` scattered 4 KiB writes; seconds taken."""
    remove(path)
    t = time.monotonic()
    if fmt == "qcow2":
        make_qcow2(path, size, clusters)
    else:
        sh([SCALE, "populate", path, str(size), str(clusters), fmt[1]])
    secs = time.monotonic() - t
    settle()
    return secs


class Remover:
    """Deletes files in the background (on ext4 mounted with discard, a file of a million
    scattered extents takes minutes to unlink); wait() before the next measurement."""

    def __init__(self):
        self.procs = []

    def start(self, *paths):
        paths = [str(p) for p in paths if os.path.exists(p)]
        if paths:
            self.procs.append(subprocess.Popen(["rm", "-f", *paths]))

    def wait(self):
        for p in self.procs:
            p.wait()
        self.procs = []


REMOVER = Remover()


# ---------------------------------------------------------------- servers


def server_cmd(fmt, path, discard=False):
    if fmt == "qcow2":
        cmd = ["qemu-nbd", "-t", "-e", "4", "--socket", SOCK, "--image-opts",
               f"driver=qcow2,file.filename={path},l2-cache-size=32M"]
        if discard:
            cmd[1:1] = ["--discard=unmap"]
        return cmd
    if fmt == "raw":
        return ["nbdkit", "-f", "--unix", SOCK, "file", path]
    return [COWIMG, "serve", "--socket", SOCK, path]


def proc_status(pid):
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k = line.split(":", 1)[0]
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(line.split()[1]) * 1024
    return out


def proc_write_bytes(pid):
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return None


def stop(proc, timeout=300):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{proc.args[0]} ignored SIGTERM for {timeout}s")
    remove(SOCK)
    if proc.returncode != 0:
        raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}")


def first_reply(cmd, offset):
    """Spawns the server; seconds from spawn to the reply of a 4 KiB read at `offset`
    (the first connection that succeeds, polled every millisecond). Returns (seconds,
    process, connected libnbd handle)."""
    remove(SOCK)
    err = open(WORK_DIR / "v2-server.stderr", "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=err)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: "
                               f"{(WORK_DIR / 'v2-server.stderr').read_text()[-1500:]}")
        if os.path.exists(SOCK):
            h = nbd.NBD()
            try:
                h.connect_unix(str(SOCK))
                break
            except nbd.Error:
                pass
        if time.monotonic() - t0 > 300:
            proc.kill()
            raise RuntimeError(f"{cmd[0]} did not answer in 300 s")
        time.sleep(0.001)
    h.pread(BLOCK, offset)
    return time.monotonic() - t0, proc, h


def read_written(h, total, clusters, seconds, depth=16):
    """Random 4 KiB reads of written blocks (cluster i at i * STRIDE mod total) for
    `seconds`; returns reads per second."""
    rng = random.Random(13)
    bufs = [nbd.Buffer(BLOCK) for _ in range(depth)]
    free = list(range(depth))
    done = [0]

    def completed(slot, err):
        done[0] += 1
        free.append(slot)
        return 0

    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        while free:
            slot = free.pop()
            off = cluster_of(rng.randrange(clusters), total) * CLUSTER
            h.aio_pread(bufs[slot], off, completion=lambda err, slot=slot: completed(slot, err))
        h.poll(-1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    return done[0] / (time.monotonic() - start)


def info_cmd(fmt, path):
    return ["qemu-img", "info", path] if fmt == "qcow2" else [COWIMG, "info", path]


# ---------------------------------------------------------------- open, RSS


def measure_open(fmt, path, clusters):
    total = TIB // CLUSTER
    offset = cluster_of(1 % clusters, total) * CLUSTER
    secs, proc, h = first_reply(server_cmd(fmt, path), offset)
    try:
        after_open = proc_status(proc.pid)
        rps = read_written(h, total, clusters, RSS_SECONDS)
        after_reads = proc_status(proc.pid)
        h.shutdown()
    finally:
        stop(proc)
    info_s, info_rss = timed(info_cmd(fmt, path))
    return {"first_reply_s": secs, "info_s": info_s, "info_peak_rss": info_rss,
            "rss_open": after_open["VmRSS"], "hwm_open": after_open["VmHWM"],
            "rss_reads": after_reads["VmRSS"], "hwm_reads": after_reads["VmHWM"],
            "reads_per_s": rps}


def summarize_open(runs):
    keys = runs[0].keys()
    s = {k: median([r[k] for r in runs]) for k in keys}
    s["first_reply_s_min"] = min(r["first_reply_s"] for r in runs)
    s["first_reply_s_max"] = max(r["first_reply_s"] for r in runs)
    s["hwm_reads_max"] = max(r["hwm_reads"] for r in runs)
    s["runs"] = len(runs)
    return s


def log_open(n, rep, f, r):
    log(f"open {n:,} rep {rep + 1} {f:5} first reply {r['first_reply_s'] * 1e3:8.1f} ms"
        f" info {r['info_s'] * 1e3:7.1f} ms rss {r['rss_open'] / MIB:6.1f} -> "
        f"{r['rss_reads'] / MIB:6.1f} MiB")


def make_open_image(f, path, n, res):
    log(f"open: making {f} with {n:,} clusters")
    res["make_s"] = make_image(f, path, TIB, n)
    res["file_size"] = os.stat(path).st_size
    res["file_allocated"] = allocated_bytes(path)
    if f != "qcow2":
        # What an open replays: the journal's records since the last checkpoint or tree.
        data = json.loads(sh([COWIMG, "info", "--json", path]))["format-specific"]["data"]
        res["journal_used"] = data.get("journal-used")
        res["journal_capacity"] = data.get("journal-capacity")
        res["generation"] = data.get("generation")


def section_open(flush_after):
    """Per cluster count: all formats at once, alternating, up to ALONE_ABOVE clusters;
    beyond, one format at a time (made, measured, deleted). The flush section runs on the
    largest count's v2 and v1 images."""
    out = {}
    largest = max(OPEN_CLUSTERS)
    for n in sorted(OPEN_CLUSTERS):
        imgs = {f: image_path(f, f"open-{n}") for f in FORMATS}
        res = {f: {} for f in FORMATS}
        flush_here = flush_after is not None and n == largest
        if n <= ALONE_ABOVE:
            for f in FORMATS:
                make_open_image(f, imgs[f], n, res[f])
            REMOVER.wait()
            runs = {f: [] for f in FORMATS}
            for rep in range(OPEN_REPS):
                for f in FORMATS[rep % 3:] + FORMATS[:rep % 3]:
                    runs[f].append(measure_open(f, imgs[f], n))
                    log_open(n, rep, f, runs[f][-1])
            for f in FORMATS:
                res[f].update(summarize_open(runs[f]))
            if flush_here:
                for f in ("v2", "v1"):
                    flush_after[f] = section_flush_on(f, imgs[f], n)
            REMOVER.start(*imgs.values())
        else:
            for f in FORMATS:
                make_open_image(f, imgs[f], n, res[f])
                REMOVER.wait()
                runs = []
                for rep in range(OPEN_REPS_ALONE):
                    runs.append(measure_open(f, imgs[f], n))
                    log_open(n, rep, f, runs[-1])
                res[f].update(summarize_open(runs))
                res[f]["alone"] = True
                if flush_here and f != "qcow2":
                    flush_after[f] = section_flush_on(f, imgs[f], n)
                REMOVER.start(imgs[f])
        out[str(n)] = res
    REMOVER.wait()
    return out


# ---------------------------------------------------------------- reads


def section_reads():
    size = READS_CLUSTERS * CLUSTER
    imgs = {f: image_path(f, "reads") for f in FORMATS}
    res = {f: {"runs": []} for f in FORMATS}
    for f in FORMATS:
        log(f"reads: making {f}, {size / GIB:.0f} GiB with all {READS_CLUSTERS:,} clusters written")
        res[f]["make_s"] = make_image(f, imgs[f], size, READS_CLUSTERS)
        res[f]["file_allocated"] = allocated_bytes(imgs[f])
    REMOVER.wait()
    order = ["v2", "qcow2", "v1"]
    for rep in range(REPS):
        for f in order[rep % 3:] + order[:rep % 3]:
            srv = Server(f"v2b-{f}", server_cmd(f, imgs[f]), SOCK)
            try:
                job = fio(URI, ["--rw=randread", "--bs=4k", "--ba=64k", "--iodepth=16",
                                "--time_based", f"--runtime={RUNTIME}", f"--ramp_time={RAMP}",
                                "--norandommap", "--randrepeat=1"])
                st = proc_status(srv.proc.pid)
            finally:
                srv.stop()
            r = {"iops": job["read"]["iops"], "rss": st["VmRSS"], "hwm": st["VmHWM"],
                 "p99_us": job["read"]["clat_ns"]["percentile"]["99.000000"] / 1e3}
            res[f]["runs"].append(r)
            log(f"reads rep {rep + 1} {f:5} {r['iops']:9.0f} IOPS rss {r['rss'] / MIB:6.1f} MiB")
    for f in FORMATS:
        rs = res[f]["runs"]
        res[f].update({"iops": median([r["iops"] for r in rs]),
                       "hwm_max": max(r["hwm"] for r in rs),
                       "p99_us": median([r["p99_us"] for r in rs])})
    REMOVER.start(*imgs.values())
    REMOVER.wait()
    return {"size": size, "clusters": READS_CLUSTERS, "results": res}


# ---------------------------------------------------------------- flush latency


def flush_run(fmt, path):
    srv = Server(f"v2b-{fmt}", server_cmd(fmt, path), SOCK)
    try:
        job = fio(URI, ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=32",
                        "--time_based", f"--runtime={FLUSH_RUNTIME}", "--norandommap",
                        "--randrepeat=1"], timeout=FLUSH_RUNTIME + 600)
        st = proc_status(srv.proc.pid)
    finally:
        srv.stop()
    sync = job["sync"]["lat_ns"]
    pct = sync.get("percentile", {})
    return {"syncs": job["sync"]["total_ios"],
            "p50_ms": pct.get("50.000000", 0) / 1e6, "p99_ms": pct.get("99.000000", 0) / 1e6,
            "p999_ms": pct.get("99.900000", 0) / 1e6, "max_ms": sync["max"] / 1e6,
            "mean_ms": sync["mean"] / 1e6, "write_iops": job["write"]["iops"],
            "hwm": st["VmHWM"]}


def section_flush_on(fmt, big_path, big_n):
    """Alternates fio --fsync=32 runs on a fresh 1k-cluster image and on big_path."""
    small_n = min(OPEN_CLUSTERS)
    small = image_path(fmt, "flush-small")
    res = {"small_clusters": small_n, "big_clusters": big_n, "small": [], "big": []}
    for rep in range(FLUSH_REPS):
        for which in ("small", "big"):
            if which == "small":
                make_image(fmt, small, TIB, small_n)
            path = small if which == "small" else big_path
            r = flush_run(fmt, path)
            res[which].append(r)
            log(f"flush {fmt} {which} ({small_n if which == 'small' else big_n:,} clusters) rep "
                f"{rep + 1}: {r['syncs']} syncs p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} "
                f"p99.9 {r['p999_ms']:.2f} max {r['max_ms']:.1f} ms")
            settle()
    remove(small)
    for which in ("small", "big"):
        rs = res[which]
        res[which + "_median"] = {k: median([r[k] for r in rs]) for k in rs[0]}
    return res


# ---------------------------------------------------------------- dense placement


def dense_setups():
    base = nbdbench.BASE
    mk = {
        "v2": lambda p: sh([COWIMG, "create", "--format-version", "2", "-b", base, "-F", "raw", p]),
        "v1": lambda p: sh([COWIMG, "create", "-b", base, "-F", "raw", p]),
        "qcow2": lambda p: sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw",
                               p]),
        "raw": lambda p: nbdbench.copy_file(base, p),
    }
    return {f: (mk[f], image_path(f, "dense") if f != "raw" else WORK_DIR / "v2b-dense.raw")
            for f in ("v2", "v1", "qcow2", "raw")}


def section_dense(load_exe):
    make_random_file(nbdbench.BASE, nbdbench.SIZE)
    setups = dense_setups()
    names = list(setups)
    flush32 = {f: [] for f in names}
    for rep in range(REPS):
        for f in names[rep % 4:] + names[:rep % 4]:
            mk, path = setups[f]
            remove(path)
            mk(path)
            settle()
            before = allocated_bytes(path)
            srv = Server(f"v2b-{f}", server_cmd(f, path), SOCK)
            try:
                out = json.loads(sh([load_exe, "--socket", SOCK, "--rw", "randwrite", "--bs", "4096",
                                     "--iodepth", "16", "--flush-every", "32",
                                     "--runtime", str(RUNTIME), "--ramp", str(RAMP)]))
                wb = proc_write_bytes(srv.proc.pid)
                st = proc_status(srv.proc.pid)
            finally:
                srv.stop()
            r = {"iops": out["iops"], "ops": out["ops"], "flushes": out["flushes"],
                 "write_bytes": wb, "hwm": st["VmHWM"],
                 "grown": allocated_bytes(path) - before if f != "raw" else None}
            flush32[f].append(r)
            log(f"dense rep {rep + 1} {f:5} {r['iops']:9.0f} IOPS write_bytes "
                f"{(wb or 0) / MIB:7.1f} MiB for {out['ops'] * 4096 / MIB:7.1f} MiB "
                "(includes the ramp)")
            remove(path)
            settle()
    wa = {}
    for f in names:
        mk, path = setups[f]
        remove(path)
        mk(path)
        settle()
        before = allocated_bytes(path)
        srv = Server(f"v2b-{f}", server_cmd(f, path), SOCK)
        try:
            job = fio(URI, ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=32",
                            f"--io_size={WA_BYTES}", "--randrepeat=1"])
            wb = proc_write_bytes(srv.proc.pid)
        finally:
            srv.stop()
        written = job["write"]["io_bytes"]
        grown = allocated_bytes(path) - before
        wa[f] = {"written": written, "grown": grown if f != "raw" else None,
                 "grown_ratio": grown / written if f != "raw" else None,
                 "write_bytes": wb, "write_bytes_ratio": wb / written if wb is not None else None,
                 "iops": job["write"]["iops"]}
        log(f"wa {f}: grew {grown / MIB:.1f} MiB, write_bytes {wb / MIB:.1f} MiB for "
            f"{written / MIB:.1f} MiB")
        remove(path)
        settle()
    other = {f: {w: [] for w in OTHER} for f in ("v2", "v1")}
    for rep in range(REPS):
        for w in OTHER:
            for f in (("v2", "v1") if rep % 2 == 0 else ("v1", "v2")):
                mk, path = setups[f]
                remove(path)
                mk(path)
                settle()
                srv = Server(f"v2b-{f}", server_cmd(f, path), SOCK)
                # nbd.py's run_workload talks to its own socket path.
                nbdbench.SOCK = SOCK
                try:
                    r = nbdbench.run_workload(w, load_exe)
                finally:
                    srv.stop()
                other[f][w].append(r)
                log(f"other rep {rep + 1} {w:14} {f} {r['iops']:9.0f} IOPS {r['bw'] / GIB:.2f} GiB/s")
                remove(path)
                settle()
    summary = {f: {"iops": median([r["iops"] for r in flush32[f]]),
                   "hwm_max": max(r["hwm"] for r in flush32[f])} for f in names}
    other_summary = {f: {w: {"iops": median([r["iops"] for r in other[f][w]]),
                             "bw": median([r["bw"] for r in other[f][w]])} for w in OTHER}
                     for f in other}
    return {"flush32": summary, "flush32_runs": flush32, "wa": wa, "wa_bytes": WA_BYTES,
            "other": other_summary, "other_runs": other,
            "other_labels": {w: nbdbench.WORKLOADS[w]["label"] for w in OTHER},
            "other_units": {w: nbdbench.WORKLOADS[w]["unit"] for w in OTHER}}


# ---------------------------------------------------------------- space under overwrite


def overwrite(h, size, passes, depth=16, flush_every=SPACE_FLUSH_EVERY, trim_every=5):
    blocks = size // BLOCK
    live = bytearray(blocks)
    rng = random.Random(29)
    data = nbd.Buffer.from_bytearray(bytearray(os.urandom(BLOCK)))
    target = passes * size
    written = [0]
    inflight = [0]
    ops = 0
    trims = 0

    def done(err):
        inflight[0] -= 1
        return 0

    start = time.monotonic()
    deadline = start + SPACE_MAX_SECONDS
    while written[0] < target and time.monotonic() < deadline:
        while inflight[0] < depth and written[0] < target:
            ops += 1
            if ops % flush_every == 0:
                h.aio_flush(completion=done)
            elif ops % trim_every == 0:
                b = rng.randrange(blocks // 16) * 16
                h.aio_trim(16 * BLOCK, b * BLOCK, completion=done)
                live[b:b + 16] = bytes(16)
                trims += 1
            else:
                b = rng.randrange(blocks)
                h.aio_pwrite(data, b * BLOCK, completion=done)
                live[b] = 1
                written[0] += BLOCK
            inflight[0] += 1
        h.poll(-1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    h.flush()
    secs = time.monotonic() - start
    return {"seconds": secs, "written": written[0], "trims": trims, "ops": ops,
            "passes_done": written[0] / size, "live_bytes": sum(live) * BLOCK}


def block_status_data(h, size):
    """Bytes NBD block status (base:allocation) reports as data (neither hole nor zero)."""
    data = [0]
    seen = [0]

    def cb(metacontext, offset, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            pos = offset
            for i in range(0, len(entries), 2):
                if not entries[i + 1] & (nbd.STATE_HOLE | nbd.STATE_ZERO):
                    data[0] += entries[i]
                pos += entries[i]
            seen[0] = max(seen[0], pos)
        return 0

    off = 0
    while off < size:
        seen[0] = off
        h.block_status(min(1 << 30, size - off), off, cb)
        if seen[0] <= off:
            raise RuntimeError(f"block status made no progress at {off}")
        off = seen[0]
    return data[0]


def make_empty(fmt, path, size):
    remove(path)
    if fmt == "qcow2":
        sh(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)])
    else:
        sh([COWIMG, "create", "--format-version", fmt[1], "-s", str(size), path])


def section_space():
    res = {}
    for f in FORMATS:
        path = image_path(f, "space")
        make_empty(f, path, SPACE_BYTES)
        settle()
        remove(SOCK)
        srv = Server(f"v2b-{f}", server_cmd(f, path, discard=True), SOCK)
        try:
            h = nbd.NBD()
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            h.connect_unix(str(SOCK))
            r = overwrite(h, SPACE_BYTES, SPACE_PASSES)
            r["bs_data"] = block_status_data(h, SPACE_BYTES)
            h.shutdown()
            st = proc_status(srv.proc.pid)
        finally:
            srv.stop()
        r["hwm"] = st["VmHWM"]
        r["allocated"] = allocated_bytes(path)
        r["apparent"] = os.stat(path).st_size
        r["iops"] = r["ops"] / r["seconds"]
        if f != "qcow2":
            try:
                chk = subprocess.run([COWIMG, "check", "--output=json", path], capture_output=True,
                                     text=True)
                r["check"] = json.loads(chk.stdout) if chk.stdout.strip() else None
                r["check_exit"] = chk.returncode
            except (OSError, ValueError):
                r["check"] = None
        res[f] = r
        log(f"space {f}: {r['seconds']:.0f} s, live {r['live_bytes'] / MIB:.0f} MiB, block status "
            f"data {r['bs_data'] / MIB:.0f} MiB, allocated {r['allocated'] / MIB:.0f} MiB, "
            f"apparent {r['apparent'] / MIB:.0f} MiB")
        REMOVER.start(path)
        REMOVER.wait()
    return {"size": SPACE_BYTES, "passes": SPACE_PASSES, "flush_every": SPACE_FLUSH_EVERY,
            "trim_every": 5, "max_seconds": SPACE_MAX_SECONDS, "results": res}


# ---------------------------------------------------------------- depth


def section_depth():
    part = DEPTH_BYTES // DEPTH_LAYERS // BLOCK
    ranges = [f"{i * part}:{part // 2}:2" for i in range(DEPTH_LAYERS)]
    res = {}
    paths = []
    for v in ("2", "1"):
        chain = []
        below = "-"
        for i in range(DEPTH_LAYERS):
            p = WORK_DIR / f"v2b-chain{v}-{i:02}.cow"
            remove(p)
            sh([SCALE, "layer", p, str(DEPTH_BYTES), below, v, ranges[i]])
            chain.append(p)
            below = str(p)
        single = WORK_DIR / f"v2b-single{v}.cow"
        remove(single)
        sh([SCALE, "layer", single, str(DEPTH_BYTES), "-", v, *ranges])
        paths += chain + [single]
        res[f"v{v}"] = {"chain_top": chain[-1], "single": single, "chain": [], "one": []}
    settle()
    for rep in range(REPS):
        for v in ("v2", "v1"):
            for which in (("chain", "one") if rep % 2 == 0 else ("one", "chain")):
                path = res[v]["chain_top"] if which == "chain" else res[v]["single"]
                srv = Server(f"v2b-{v}", server_cmd(v, path), SOCK)
                try:
                    job = fio(URI, ["--rw=randread", "--bs=4k", "--iodepth=16", "--time_based",
                                    f"--runtime={RUNTIME}", f"--ramp_time={RAMP}",
                                    "--norandommap", "--randrepeat=1"])
                finally:
                    srv.stop()
                res[v][which].append(job["read"]["iops"])
                log(f"depth rep {rep + 1} {v} {which:5} {job['read']['iops']:9.0f} IOPS")
    out = {"size": DEPTH_BYTES, "layers": DEPTH_LAYERS, "blocks_per_layer": part // 2}
    for v in ("v2", "v1"):
        c, o = median(res[v]["chain"]), median(res[v]["one"])
        out[v] = {"chain_iops": c, "single_iops": o, "ratio": c / o,
                  "chain_runs": res[v]["chain"], "single_runs": res[v]["one"]}
    remove(*paths)
    return out


# ---------------------------------------------------------------- main


def main():
    global SCALE
    # One run directory for every save() of this run.
    os.environ.setdefault("BENCH_RUN_ID", time.strftime("%Y%m%d-%H%M%S"))
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    SCALE = cargo_bench_exe("scale")
    load_exe = cargo_bench_exe("nbd_load")
    log(f"sections {SECTIONS}; open clusters {OPEN_CLUSTERS}; reps {REPS}, runtime {RUNTIME}s")
    out = {"machine": machine(),
           "versions": {"fio": tool_version(["fio", "--version"]),
                        "qemu-nbd": tool_version(["qemu-nbd", "--version"]),
                        "nbdkit": tool_version(["nbdkit", "--version"]),
                        "cowimg": tool_version([str(COWIMG), "--version"])},
           "params": {"reps": REPS, "runtime": RUNTIME, "ramp": RAMP, "open_reps": OPEN_REPS,
                      "rss_seconds": RSS_SECONDS, "open_clusters": OPEN_CLUSTERS,
                      "open_size": TIB, "flush_runtime": FLUSH_RUNTIME,
                      "flush_reps": FLUSH_REPS, "quick": QUICK, "sections": SECTIONS,
                      "cache_size": 32 * MIB},
           "labels": LABELS}
    t0 = time.monotonic()
    flush = {} if "flush" in SECTIONS else None

    def save():
        out["elapsed_s"] = time.monotonic() - t0
        save_json("v2.json", out)

    try:
        if "open" in SECTIONS:
            out["open"] = section_open(flush)
            if flush:
                out["flush"] = flush
            save()
        elif flush is not None:
            # The flush section alone: make the large images for it here.
            n = max(OPEN_CLUSTERS)
            for f in ("v2", "v1"):
                p = image_path(f, f"open-{n}")
                make_image(f, p, TIB, n)
                REMOVER.wait()
                flush[f] = section_flush_on(f, p, n)
                REMOVER.start(p)
            REMOVER.wait()
            out["flush"] = flush
            save()
        if "reads" in SECTIONS:
            out["reads"] = section_reads()
            save()
        if "dense" in SECTIONS:
            out["dense"] = section_dense(load_exe)
            save()
        if "space" in SECTIONS:
            out["space"] = section_space()
            save()
        if "depth" in SECTIONS:
            out["depth"] = section_depth()
            save()
    finally:
        REMOVER.wait()
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()


if __name__ == "__main__":
    main()
