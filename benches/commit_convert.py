#!/usr/bin/env python3
"""Times `cowimg commit` against `qemu-img commit` and `cowimg convert -O raw` against
`qemu-img convert -O raw`, on overlays holding the same dirty data.

Each repetition, for each tool in turn (alternating which goes first):
  1. a fresh dense copy of the 1 GiB random backing file, and an overlay on it;
  2. DIRTY_MIB of data written through NBD by the same fio job (1 MiB writes at random,
     distinct offsets, fixed seed) - `cowimg serve` for cowimg, `qemu-nbd` for qcow2;
  3. convert the overlay to a raw file (timed: fastest of CONVERT_TRIES back-to-back runs),
     delete the output; for qemu-img also with
     `-t writeback`, which fsyncs the output as cowimg convert does (the default never does);
  4. commit the overlay into its backing file (timed).
Figures are medians; peak memory is /usr/bin/time's maximum resident set size. Knobs: REPS, CONVERT_TRIES, DIRTY_MIB, SIZE_MIB, QUICK=1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    COWIMG, MIB, QUICK, WORK_DIR, Server, copy_file, env_int, fio, have_cowimg_command, log,
    machine, make_random_file, median, remove, save_json, settle, sh, timed, tool_version,
)

REPS = env_int("REPS", 3, 1)
# Each convert runs this many times in a row and the fastest counts: on a VM disk the first
# large write after files were deleted (discards) varies by seconds for every tool alike.
CONVERT_TRIES = env_int("CONVERT_TRIES", 2)
SIZE = env_int("SIZE_MIB", 1024) * MIB
DIRTY = env_int("DIRTY_MIB", 512, 256) * MIB
BASE = WORK_DIR / "base.raw"
SOCK = WORK_DIR / "cc.sock"


def tools():
    t = {
        "cowimg": {
            "backing": WORK_DIR / "cc-base-cowimg.raw",
            "image": WORK_DIR / "cc.cow",
            "create": lambda b, i: [COWIMG, "create", "-b", b, "-F", "raw", i],
            "serve": lambda i: [COWIMG, "serve", "--socket", SOCK, i],
            "convert": lambda i, o: [COWIMG, "convert", "-O", "raw", i, o],
            # -t unsafe skips the final fdatasync, like qemu-img convert's default.
            "convert_unsafe": lambda i, o: [COWIMG, "convert", "-t", "unsafe", "-O", "raw", i, o],
            "commit": lambda i: [COWIMG, "commit", i],
        },
        "qemu-img": {
            "backing": WORK_DIR / "cc-base-qcow2.raw",
            "image": WORK_DIR / "cc.qcow2",
            "create": lambda b, i: ["qemu-img", "create", "-q", "-f", "qcow2", "-b", b,
                                    "-F", "raw", i],
            "serve": lambda i: ["qemu-nbd", "-f", "qcow2", "-t", "--socket", SOCK, i],
            "convert": lambda i, o: ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", i, o],
            # qemu-img convert's default cache mode for the output is "unsafe": it never
            # fsyncs. cowimg convert fdatasyncs its output, so -t writeback (which flushes at
            # the end) is timed too, as the like-for-like figure.
            "convert_durable": lambda i, o: ["qemu-img", "convert", "-t", "writeback", "-f",
                                             "qcow2", "-O", "raw", i, o],
            "commit": lambda i: ["qemu-img", "commit", "-f", "qcow2", i],
        },
    }
    if not all(have_cowimg_command(c) for c in ("create", "serve", "convert", "commit")):
        log("cowimg create/serve/convert/commit not all available - skipping cowimg")
        del t["cowimg"]
    return t


def dirty(tool):
    copy_file(BASE, tool["backing"])
    remove(tool["image"])
    sh(tool["create"](tool["backing"], tool["image"]))
    srv = Server("cc-writer", tool["serve"](tool["image"]), SOCK)
    try:
        job = fio(f"nbd+unix:///?socket={SOCK}", [
            "--rw=randwrite", "--bs=1m", "--iodepth=8", f"--io_size={DIRTY}",
            "--randrepeat=1", "--randseed=4242", "--end_fsync=1"])
    finally:
        code = srv.stop()
    if code != 0:
        raise RuntimeError(f"writer for {tool['image']} exited {code}")
    if job["write"]["io_bytes"] != DIRTY:
        raise RuntimeError(f"fio wrote {job['write']['io_bytes']} bytes, wanted {DIRTY}")
    settle()


def time_convert(cmd, out):
    tries = []
    for _ in range(CONVERT_TRIES):
        remove(out)
        settle()
        tries.append(timed(cmd))
    remove(out)
    settle()
    secs, rss = min(tries)
    return {"seconds": secs, "peak_rss": max(r for _, r in tries),
            "tries": [t for t, _ in tries]}


def main():
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    make_random_file(BASE, SIZE)
    ts = tools()
    out = WORK_DIR / "cc-out.raw"
    res = {name: {op: [] for op in ("convert", "convert_durable", "convert_unsafe", "commit")
                  if op in t}
           for name, t in ts.items()}
    for rep in range(REPS):
        names = list(ts)
        if rep % 2:
            names.reverse()
        for name in names:
            tool = ts[name]
            dirty(tool)
            conv = time_convert(tool["convert"](tool["image"], out), out)
            res[name]["convert"].append(conv)
            secs, rss = conv["seconds"], conv["peak_rss"]
            for other in ("convert_durable", "convert_unsafe"):
                if other in tool:
                    res[name][other].append(time_convert(tool[other](tool["image"], out), out))
            secs_c, rss_c = timed(tool["commit"](tool["image"]))
            res[name]["commit"].append({"seconds": secs_c, "peak_rss": rss_c})
            log(f"rep {rep + 1}/{REPS} {name:8} convert {secs:6.2f}s {rss / MIB:7.1f} MiB   "
                f"commit {secs_c:6.2f}s {rss_c / MIB:7.1f} MiB")
            remove(tool["image"], tool["backing"])
            settle()
    summary = {
        name: {op: {"seconds": median([r["seconds"] for r in runs]),
                    "peak_rss": max(r["peak_rss"] for r in runs)}
               for op, runs in ops.items()}
        for name, ops in res.items()
    }
    save_json("commit_convert.json", {
        "machine": machine(),
        "versions": {"qemu-img": tool_version(["qemu-img", "--version"]),
                     "cowimg": tool_version([str(COWIMG), "--version"])},
        "params": {"reps": REPS, "size": SIZE, "dirty": DIRTY, "quick": QUICK,
                   "convert_tries": CONVERT_TRIES},
        "summary": summary,
        "runs": res,
    })


if __name__ == "__main__":
    main()
