"""Shared helpers for cowimg's benchmark scripts (standard library only).

Every script keeps its scratch files under WORK_DIR (default target/bench-work in the
repository, on the same filesystem the project lives on: a tmpfs would make every fsync
free) and writes its results as JSON into RESULTS_DIR/<run id>/, from which report.py
renders benches/RESULTS.md.
"""

import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHES = REPO / "benches"
QUICK = os.environ.get("QUICK", "0") not in ("", "0")
WORK_DIR = Path(os.environ.get("WORK_DIR", REPO / "target" / "bench-work"))
RESULTS_DIR = Path(os.environ.get("RESULTS_DIR", BENCHES / "results"))
COWIMG = Path(os.environ.get("COWIMG", REPO / "target" / "release" / "cowimg"))
MIB = 1 << 20
GIB = 1 << 30


def env_int(name, default, quick_default=None):
    """An integer knob from the environment; QUICK=1 picks quick_default when given."""
    v = os.environ.get(name)
    if v not in (None, ""):
        return int(v)
    if QUICK and quick_default is not None:
        return quick_default
    return default


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


def run_id():
    """One id for every script of one benches/run.sh invocation."""
    return os.environ.get("BENCH_RUN_ID") or time.strftime("%Y%m%d-%H%M%S")


def result_path(name):
    d = RESULTS_DIR / run_id()
    d.mkdir(parents=True, exist_ok=True)
    return d / name


def save_json(name, data):
    p = result_path(name)
    p.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    log("wrote", p)


def machine():
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    fs = "unknown"
    try:
        fs = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "-T", str(WORK_DIR)],
            capture_output=True, text=True, check=False,
        ).stdout.strip()
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "mem_gib": round(mem_kib / (1 << 20), 1),
        "filesystem": fs,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_at_start": os.getloadavg()[0],
        "quick": QUICK,
    }


def tool_version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "missing"


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def sh(cmd, **kw):
    """Runs a command, failing loudly with its stderr."""
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def timed(cmd):
    """Runs cmd under /usr/bin/time; returns (seconds, peak RSS bytes). (wait4's ru_maxrss
    from Python would count the forked Python interpreter's pages before exec.)"""
    rss_file = WORK_DIR / "time.out"
    full = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] + [str(c) for c in cmd]
    start = time.monotonic()
    r = subprocess.run(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.monotonic() - start
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): {r.stderr.strip()}")
    kib = int(rss_file.read_text().split()[-1])
    return elapsed, kib * 1024


def make_random_file(path, size):
    """A file of random bytes (made once and reused: same backing for every server)."""
    path = Path(path)
    if path.exists() and path.stat().st_size == size:
        return path
    log(f"making {path} ({size >> 20} MiB of random bytes)")
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MIB)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    return path


def copy_file(src, dst):
    """A full (non-reflinked, dense) copy, synced so its writeback does not land in the
    next measurement."""
    remove(dst)
    sh(["cp", "--reflink=never", "--sparse=never", str(src), str(dst)])
    os.sync()


def remove(*paths):
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


def settle():
    """Writes back dirty pages from the previous step so they do not land in the next one."""
    os.sync()
    time.sleep(0.5)


class Server:
    """A running NBD server on a Unix socket."""

    def __init__(self, name, cmd, sock, env=None):
        self.name = name
        self.sock = str(sock)
        remove(self.sock)
        self.stderr_path = WORK_DIR / f"{name}.stderr"
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=self.stderr,
            env={**os.environ, **(env or {})},
        )
        self.rusage = None
        self._wait_ready()

    def _wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self._err()}")
            if os.path.exists(self.sock):
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(self.sock)
                    # A bare connect would count as a client to servers that exit after
                    # the last one (qemu-nbd without -t); closing at once is harmless.
                    return
                except OSError:
                    pass
                finally:
                    s.close()
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not listen on {self.sock} within {timeout}s")

    def _err(self):
        try:
            return self.stderr_path.read_text(errors="replace").strip()[-2000:]
        except OSError:
            return ""

    def status(self):
        """VmHWM (peak RSS) and CPU seconds so far, from /proc."""
        hwm = None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        return {"peak_rss": hwm, "cpu_seconds": cpu}

    def open_files(self):
        """Paths and allocated bytes of the regular files the server holds open (nbdkit's
        cow filter keeps its overlay in an unlinked temporary file)."""
        out = []
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                st = os.stat(fd)
                target = os.readlink(fd)
            except OSError:
                continue
            if (st.st_mode & 0o170000) == 0o100000:
                out.append((target, st.st_blocks * 512, st.st_size))
        return out

    def stop(self, timeout=120):
        """SIGTERM (cowimg and qemu-nbd flush on it), then wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                pid, status, ru = os.wait4(self.proc.pid, os.WNOHANG)
                if pid:
                    self.proc.returncode = os.waitstatus_to_exitcode(status)
                    self.rusage = ru
                    break
                time.sleep(0.02)
            else:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"{self.name} ignored SIGTERM for {timeout}s")
        self.stderr.close()
        remove(self.sock)
        return self.proc.returncode


def fio(uri, args, timeout=600):
    """Runs fio's nbd engine against uri; returns the parsed JSON job."""
    cmd = ["fio", "--name=job", "--ioengine=nbd", f"--uri={uri}", "--output-format=json"] + args
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"fio {' '.join(args)} failed: {r.stderr.strip()[-1500:]}")
    text = r.stdout
    # fio prints "fio: connected to NBD server" lines before the JSON.
    text = text[text.index("{"):]
    job = json.loads(text)["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}: {r.stderr.strip()[-1500:]}")
    return job


def cargo_bench_exe(name):
    """Builds a harness-less bench target and returns its executable."""
    out = sh(["cargo", "bench", "--bench", name, "--no-run", "--message-format=json"], cwd=REPO)
    exe = None
    for line in out.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == name:
            exe = msg.get("executable") or exe
    if not exe:
        raise RuntimeError(f"cargo did not report an executable for bench {name}")
    return exe


def have_cowimg_command(sub):
    """True when the built cowimg binary has subcommand `sub`."""
    if not COWIMG.exists():
        return False
    r = subprocess.run([str(COWIMG), sub, "--help"], capture_output=True, text=True)
    return r.returncode == 0
