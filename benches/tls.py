#!/usr/bin/env python3
"""NBD over TLS: cowimg serve against nbdkit and qemu-nbd, each with --tls=require.

Every server exports the same 1 GiB of random bytes over a Unix socket with TLS required
and the same X.509 certificates (made here with openssl): cowimg an overlay on the raw
file, nbdkit's file plugin and qemu-nbd (-f raw, tls-creds-x509) a copy. The clients use
libnbd with GnuTLS (fio's nbd engine refuses the tls-certificates URI parameter), one
connection with 16 requests in flight: nbdcopy reads the whole disk to null: and writes
it from a file in 1 MiB requests, and benches/nbd_randread.py (python3-libnbd) makes
4 KiB reads at random offsets for RUNTIME seconds. Servers alternate within each
repetition; figures are medians over REPS. Knobs: REPS (3), SIZE_MIB (1024), RUNTIME (6).
Prints a Markdown table and writes RESULTS_DIR/<run id>/tls.json.
"""

import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    COWIMG, MIB, WORK_DIR, Server, copy_file, env_int, log, make_random_file, remove,
    save_json, settle, sh,
)

REPS = env_int("REPS", 3, 1)
SIZE = env_int("SIZE_MIB", 1024) * MIB
RUNTIME = env_int("RUNTIME", 6, 3)
SOURCE = WORK_DIR / "tls-source.raw"
RANDREAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nbd_randread.py")
# No --flush: the figure is the transport's, not the host disk's fdatasync.
NBDCOPY = ["nbdcopy", "--connections=1", "--requests=16", "--request-size=1048576"]
BASE = WORK_DIR / "tls-base.raw"
SOCK = WORK_DIR / "tls.sock"
PKI = WORK_DIR / "pki"
def seqread(uri):
    started = time.monotonic()
    sh(NBDCOPY + [uri, "null:"])
    return SIZE / (time.monotonic() - started) / 2**30


def seqwrite(uri):
    started = time.monotonic()
    sh(NBDCOPY + [SOURCE, uri])
    return SIZE / (time.monotonic() - started) / 2**30


def randread(uri):
    return json.loads(sh(["/usr/bin/python3", RANDREAD, uri, str(RUNTIME)]))["iops"]


WORKLOADS = {"seqread-1m": seqread, "seqwrite-1m": seqwrite, "randread-4k": randread}

SERVER_EXT = ("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
              "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
CLIENT_EXT = ("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
              "extendedKeyUsage=clientAuth\n")


def openssl(*args):
    subprocess.run(["openssl", *args], cwd=PKI, check=True, capture_output=True)


def make_pki():
    """server/ (ca-cert, server-cert, server-key) and client/ (ca-cert, client-cert,
    client-key): the layouts nbdkit, qemu and libnbd read."""
    PKI.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2",
            "-subj", "/CN=bench-ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, cn, ext in [("server", "localhost", SERVER_EXT), ("client", "bench", CLIENT_EXT)]:
        (PKI / f"{name}.ext").write_text(ext)
        openssl("req", *ec, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj",
                f"/CN={cn}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey",
                "ca-key.pem", "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2",
                "-extfile", f"{name}.ext")
    for d, files in [("server", ["ca-cert", "server-cert", "server-key"]),
                     ("client", ["ca-cert", "client-cert", "client-key"])]:
        (PKI / d).mkdir(exist_ok=True)
        for f in files:
            copy_file(PKI / f"{f}.pem", PKI / d / f"{f}.pem")
            os.chmod(PKI / d / f"{f}.pem", 0o600)


def fresh_target(path):
    """For the write workload every server writes into new space: cowimg into a new
    overlay, the others into a new sparse file (a copy of the base would let them
    overwrite cached, allocated blocks while cowimg allocates)."""
    remove(path)
    with open(path, "wb") as f:
        f.truncate(SIZE)


def setups(workload):
    cow = WORK_DIR / "tls-overlay.cow"
    copy = WORK_DIR / "tls-copy.raw"
    server_dir = PKI / "server"
    make_copy = (lambda: fresh_target(copy)) if workload == "seqwrite-1m" else (
        lambda: copy_file(BASE, copy))
    return {
        "cowimg": (lambda: (remove(cow), sh([COWIMG, "create", "-b", BASE, "-F", "raw", cow])),
                   [COWIMG, "serve", "--socket", SOCK, "--tls=require", "--tls-certificates",
                    server_dir, cow]),
        "nbdkit": (make_copy,
                   ["nbdkit", "-f", "--unix", SOCK, "--tls=require",
                    f"--tls-certificates={server_dir}", "file", copy]),
        "qemu-nbd": (make_copy,
                     ["qemu-nbd", "-f", "raw", "-t", "-e", "4", "--socket", SOCK, "--object",
                      f"tls-creds-x509,id=tls0,dir={server_dir},endpoint=server",
                      "--tls-creds", "tls0", copy]),
    }


def main():
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    if not BASE.exists() or BASE.stat().st_size != SIZE:
        make_random_file(BASE, SIZE)
    make_pki()
    if not SOURCE.exists() or SOURCE.stat().st_size != SIZE:
        make_random_file(SOURCE, SIZE)
    uri = f"nbds+unix:///?socket={SOCK}&tls-certificates={PKI / 'client'}"
    results = {w: {s: [] for s in setups(w)} for w in WORKLOADS}
    for rep in range(REPS):
        for w, run in WORKLOADS.items():
            for name, (make, cmd) in setups(w).items():
                make()
                settle()
                server = Server(name, cmd, SOCK, env={"TMPDIR": str(WORK_DIR)})
                try:
                    value = run(uri)
                finally:
                    server.stop()
                results[w][name].append(value)
                log(f"rep {rep + 1}/{REPS} {w:12} {name:9} {value:10.2f}")
    print("\n| workload (TLS) | cowimg | nbdkit | qemu-nbd | cowimg / nbdkit | cowimg / qemu-nbd |")
    print("|---|---|---|---|---|---|")
    medians = {}
    for w in WORKLOADS:
        m = {s: statistics.median(v) for s, v in results[w].items()}
        medians[w] = m
        unit = "IOPS" if w.endswith("4k") else "GiB/s"
        fmt = (lambda v: f"{v:.0f} {unit}") if unit == "IOPS" else (lambda v: f"{v:.2f} {unit}")
        print(f"| {w} | {fmt(m['cowimg'])} | {fmt(m['nbdkit'])} | {fmt(m['qemu-nbd'])} "
              f"| {m['cowimg'] / m['nbdkit']:.2f} | {m['cowimg'] / m['qemu-nbd']:.2f} |")
    save_json("tls.json", {"reps": REPS, "size": SIZE, "results": results,
                           "medians": medians})


if __name__ == "__main__":
    main()
