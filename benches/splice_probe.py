#!/usr/bin/env python3
"""Would splice make NBD writes cheaper? Receives 8 GiB in 1 MiB chunks over a Unix socket
pair into a 1 GiB file, either with recv + pwrite (two copies, what an NBD server does) or
with splice socket -> pipe -> file, and prints throughput and CPU seconds per GiB.

    python3 benches/splice_probe.py copy|splice [FILE]

Run both modes alternately a few times; see benches/ANALYSIS.md for what it showed.
"""
import fcntl
import os
import resource
import socket
import sys
import time

F_SETPIPE_SZ = 1031
TOTAL = 8 << 30
CHUNK = 1 << 20
SPAN = 1 << 30


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "copy"
    if mode not in ("copy", "splice"):
        sys.exit("usage: splice_probe.py copy|splice [FILE]")
    path = sys.argv[2] if len(sys.argv) > 2 else "target/splice-probe.raw"
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.fork() == 0:
        a.close()
        data = os.urandom(CHUNK)
        for _ in range(TOTAL // CHUNK):
            b.sendall(data)
        os._exit(0)
    b.close()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, SPAN)
    pipe_r, pipe_w = os.pipe()
    fcntl.fcntl(pipe_w, F_SETPIPE_SZ, CHUNK)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    start, before = time.time(), resource.getrusage(resource.RUSAGE_SELF)
    for i in range(TOTAL // CHUNK):
        at = (i * CHUNK) % SPAN
        if mode == "copy":
            n = 0
            while n < CHUNK:
                n += a.recv_into(view[n:], CHUNK - n)
            os.pwrite(fd, buf, at)
        else:
            n = 0
            while n < CHUNK:
                n += os.splice(a.fileno(), pipe_w, CHUNK - n)
            m = 0
            while m < CHUNK:
                m += os.splice(pipe_r, fd, CHUNK - m, offset_dst=at + m)
    after, secs = resource.getrusage(resource.RUSAGE_SELF), time.time() - start
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"{mode}: {TOTAL / secs / 2**30:.2f} GiB/s, {cpu / (TOTAL / 2**30):.3f} CPU s per GiB")
    os.wait()
    os.close(fd)
    os.unlink(path)


if __name__ == "__main__":
    main()
