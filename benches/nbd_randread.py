#!/usr/bin/python3
"""4 KiB random reads over one NBD connection with libnbd (python3-libnbd), any URI libnbd
takes, TLS included (fio's nbd engine refuses the tls-certificates parameter).

    nbd_randread.py URI SECONDS [DEPTH]

Prints one JSON object: {"iops": ..., "ops": ..., "seconds": ...}. The offsets come from a
fixed-seed generator, so every server gets the same sequence.
"""
import json
import os
import random
import sys
import time

# benches/nbd.py, beside this file, would shadow libnbd's module.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
import nbd  # noqa: E402

uri, seconds = sys.argv[1], float(sys.argv[2])
depth = int(sys.argv[3]) if len(sys.argv) > 3 else 16
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
blocks = h.get_size() // 4096
rng = random.Random(7)
bufs = [nbd.Buffer(4096) for _ in range(depth)]
done = 0
free = list(range(depth))


def completed(slot, error):
    global done
    done += 1
    free.append(slot)
    return 0


start = time.monotonic()
end = start + seconds
while time.monotonic() < end:
    while free:
        slot = free.pop()
        h.aio_pread(bufs[slot], rng.randrange(blocks) * 4096,
                    completion=lambda err, slot=slot: completed(slot, err))
    h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
elapsed = time.monotonic() - start
h.shutdown()
print(json.dumps({"iops": done / elapsed, "ops": done, "seconds": elapsed}))
