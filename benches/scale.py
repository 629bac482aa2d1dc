#!/usr/bin/env python3
"""Scale check: create, open and `info` of a 16 TiB overlay, empty and with SCALE_CLUSTERS
(default 1 million) 4 KiB writes scattered over distinct 64 KiB clusters.

The populated image is written with the library directly (benches/scale.rs): a million
`cowimg io` invocations would time process start-up. Open is timed in-process (median of
OPEN_REPS); `cowimg info` is timed as a command with its peak RSS from wait4.
Knobs: SCALE_CLUSTERS, OPEN_REPS, INFO_REPS, QUICK=1.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    COWIMG, QUICK, WORK_DIR, allocated_bytes, cargo_bench_exe, have_cowimg_command, log,
    machine, median, remove, save_json, settle, sh, timed,
)

TIB = 1 << 40
SIZE = 16 * TIB
CLUSTERS = int(os.environ.get("SCALE_CLUSTERS") or (250_000 if QUICK else 1_000_000))
OPEN_REPS = int(os.environ.get("OPEN_REPS") or 7)
INFO_REPS = int(os.environ.get("INFO_REPS") or (3 if QUICK else 5))


def measure(exe, path, label):
    opened = json.loads(sh([exe, "open", path, str(OPEN_REPS)]))
    _, open_rss = timed([exe, "open", path, "1"])
    r = {"label": label, "open_ms": opened["open_ms_median"], "open_peak_rss": open_rss,
         "mapped_clusters": opened["mapped_clusters"], "file_allocated": allocated_bytes(path),
         "file_size": os.stat(path).st_size}
    if have_cowimg_command("info"):
        runs = [timed([COWIMG, "info", path]) for _ in range(INFO_REPS)]
        r["info_ms"] = median([s for s, _ in runs]) * 1e3
        r["info_peak_rss"] = max(m for _, m in runs)
    else:
        log("cowimg info not available - timing the library open only")
    return r


def main():
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    exe = cargo_bench_exe("scale")
    empty = WORK_DIR / "scale-empty.cow"
    # One cached image per cluster count, so QUICK and full runs do not remake each other's.
    full = WORK_DIR / f"scale-full-{CLUSTERS}.cow"
    results = {}

    remove(empty)
    created = json.loads(sh([exe, "create", empty, str(SIZE)]))
    results["empty"] = measure(exe, empty, "16 TiB, empty")
    results["empty"]["create_ms"] = created["create_ms"]
    if have_cowimg_command("create"):
        remove(empty)
        secs, rss = timed([COWIMG, "create", "-s", str(SIZE), str(empty)])
        results["empty"]["cli_create_ms"] = secs * 1e3
        results["empty"]["cli_create_peak_rss"] = rss
    log("empty:", results["empty"])

    # The populated image is kept between runs: on a filesystem mounted with `discard`,
    # unlinking a file of a million scattered extents takes minutes. It is remade when the
    # format changed (open fails) or the count differs.
    pop = None
    cached = full.with_suffix(".json")
    if full.exists() and cached.exists():
        try:
            pop = json.loads(cached.read_text())
            opened = json.loads(sh([exe, "open", full, "1"]))
            if opened["mapped_clusters"] != CLUSTERS or pop.get("mapped_clusters") != CLUSTERS:
                pop = None
            else:
                log(f"reusing {full} ({CLUSTERS} clusters)")
        except (RuntimeError, ValueError, KeyError):
            pop = None
    if pop is None:
        remove(full, cached)
        log(f"populating {full}: {CLUSTERS} clusters scattered over 16 TiB")
        pop = json.loads(sh([exe, "populate", full, str(SIZE), str(CLUSTERS)]))
        cached.write_text(json.dumps(pop))
        settle()
    results["full"] = measure(exe, full, f"16 TiB, {CLUSTERS:,} clusters")
    results["full"].update(pop)
    log("full:", results["full"])
    remove(empty)
    save_json("scale.json", {"machine": machine(), "params": {"clusters": CLUSTERS, "size": SIZE,
                                                               "open_reps": OPEN_REPS,
                                                               "quick": QUICK},
                             "results": results})


if __name__ == "__main__":
    main()
