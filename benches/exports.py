#!/usr/bin/env python3
"""Per-export cost: memory and open time of many exports in one `cowimg serve`, against
one qemu-nbd per overlay and one qemu-storage-daemon serving the same overlays.

For each N in COUNTS, N empty overlays of one sparse raw base are made (cowimg overlays for
cowimg, qcow2 overlays for qemu; each made once and copied), then each server setup:

- starts, and the time until it accepts connections is its *open time* (all N exports
  opened; for qemu-nbd, N processes started at once, until the last one accepts);
- *idle*: RSS and PSS (from /proc/PID/smaps_rollup, summed over processes) one second
  after it is ready;
- *busy* (for N in BUSY_COUNTS): one fio with N jobs writes BUSY_MIB of 4 KiB random
  writes to every export at once (iodepth 4, an fsync at the end), then RSS and PSS again,
  and the peak RSS (VmHWM). The writes cover the first BUSY_MIB of each disk once each
  ("dense"): spread over the whole disk, every qcow2 overlay would allocate a 64 KiB
  cluster per 4 KiB write (1 GiB per export; 100 of them filled this machine's disk).
- *scattered* (cowimg only, which allocates only what is written): the same number of
  writes at random blocks of the whole disk (most in clusters of their own), the worst
  case for its map.

Every server setup gets fresh overlays, removed afterwards.

PSS divides shared pages (the binary, libraries) between the processes sharing them, so
it is the fair figure for N qemu-nbd processes; RSS counts them once per process. The
idle cost of one export is (idle(N) - idle(1)) / (N - 1).

qemu-storage-daemon opens the base once as a raw node that every qcow2 overlay names as
its backing node (its best configuration for this case); each qemu-nbd opens its own.

Knobs: COUNTS (1,10,100,1000), BUSY_COUNTS (1,10,100), BUSY_MIB (64), SIZE_MIB (1024,
the virtual size), QEMU_NBD_MAX (100: N qemu-nbd processes beyond it are not started),
SERVERS (cowimg,cowimg-v2,qemu-nbd,qsd; cowimg-v2 serves format-version-2 overlays).
QUICK=1: COUNTS 1,10,100, BUSY_COUNTS 1,10, BUSY_MIB 8.
Writes exports.json into the run's results directory; report.py renders it.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

from benchlib import (
    COWIMG, MIB, QUICK, WORK_DIR, Server, log, machine, remove, save_json, sh, tool_version,
)


def env_list(name, default, quick):
    v = os.environ.get(name)
    if v:
        return [x.strip() for x in v.split(",") if x.strip()]
    return quick if QUICK else default


COUNTS = [int(x) for x in env_list("COUNTS", ["1", "10", "100", "1000"], ["1", "10", "100"])]
BUSY_COUNTS = {int(x) for x in env_list("BUSY_COUNTS", ["1", "10", "100"], ["1", "10"])}
BUSY_MIB = int(os.environ.get("BUSY_MIB") or (8 if QUICK else 64))
SIZE_MIB = int(os.environ.get("SIZE_MIB") or 1024)
QEMU_NBD_MAX = int(os.environ.get("QEMU_NBD_MAX") or 100)
SERVERS = env_list("SERVERS", ["cowimg", "cowimg-v2", "qemu-nbd", "qsd"],
                   ["cowimg", "cowimg-v2", "qemu-nbd", "qsd"])

ROOT = WORK_DIR / "exports"


def memory(pids):
    """Summed VmRSS, Pss and VmHWM of `pids`, in bytes."""
    rss = pss = hwm = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm += int(line.split()[1]) * 1024
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss += int(line.split()[1]) * 1024
    return {"rss": rss, "pss": pss, "hwm": hwm}


def make_images(n):
    """N cowimg and N qcow2 overlays of one sparse base, in a fresh directory."""
    d = ROOT / f"n{n}"
    needed = n * BUSY_MIB * MIB * 2 if n in BUSY_COUNTS else 0
    free = shutil.disk_usage(ROOT).free
    if free < needed + 4 * 1024 * MIB:
        raise SystemExit(f"{ROOT}: {free >> 20} MiB free, {needed >> 20} MiB needed and 4 GiB spare")
    shutil.rmtree(d, ignore_errors=True)
    (d / "cow").mkdir(parents=True)
    (d / "cow2").mkdir()
    (d / "qcow2").mkdir()
    base = ROOT / "base.raw"
    if not base.exists() or base.stat().st_size != SIZE_MIB * MIB:
        with open(base, "wb") as f:
            f.truncate(SIZE_MIB * MIB)
    template_cow = ROOT / "template.cow"
    template_qcow2 = ROOT / "template.qcow2"
    template_cow2 = ROOT / "template-v2.cow"
    remove(template_cow, template_qcow2, template_cow2)
    sh([COWIMG, "create", "-b", base, "-F", "raw", template_cow])
    sh([COWIMG, "create", "--format-version", "2", "-b", base, "-F", "raw", template_cow2])
    sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", template_qcow2])
    for i in range(n):
        shutil.copyfile(template_cow, d / "cow" / f"vm{i}.cow")
        shutil.copyfile(template_cow2, d / "cow2" / f"vm{i}.cow")
        shutil.copyfile(template_qcow2, d / "qcow2" / f"vm{i}.qcow2")
    return d, base


class Setup:
    """One way of serving N exports: processes, and the NBD URI of export i."""

    def __init__(self, kind, n, d, base):
        self.kind, self.n, self.d, self.base = kind, n, d, base
        self.servers = []

    def start(self):
        start = time.monotonic()
        if self.kind in ("cowimg", "cowimg-v2"):
            sock = self.d / "cowimg.sock"
            images = self.d / ("cow2" if self.kind == "cowimg-v2" else "cow")
            self.servers.append(Server(self.kind, [
                COWIMG, "serve", "--socket", sock, "--dir", images,
                "--max-connections", str(max(16, self.n + 8)), "--threads", "4"], sock))
            self.uris = [f"nbd+unix:///vm{i}?socket={sock}" for i in range(self.n)]
        elif self.kind == "qemu-nbd":
            # Started all at once; each waits for its own socket afterwards.
            pending = []
            for i in range(self.n):
                sock = self.d / f"qemu-nbd-{i}.sock"
                remove(sock)
                cmd = ["qemu-nbd", "-t", "-k", sock, "-f", "qcow2", "--cache=writeback",
                       "--aio=threads", self.d / "qcow2" / f"vm{i}.qcow2"]
                pending.append((f"qemu-nbd-{i}", cmd, sock))
            self.servers = [LateServer(name, cmd, sock) for name, cmd, sock in pending]
            for s in self.servers:
                s.wait()
            self.uris = [f"nbd+unix:///?socket={s.sock}" for s in self.servers]
        else:
            sock = self.d / "qsd.sock"
            cmd = ["qemu-storage-daemon",
                   "--blockdev", f"driver=file,node-name=basefile,filename={self.base},read-only=on",
                   "--blockdev", "driver=raw,node-name=base,file=basefile,read-only=on"]
            for i in range(self.n):
                f = self.d / "qcow2" / f"vm{i}.qcow2"
                cmd += ["--blockdev", f"driver=file,node-name=f{i},filename={f}",
                        "--blockdev", f"driver=qcow2,node-name=q{i},file=f{i},backing=base"]
            # Options run in order: the server listens (and counts as open) only once every
            # node is open; exports need the server, so they come after it.
            cmd += ["--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=0"]
            cmd += [f"--export=type=nbd,id=e{i},node-name=q{i},name=vm{i},writable=on"
                    for i in range(self.n)]
            self.servers.append(Server("qsd", cmd, sock))
            self.uris = [f"nbd+unix:///vm{i}?socket={sock}" for i in range(self.n)]
        self.open_seconds = time.monotonic() - start

    def pids(self):
        return [s.proc.pid for s in self.servers]

    def stop(self):
        for s in self.servers:
            s.stop()


class LateServer(Server):
    """A Server whose readiness is waited for separately, so that many start at once."""

    def __init__(self, name, cmd, sock):
        self._defer = True
        super().__init__(name, cmd, sock)

    def _wait_ready(self, timeout=30):
        if getattr(self, "_defer", False):
            self._defer = False
            return
        super()._wait_ready(timeout)

    def wait(self):
        super()._wait_ready(120)


def busy(setup, scattered=False):
    """BUSY_MIB of 4 KiB random writes to every export at once, from one fio: each block
    of the first BUSY_MIB once, or (scattered) as many blocks anywhere on the disk."""
    job = ROOT / "busy.fio"
    lines = ["[global]", "ioengine=nbd", "bs=4k", "iodepth=4", "end_fsync=1",
             "randrepeat=0", "thread=1"]
    if scattered:
        lines += ["rw=randwrite", f"size={SIZE_MIB}M", f"io_size={BUSY_MIB}M"]
    else:
        lines += ["rw=randwrite", f"size={BUSY_MIB}M"]
    lines.append("")
    for i, uri in enumerate(setup.uris):
        lines += [f"[e{i}]", f"uri={uri}", ""]
    job.write_text("\n".join(lines))
    start = time.monotonic()
    r = subprocess.run(["fio", "--output-format=terse", str(job)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"fio failed: {r.stderr.strip()[-1500:]}")
    return time.monotonic() - start


def main():
    if not COWIMG.exists():
        raise SystemExit(f"{COWIMG} is missing: cargo build --release (or set COWIMG)")
    ROOT.mkdir(parents=True, exist_ok=True)
    results = []
    for n in COUNTS:
        for kind in SERVERS:
            if kind == "qemu-nbd" and n > QEMU_NBD_MAX:
                log(f"{kind} x{n}: skipped (QEMU_NBD_MAX={QEMU_NBD_MAX})")
                continue
            d, base = make_images(n)
            os.sync()
            setup = Setup(kind, n, d, base)
            setup.start()
            time.sleep(1)
            row = {"server": kind, "exports": n, "open_seconds": setup.open_seconds,
                   "idle": memory(setup.pids())}
            log(f"{kind} x{n}: open {setup.open_seconds:.2f} s, idle RSS "
                f"{row['idle']['rss'] / MIB:.1f} MiB, PSS {row['idle']['pss'] / MIB:.1f} MiB")
            if n in BUSY_COUNTS:
                row["busy_seconds"] = busy(setup)
                row["busy"] = memory(setup.pids())
                log(f"{kind} x{n}: busy {row['busy_seconds']:.1f} s, RSS "
                    f"{row['busy']['rss'] / MIB:.1f} MiB, PSS {row['busy']['pss'] / MIB:.1f} MiB, "
                    f"peak {row['busy']['hwm'] / MIB:.1f} MiB")
            setup.stop()
            results.append(row)
            shutil.rmtree(d, ignore_errors=True)
            if kind in ("cowimg", "cowimg-v2") and n in BUSY_COUNTS:
                d, base = make_images(n)
                setup = Setup(kind, n, d, base)
                setup.start()
                seconds = busy(setup, scattered=True)
                m = memory(setup.pids())
                log(f"{kind} x{n} scattered: {seconds:.1f} s, RSS {m['rss'] / MIB:.1f} MiB, "
                    f"peak {m['hwm'] / MIB:.1f} MiB")
                setup.stop()
                results.append({"server": f"{kind}, scattered", "exports": n,
                                "open_seconds": setup.open_seconds, "idle": row["idle"],
                                "busy_seconds": seconds, "busy": m})
                shutil.rmtree(d, ignore_errors=True)
    save_json("exports.json", {
        "machine": machine(),
        "versions": {"cowimg": tool_version([COWIMG, "--version"]),
                     "qemu-nbd": tool_version(["qemu-nbd", "--version"]),
                     "fio": tool_version(["fio", "--version"])},
        "knobs": {"counts": COUNTS, "busy_counts": sorted(BUSY_COUNTS), "busy_mib": BUSY_MIB,
                  "size_mib": SIZE_MIB, "qemu_nbd_max": QEMU_NBD_MAX},
        "results": results,
    })


if __name__ == "__main__":
    main()
