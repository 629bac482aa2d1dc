#!/usr/bin/env python3
"""Renders benches/RESULTS.md (newest run first) and one SVG chart per run from the JSON the
other scripts leave in benches/results/<run id>/.

  report.py collect-criterion   copy criterion's estimates (target/criterion) into the
                                current run's criterion.json
  report.py                     render RESULTS.md and the charts
"""

import html
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import BENCHES, GIB, MIB, REPO, RESULTS_DIR, log, machine, save_json  # noqa: E402

COW_PEERS = ["qcow2", "qcow2-el2", "nbdkit-cow"]
LIMIT = "raw"
COLORS = {"cowimg": "#d9480f", "cowimg-4k": "#f08c00", "cowimg-prev": "#fab005", "qcow2": "#1c7ed6", "qcow2-el2": "#4dabf7",
          "nbdkit-cow": "#37b24d", "raw": "#868e96", "qemu-img": "#1c7ed6"}


def collect_criterion():
    root = REPO / "target" / "criterion"
    out = {}
    for est in sorted(root.glob("*/**/new/estimates.json")):
        rel = est.parent.parent.relative_to(root)
        parts = rel.parts
        group, impl = parts[0], parts[1]
        e = json.loads(est.read_text())
        out.setdefault(group, {})[impl] = {
            "median_ns": e["median"]["point_estimate"],
            "lower_ns": e["median"]["confidence_interval"]["lower_bound"],
            "upper_ns": e["median"]["confidence_interval"]["upper_bound"],
        }
    save_json("criterion.json", {"machine": machine(), "groups": out})


def load(run_dir, name):
    p = run_dir / name
    return json.loads(p.read_text()) if p.exists() else None


def fmt_value(v, unit):
    if v is None:
        return "-"
    if unit == "GiB/s":
        return f"{v / GIB:.2f}"
    if v >= 10000:
        return f"{v / 1000:.0f}k"
    return f"{v / 1000:.1f}k"


def metric(cell, unit):
    if not cell:
        return None
    return cell["bw"] if unit == "GiB/s" else cell["iops"]


def svg_bars(title_by_panel, panels, path, subtitle):
    """Small-multiples horizontal bar chart: panels = [(title, [(label, key, value, text)])]."""
    pw, bar_h, gap, left = 300, 18, 6, 140
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    n = max(len(p[1]) for p in panels) if panels else 1
    ph = 30 + n * (bar_h + gap) + 10
    width, height = cols * (pw + left) + 20, rows * ph + 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" font-size="15" font-weight="bold">{html.escape(title_by_panel)}</text>',
           f'<text x="10" y="38" fill="#555">{html.escape(subtitle)}</text>']
    for i, (title, bars) in enumerate(panels):
        x0 = 10 + (i % cols) * (pw + left)
        y0 = 50 + (i // cols) * ph
        out.append(f'<text x="{x0}" y="{y0 + 16}" font-weight="bold">{html.escape(title)}</text>')
        top = max([b[2] for b in bars if b[2]] or [1])
        for j, (label, key, value, text) in enumerate(bars):
            y = y0 + 26 + j * (bar_h + gap)
            w = 0 if not value else max(1, (pw - 70) * value / top)
            bold = ' font-weight="bold"' if key == "cowimg" else ""
            out.append(f'<text x="{x0 + left - 6}" y="{y + 13}" text-anchor="end"{bold}>'
                       f'{html.escape(label)}</text>')
            out.append(f'<rect x="{x0 + left}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                       f'fill="{COLORS.get(key, "#999")}"/>')
            out.append(f'<text x="{x0 + left + w + 4:.1f}" y="{y + 13}"{bold}>{html.escape(text)}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def machine_line(m):
    return (f"{m['nproc']} CPUs ({m['cpu']}), kernel {m['kernel']}, {m['mem_gib']} GiB RAM, "
            f"work dir on {m['filesystem'] or '?'}; load average at start {m['loadavg_at_start']:.2f}")


def verdict(ok):
    return "PASS" if ok else "**FAIL**"


def render_nbd(run_dir, nbd, lines, checks):
    order = ["randwrite-4k", "randread-4k", "seqwrite-1m", "seqread-1m", "randwrite-4k-flush32"]
    wls = [w for w in order if w in nbd["workloads"]] + [
        w for w in nbd["workloads"] if w not in order]
    servers = nbd["servers"]
    s = nbd["summary"]
    p = nbd["params"]
    lines.append(f"### NBD throughput\n")
    lines.append(f"fio {nbd['versions']['fio'].replace('fio-', '')} nbd engine over a Unix socket, one "
                 f"connection, iodepth {p['iodepth']}, {p['runtime']} s runs after {p['ramp']} s ramp, "
                 f"median of {p['reps']} repetition(s), servers round-robin; fresh overlay each run "
                 f"over the same {p['size'] >> 20} MiB random backing file. The flush workload is "
                 f"driven by `benches/nbd_load.rs` (one FLUSH per {p['flush_every']} writes; fio 3.33 "
                 f"floods flushes at iodepth > 1). Peak RSS = max VmHWM of the server over all runs.\n")
    head = "| server | " + " | ".join(
        f"{nbd['workloads'][w]['label']} ({nbd['workloads'][w]['unit']})" for w in wls) + " | peak RSS |"
    lines.append(head)
    lines.append("|" + "---|" * (len(wls) + 2))
    for name in servers:
        row = [f"**{s[name]['label']}**" if name == "cowimg" else s[name]["label"]]
        for w in wls:
            row.append(fmt_value(metric(s[name].get(w), nbd["workloads"][w]["unit"]),
                                 nbd["workloads"][w]["unit"]))
        rss = s[name].get("peak_rss_max")
        row.append(f"{rss / MIB:.1f} MiB" if rss else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if "cowimg" in servers:
        lines.append("cowimg's ratio to each server (> 1 means cowimg is faster):\n")
        lines.append("| cowimg ÷ | " + " | ".join(nbd["workloads"][w]["label"] for w in wls) + " |")
        lines.append("|" + "---|" * (len(wls) + 1))
        for name in servers:
            if name == "cowimg":
                continue
            row = [s[name]["label"]]
            for w in wls:
                unit = nbd["workloads"][w]["unit"]
                a, b = metric(s["cowimg"].get(w), unit), metric(s[name].get(w), unit)
                row.append(f"{a / b:.2f}x" if a and b else "-")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        for w in wls:
            unit = nbd["workloads"][w]["unit"]
            mine = metric(s["cowimg"].get(w), unit)
            peers = [metric(s[n].get(w), unit) for n in COW_PEERS if n in servers]
            if mine and peers:
                checks.append((f"{nbd['workloads'][w]['label']}: ahead of every COW peer",
                               f"{mine / max(peers):.2f}x the best", mine > max(peers)))
            fc = nbd.get("flush_syscalls") or {}
            if w == "randwrite-4k-flush32" and mine and fc:
                syncing = [metric(s[n].get(w), unit) for n in COW_PEERS
                           if n in servers and fc.get(n, {}).get("syncs_per_flush", 0) > 0]
                if syncing and len(syncing) < len(peers):
                    checks.append((f"{nbd['workloads'][w]['label']}: ahead of every COW peer "
                                   "that syncs on FLUSH", f"{mine / max(syncing):.2f}x the best",
                                   mine > max(syncing)))
            if mine and LIMIT in servers and metric(s[LIMIT].get(w), unit):
                r = mine / metric(s[LIMIT][w], unit)
                checks.append((f"{nbd['workloads'][w]['label']}: >= 0.9x raw limit", f"{r:.2f}x",
                               r >= 0.9))
        rss = s["cowimg"].get("peak_rss_max")
        if rss:
            checks.append(("serve peak memory < 64 MiB", f"{rss / MIB:.1f} MiB", rss < 64 * MIB))
    panels = []
    for w in wls:
        unit = nbd["workloads"][w]["unit"]
        bars = []
        for name in servers:
            v = metric(s[name].get(w), unit)
            shown = v / GIB if unit == "GiB/s" and v else v
            bars.append((name, name, shown, fmt_value(v, unit)))
        panels.append((f"{nbd['workloads'][w]['label']} ({unit}, higher is better)", bars))
    rss_bars = [(n, n, (s[n].get("peak_rss_max") or 0) / MIB,
                 f"{(s[n].get('peak_rss_max') or 0) / MIB:.1f} MiB") for n in servers]
    panels.append(("server peak RSS (MiB, lower is better)", rss_bars))
    svg = run_dir / "nbd.svg"
    svg_bars("NBD throughput", panels, svg,
             f"{nbd['machine']['date']} - {nbd['machine']['nproc']} CPUs - median of {p['reps']}")
    lines.append(f"![NBD throughput]({svg.relative_to(BENCHES)})\n")

    fc = nbd.get("flush_syscalls") or {}
    if fc:
        lines.append("What a FLUSH costs each server (strace of a 2 s flush-every-32 run): "
                     "fsync/fdatasync calls per NBD FLUSH, and hole punches (fallocate) in that run. "
                     "A server making no sync call on FLUSH offers no durability for it.\n")
        disk = any("device_bytes_per_byte" in c for c in fc.values())
        if disk:
            lines.append("The same run seen from the block device (/sys/dev/block/.../stat): "
                         "bytes the device wrote per byte the client wrote, and device cache "
                         "flushes per NBD FLUSH. Above 1, the rest is what the server and the "
                         "file system wrote to make the data durable (ext4 journal, extent "
                         "tree, bitmaps); other tenants of the disk add some noise.\n")
        lines.append("| server | syncs per FLUSH | fallocate calls | FLUSHes |"
                     + (" device bytes per byte | device flushes per FLUSH |" if disk else ""))
        lines.append("|---|---|---|---|" + ("---|---|" if disk else ""))
        for name in servers:
            if name in fc:
                c = fc[name]
                row = (f"| {s[name]['label']} | {c['syncs_per_flush']:.2f} | "
                       f"{c['counts'].get('fallocate', 0)} | {c['flushes']} |")
                if disk:
                    row += (f" {c['device_bytes_per_byte']:.2f} | {c['device_flushes_per_flush']:.2f} |"
                            if "device_bytes_per_byte" in c else " - | - |")
                lines.append(row)
        lines.append("")

    wa = nbd.get("write_amplification") or {}
    if wa:
        lines.append("### Write amplification\n")
        lines.append(f"{p['wa_bytes'] >> 20} MiB of 4 KiB random writes, each to a distinct block, into a "
                     "fresh overlay through NBD; the server is stopped with SIGTERM (which flushes), "
                     "then the growth of the image's allocated blocks (`st_blocks` x 512) is divided "
                     "by the bytes written. nbdkit cow: its unlinked temporary overlay, measured "
                     "through /proc/PID/fd before the stop. The raw copy is written in place (no "
                     "growth) and is left out.\n")
        lines.append("| server | written | image grew by | ratio |")
        lines.append("|---|---|---|---|")
        for name in servers:
            if name in wa:
                r = wa[name]
                lines.append(f"| {s[name]['label']} | {r['written'] / MIB:.0f} MiB | "
                             f"{r['grown'] / MIB:.1f} MiB | {r['ratio']:.3f} |")
        lines.append("")
        if "cowimg" in wa:
            checks.append(("write amplification <= 1.1", f"{wa['cowimg']['ratio']:.3f}",
                           wa["cowimg"]["ratio"] <= 1.1))


def render_cc(run_dir, cc, lines, checks):
    s = cc["summary"]
    p = cc["params"]
    lines.append("### Commit and convert\n")
    lines.append(f"{p['dirty'] >> 20} MiB written through NBD (same fio job: 1 MiB writes at distinct "
                 f"random offsets) into an overlay over a fresh copy of the {p['size'] >> 20} MiB "
                 f"backing file; then `convert -O raw` (fastest of "
                 f"{p.get('convert_tries', 1)} back-to-back runs) and `commit` are timed. Median of "
                 f"{p['reps']}; peak RSS from /usr/bin/time.\n")
    lines.append("| tool | convert -O raw | convert peak RSS | commit | commit peak RSS |")
    lines.append("|---|---|---|---|---|")
    for name, ops in s.items():
        lines.append(f"| {name} | {ops['convert']['seconds']:.2f} s | "
                     f"{ops['convert']['peak_rss'] / MIB:.1f} MiB | {ops['commit']['seconds']:.2f} s | "
                     f"{ops['commit']['peak_rss'] / MIB:.1f} MiB |")
        for other, label in (("convert_durable", "-t writeback (fsyncs its output, as cowimg does)"),
                             ("convert_unsafe", "-t unsafe (no fsync, as qemu-img's default)")):
            if other in ops:
                d = ops[other]
                lines.append(f"| {name} {label} | "
                             f"{d['seconds']:.2f} s | {d['peak_rss'] / MIB:.1f} MiB | | |")
    lines.append("")
    if "cowimg" in s and "qemu-img" in s:
        cv = s["qemu-img"]["convert"]["seconds"] / s["cowimg"]["convert"]["seconds"]
        cm = s["qemu-img"]["commit"]["seconds"] / s["cowimg"]["commit"]["seconds"]
        text = f"cowimg is {cv:.2f}x as fast as qemu-img at convert"
        if "convert_durable" in s["qemu-img"]:
            cvd = s["qemu-img"]["convert_durable"]["seconds"] / s["cowimg"]["convert"]["seconds"]
            text += f" ({cvd:.2f}x against `-t writeback`)"
        lines.append(text + f" and {cm:.2f}x at commit.\n")
        if "convert_unsafe" in s["cowimg"]:
            cvu = s["qemu-img"]["convert"]["seconds"] / s["cowimg"]["convert_unsafe"]["seconds"]
            lines.append(f"Without the final fsync on both sides (cowimg `-t unsafe`, qemu-img's "
                         f"default) cowimg is {cvu:.2f}x as fast.\n")
            checks.append(("convert -t unsafe >= qemu-img convert (default: no fsync either)",
                           f"{cvu:.2f}x", cvu >= 1.0))
        if "convert_durable" in s["qemu-img"]:
            checks.append(("convert >= qemu-img convert -t writeback (both fsync)", f"{cvd:.2f}x",
                           cvd >= 1.0))
        checks.append(("convert (fsyncs) >= qemu-img convert (default, no fsync)", f"{cv:.2f}x",
                       cv >= 1.0))
        checks.append(("commit >= 1.5x qemu-img commit", f"{cm:.2f}x", cm >= 1.5))
        bars = {"convert": [(n, n, s[n]["convert"]["seconds"], f"{s[n]['convert']['seconds']:.2f} s")
                            for n in s]}
        if "convert_durable" in s["qemu-img"]:
            v = s["qemu-img"]["convert_durable"]["seconds"]
            bars["convert"].append(("qemu-img -t wb", "qemu-img", v, f"{v:.2f} s"))
        if "convert_unsafe" in s["cowimg"]:
            v = s["cowimg"]["convert_unsafe"]["seconds"]
            bars["convert"].append(("cowimg -t unsafe", "cowimg", v, f"{v:.2f} s"))
        bars["commit"] = [(n, n, s[n]["commit"]["seconds"], f"{s[n]['commit']['seconds']:.2f} s")
                          for n in s]
        panels = [(f"{op} (seconds, lower is better)", bars[op]) for op in ("convert", "commit")]
        svg = run_dir / "commit_convert.svg"
        svg_bars("Commit and convert", panels, svg, f"{p['dirty'] >> 20} MiB dirty, median of {p['reps']}")
        lines.append(f"![commit and convert]({svg.relative_to(BENCHES)})\n")


def render_scale(sc, lines, checks):
    r = sc["results"]
    lines.append("### Scale\n")
    lines.append("A 16 TiB overlay, empty and with clusters scattered over it (one 4 KiB write "
                 "per 64 KiB cluster, written with the library, flushed every 65,536 writes). "
                 "Open: median of in-process `Image::open` calls; peak RSS of a process that only "
                 "opens it; `cowimg info`: wall time and peak RSS of the command.\n")
    lines.append("| image | file size / allocated | create | open | open peak RSS | cowimg info | info peak RSS |")
    lines.append("|---|---|---|---|---|---|---|")
    for key in ("empty", "full"):
        if key not in r:
            continue
        x = r[key]
        create = x.get("cli_create_ms", x.get("create_ms"))
        lines.append(
            f"| {x['label']} | {x['file_size'] / MIB:,.1f} / {x['file_allocated'] / MIB:,.1f} MiB | "
            f"{create:.1f} ms | {x['open_ms']:.3f} ms | {x['open_peak_rss'] / MIB:.1f} MiB | "
            + (f"{x['info_ms']:.1f} ms | {x['info_peak_rss'] / MIB:.1f} MiB |" if "info_ms" in x
               else "- | - |"))
    lines.append("")
    if "empty" in r:
        e = r["empty"]
        t = e.get("info_ms", e["open_ms"])
        m = e.get("info_peak_rss", e["open_peak_rss"])
        checks.append(("16 TiB overlay opens < 50 ms and in a few MiB",
                       f"{t:.1f} ms, {m / MIB:.1f} MiB", t < 50 and m < 8 * MIB))


def render_exports(ex, lines, checks):
    k = ex["knobs"]
    r = ex["results"]
    lines.append("### Many exports in one process\n")
    lines.append(
        f"`benches/exports.py`: N empty overlays of one sparse {k['size_mib']} MiB raw base, served "
        "by one `cowimg serve --dir`, by one qemu-nbd per qcow2 overlay, and by one "
        "qemu-storage-daemon with every qcow2 overlay over one shared base node. Open: until "
        "every export accepts connections. Idle: one second later. Busy: after one fio wrote "
        f"{k['busy_mib']} MiB of 4 KiB random writes to every export at once (then fsync), each "
        f"block of the disk's first {k['busy_mib']} MiB once; *scattered*: as many writes at random "
        "blocks of the whole disk, most in a 64 KiB cluster of their own, the worst case for "
        "cowimg's map (only cowimg: a qcow2 overlay would allocate 64 KiB per write). RSS "
        "counts shared pages once per process, PSS divides them (the fair sum for many "
        f"processes). qemu-nbd is not run beyond {k['qemu_nbd_max']} processes.\n")
    lines.append("| server | exports | open | idle RSS | idle PSS | busy RSS | busy PSS | busy peak RSS | busy run |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for x in r:
        b = x.get("busy")
        busy = (f"{b['rss'] / MIB:,.1f} MiB | {b['pss'] / MIB:,.1f} MiB | {b['hwm'] / MIB:,.1f} MiB | "
                f"{x['busy_seconds']:.1f} s |") if b else "- | - | - | - |"
        lines.append(f"| {x['server']} | {x['exports']} | {x['open_seconds']:.2f} s | "
                     f"{x['idle']['rss'] / MIB:,.1f} MiB | {x['idle']['pss'] / MIB:,.1f} MiB | {busy}")
    lines.append("")
    by = {(x["server"], x["exports"]): x for x in r}
    for kind in ("cowimg", "cowimg-v2"):
        export_checks(by, r, kind, lines, checks)


def export_checks(by, r, kind, lines, checks):
    """The targets of issue 11 for one cowimg format (cowimg-v2: format version 2)."""
    name = "format version 2" if kind == "cowimg-v2" else "cowimg"
    one = by.get((kind, 1))
    most = max((x for x in r if x["server"] == kind), key=lambda x: x["exports"], default=None)
    if one and most and most["exports"] > 1:
        per = (most["idle"]["rss"] - one["idle"]["rss"]) / (most["exports"] - 1)
        lines.append(f"An idle {name} export costs {per / 1024:,.1f} KiB of RSS (from 1 to "
                     f"{most['exports']} exports; the overlays are empty, so this is all beyond the map).\n")
        checks.append((f"{name}: an idle export costs < 256 KiB beyond its map", f"{per / 1024:,.1f} KiB",
                       per < 256 * 1024))
    thousand = by.get((kind, 1000))
    if thousand:
        checks.append((f"{name}: 1000 exports open in < 1 s", f"{thousand['open_seconds']:.2f} s",
                       thousand["open_seconds"] < 1))
    busy100 = by.get((kind, 100))
    nbd10 = by.get(("qemu-nbd", 10))
    if busy100 and busy100.get("busy") and nbd10 and nbd10.get("busy"):
        a, b = busy100["busy"]["rss"], nbd10["busy"]["rss"]
        checks.append((f"{name}: 100 busy exports < RSS of 10 busy qemu-nbd",
                       f"{a / MIB:,.1f} MiB vs {b / MIB:,.1f} MiB", a < b))
        scattered = by.get((f"{kind}, scattered", 100))
        if scattered and scattered.get("busy"):
            c = scattered["busy"]["rss"]
            checks.append(("... with the writes scattered over each disk",
                           f"{c / MIB:,.1f} MiB vs {b / MIB:,.1f} MiB", c < b))


def render_v2(v2, lines, checks):
    """benches/v2.py: format version 2 beside version 1 and qcow2 (issue 13's targets)."""
    p = v2["params"]
    lab = v2.get("labels", {})
    fmts = ["v2", "v1", "qcow2"]

    def ms(x):
        return "-" if x is None else f"{x * 1e3:,.1f} ms"

    def mib(x):
        return "-" if x is None else f"{x / MIB:,.1f} MiB"

    def ratio(a, b):
        if not a or not b:
            return "-"
        r = a / b
        return f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"

    lines.append("### Format version 2\n")
    lines.append("`benches/v2.py`: cowimg v2, cowimg v1 and qcow2 (qemu-nbd, `l2-cache-size=32M`; "
                 "v2's page cache is its default 32 MiB) side by side in one run; each section's "
                 "method is in the script's docstring. Medians over the repetitions; the machine "
                 "is shared, so compare within a table.\n")
    if "open" in v2:
        lines.append("#### Open and memory (1 TiB virtual disk, one 4 KiB block in each of N "
                     "scattered 64 KiB clusters)\n")
        lines.append(f"First reply: from spawning the server to the reply of a 4 KiB read of a "
                     f"written block (libnbd). Median (min-max) of {p['open_reps']} runs, formats "
                     f"alternating; counts made one format at a time (16 GiB images) are marked "
                     f"*alone*. RSS: the server's VmRSS right after that reply, then VmRSS / VmHWM "
                     f"after {p['rss_seconds']} s of random 4 KiB reads of written blocks. `info`: "
                     f"`cowimg info` / `qemu-img info` wall time and peak RSS. Journal: what an "
                     f"open of a cowimg image replays.\n")
        lines.append("| clusters | format | first reply | info | info peak RSS | RSS after open | "
                     "RSS / peak after reads | file allocated | journal used |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for n, res in sorted(v2["open"].items(), key=lambda kv: int(kv[0])):
            for f in fmts:
                r = res.get(f)
                if not r or "first_reply_s" not in r:
                    continue
                name = f"**{lab.get(f, f)}**" if f == "v2" else lab.get(f, f)
                if r.get("alone"):
                    name += " *alone*"
                ju = (f"{r['journal_used'] / MIB:.2f} / {r['journal_capacity'] / MIB:.0f} MiB"
                      if r.get("journal_capacity") else "-")
                lines.append(
                    f"| {int(n):,} | {name} | {ms(r['first_reply_s'])} ({r['first_reply_s_min'] * 1e3:,.1f}-"
                    f"{r['first_reply_s_max'] * 1e3:,.1f}) | {ms(r['info_s'])} | {mib(r['info_peak_rss'])} | "
                    f"{mib(r['rss_open'])} | {mib(r['rss_reads'])} / {mib(r['hwm_reads_max'])} | "
                    f"{mib(r['file_allocated'])} | {ju} |")
        lines.append("")
        lines.append("v2's first reply and `info` time against the others (> 1: v2 takes longer):\n")
        lines.append("| clusters | first reply v2 ÷ v1 | first reply v2 ÷ qcow2 | info v2 ÷ v1 | info v2 ÷ qcow2 |")
        lines.append("|---|---|---|---|---|")
        for n, res in sorted(v2["open"].items(), key=lambda kv: int(kv[0])):
            g = {f: res.get(f, {}) for f in fmts}
            lines.append(f"| {int(n):,} | {ratio(g['v2'].get('first_reply_s'), g['v1'].get('first_reply_s'))} | "
                         f"{ratio(g['v2'].get('first_reply_s'), g['qcow2'].get('first_reply_s'))} | "
                         f"{ratio(g['v2'].get('info_s'), g['v1'].get('info_s'))} | "
                         f"{ratio(g['v2'].get('info_s'), g['qcow2'].get('info_s'))} |")
        lines.append("")
        for n, res in sorted(v2["open"].items(), key=lambda kv: int(kv[0])):
            r = res.get("v2", {})
            if int(n) >= 1_000_000 and "first_reply_s" in r:
                checks.append((f"v2, {int(n):,} clusters: first NBD reply < 50 ms",
                               ms(r["first_reply_s"]), r["first_reply_s"] < 0.05))
                checks.append((f"v2, {int(n):,} clusters: `info` < 50 ms", ms(r["info_s"]),
                               r["info_s"] < 0.05))
            if "hwm_reads_max" in r:
                checks.append((f"v2, {int(n):,} clusters: serve peak RSS < 64 MiB after reads",
                               mib(r["hwm_reads_max"]), r["hwm_reads_max"] < 64 * MIB))
    if "reads" in v2:
        rd = v2["reads"]
        r = rd["results"]
        lines.append(f"#### Random 4 KiB reads over {rd['size'] / GIB:.0f} GiB of scattered written clusters\n")
        lines.append(f"All {rd['clusters']:,} clusters of a {rd['size'] / GIB:.0f} GiB disk hold one "
                     f"4 KiB block (written in scattered order); fio nbd engine, iodepth 16, `--ba=64k` "
                     f"(every read is a written block), {p['runtime']} s after {p['ramp']} s ramp, "
                     f"median of {p['reps']}, formats alternating; equal 32 MiB map caches.\n")
        lines.append("| format | IOPS | p99 latency | peak RSS | ÷ qcow2 | ÷ v1 |")
        lines.append("|---|---|---|---|---|---|")
        for f in ("v2", "qcow2", "v1"):
            x = r.get(f)
            if x:
                lines.append(f"| {lab.get(f, f)} | {x['iops'] / 1000:,.1f}k | {x['p99_us']:,.0f} µs | "
                             f"{mib(x['hwm_max'])} | {ratio(x['iops'], r['qcow2']['iops'])} | "
                             f"{ratio(x['iops'], r['v1']['iops'])} |")
        lines.append("")
        checks.append((f"v2 random 4 KiB reads over {rd['size'] / GIB:.0f} GiB of written clusters >= qcow2",
                       ratio(r["v2"]["iops"], r["qcow2"]["iops"]), r["v2"]["iops"] >= r["qcow2"]["iops"]))
    if "flush" in v2:
        fl = v2["flush"]
        lines.append("#### FLUSH latency\n")
        lines.append(f"fio nbd engine, 4 KiB random writes over the whole 1 TiB disk, `--fsync=32`, "
                     f"iodepth 1 (exactly one FLUSH per 32 writes), {p['flush_runtime']} s per run; "
                     f"latency of fio's sync (the NBD FLUSH), on a fresh image with few clusters and "
                     f"on the large one of the open section, alternating, median of "
                     f"{p['flush_reps']} runs (max: the largest of them).\n")
        lines.append("| format | clusters | FLUSHes | p50 | p99 | p99.9 | max | write IOPS |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for f in ("v2", "v1"):
            x = fl.get(f)
            if not x:
                continue
            for which in ("small", "big"):
                m = x[which + "_median"]
                worst = max(r["max_ms"] for r in x[which])
                lines.append(f"| {lab.get(f, f)} | {x[which + '_clusters']:,} | {m['syncs']:,.0f} | "
                             f"{m['p50_ms']:.2f} ms | {m['p99_ms']:.2f} ms | {m['p999_ms']:.2f} ms | "
                             f"{worst:.1f} ms | {m['write_iops']:,.0f} |")
        lines.append("")
        for f in ("v2", "v1"):
            x = fl.get(f)
            if x:
                a, b = x["big_median"]["p999_ms"], x["small_median"]["p999_ms"]
                lines.append(f"{lab.get(f, f)}: p99.9 with {x['big_clusters']:,} clusters is "
                             f"{a / b:.2f}x the p99.9 with {x['small_clusters']:,}; p99 "
                             f"{x['big_median']['p99_ms'] / x['small_median']['p99_ms']:.2f}x.\n")
                if f == "v2":
                    checks.append((f"v2 FLUSH p99.9 with {x['big_clusters']:,} clusters <= 2x with "
                                   f"{x['small_clusters']:,}", f"{a / b:.2f}x", a <= 2 * b))
    if "dense" in v2:
        d = v2["dense"]
        s = d["flush32"]
        lines.append("#### Dense placement: 4 KiB random writes with a FLUSH every 32\n")
        lines.append(f"`benches/nbd_load.rs` (iodepth 16, one FLUSH per 32 writes), {p['runtime']} s "
                     f"after {p['ramp']} s ramp, median of {p['reps']}, servers alternating; a fresh "
                     f"overlay of nbd.py's 1 GiB random backing file each run (raw: nbdkit file on a "
                     f"copy).\n")
        lines.append("| server | IOPS | ÷ raw | peak RSS |")
        lines.append("|---|---|---|---|")
        for f in ("v2", "v1", "qcow2", "raw"):
            if f in s:
                lines.append(f"| {lab.get(f, f)} | {s[f]['iops'] / 1000:,.1f}k | "
                             f"{ratio(s[f]['iops'], s['raw']['iops'])} | {mib(s[f]['hwm_max'])} |")
        lines.append("")
        checks.append(("v2 4K random write + FLUSH/32 >= 0.9x raw limit",
                       ratio(s["v2"]["iops"], s["raw"]["iops"]), s["v2"]["iops"] >= 0.9 * s["raw"]["iops"]))
        wa = d.get("wa") or {}
        if wa:
            lines.append(f"Write amplification: {d['wa_bytes'] >> 20} MiB of distinct 4 KiB blocks, fio "
                         "`--fsync=32` at iodepth 1, on a fresh overlay; growth of the file's allocated "
                         "bytes after the server stopped, and the server's /proc/PID/io `write_bytes` "
                         "(what it handed the file system, metadata included), each per byte the "
                         "client wrote.\n")
            lines.append("| server | written | allocated growth | ratio | write_bytes | ratio |")
            lines.append("|---|---|---|---|---|---|")
            for f in ("v2", "v1", "qcow2"):
                if f in wa:
                    w = wa[f]
                    lines.append(f"| {lab.get(f, f)} | {mib(w['written'])} | {mib(w['grown'])} | "
                                 f"{w['grown_ratio']:.3f} | {mib(w['write_bytes'])} | "
                                 f"{w['write_bytes_ratio']:.3f} |")
            lines.append("")
            if "v2" in wa:
                w = wa["v2"]
                worst = max(w["grown_ratio"], w["write_bytes_ratio"])
                checks.append(("v2 write amplification <= 1.1 (allocated growth, write_bytes)",
                               f"{w['grown_ratio']:.3f}, {w['write_bytes_ratio']:.3f}", worst <= 1.1))
        other = d.get("other") or {}
        if other.get("v2"):
            wls = list(other["v2"])
            units = d.get("other_units", {})
            labels = d.get("other_labels", {})
            lines.append("nbd.py's other workloads (fresh overlay each run, fio, iodepth 16, "
                         f"median of {p['reps']}), v2 against v1:\n")
            lines.append("| workload | v2 | v1 | v2 ÷ v1 |")
            lines.append("|---|---|---|---|")
            for w in wls:
                unit = units.get(w, "IOPS")
                a, b = metric(other["v2"][w], unit), metric(other["v1"][w], unit)
                lines.append(f"| {labels.get(w, w)} ({unit}) | {fmt_value(a, unit)} | {fmt_value(b, unit)} | "
                             f"{ratio(a, b)} |")
                checks.append((f"v2 {labels.get(w, w)} >= v1", ratio(a, b), a >= b))
            lines.append("")
    if "space" in v2:
        sp = v2["space"]
        r = sp["results"]
        lines.append(f"#### Space under overwrite ({sp['size'] / MIB:,.0f} MiB disk)\n")
        lines.append(f"A libnbd client at depth 16 writes random 4 KiB blocks, one operation in "
                     f"{sp.get('trim_every', 5)} a TRIM of a random aligned 64 KiB, a FLUSH every "
                     f"{sp.get('flush_every', 32)}, until {sp['passes']} times the disk is written (or "
                     f"{sp.get('max_seconds', '-')} s); qemu-nbd with `--discard=unmap`. Live data: the "
                     "blocks the client wrote and did not trim since; block status: what NBD "
                     "`base:allocation` reports as data; allocated and apparent size of the file "
                     "after the server stopped; `check`: cowimg check's allocated / total "
                     "clusters (v2 counts 4 KiB blocks).\n")
        lines.append("| format | passes | ops/s | live data | block status data | allocated | apparent size | allocated ÷ live | apparent ÷ disk | check allocated |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for f in fmts:
            x = r.get(f)
            if not x:
                continue
            c = x.get("check") or {}
            chk = (f"{c['allocated-clusters'] / c['total-clusters'] * 100:.1f}%"
                   if c.get("total-clusters") else "-")
            lines.append(f"| {lab.get(f, f)} | {x.get('passes_done', x['written'] / sp['size']):.2f} | {x['iops']:,.0f} | "
                         f"{mib(x['live_bytes'])} | {mib(x['bs_data'])} | {mib(x['allocated'])} | "
                         f"{mib(x['apparent'])} | {ratio(x['allocated'], x['live_bytes'])} | "
                         f"{ratio(x['apparent'], sp['size'])} | {chk} |")
        lines.append("")
        x = r.get("v2")
        if x:
            a = x["allocated"] / x["live_bytes"]
            checks.append(("v2 after overwrites: allocated <= 1.1x live data", f"{a:.2f}x", a <= 1.1))
            bound = 1.25 * x["allocated"] + 64 * MIB
            checks.append(("v2 apparent size <= 1.25x allocated + 64 MiB (FORMAT-v2.md, \"Allocation\")",
                           f"{x['apparent'] / MIB:,.0f} MiB against {bound / MIB:,.0f} MiB",
                           x["apparent"] <= bound))
            c = x.get("check") or {}
            if c.get("total-clusters"):
                pct = c["allocated-clusters"] / c["total-clusters"]
                checks.append(("v2 `check` allocated <= 100% of the disk", f"{pct * 100:.1f}%", pct <= 1))
    if "depth" in v2:
        dp = v2["depth"]
        lines.append("#### Depth: a chain of 16 layers against one\n")
        lines.append(f"A {dp['size'] / MIB:,.0f} MiB disk; layer i of {dp['layers']} writes every other "
                     f"4 KiB block of the i-th sixteenth ({dp['blocks_per_layer']:,} blocks); the single "
                     f"layer holds the same blocks. fio random 4 KiB reads over the whole disk "
                     f"(iodepth 16, {p['runtime']} s), median of {p['reps']}, alternating.\n")
        lines.append("| format | 16-layer chain | single layer | chain ÷ single |")
        lines.append("|---|---|---|---|")
        for f in ("v2", "v1"):
            if f in dp:
                x = dp[f]
                lines.append(f"| {lab.get(f, f)} | {x['chain_iops'] / 1000:,.1f}k | "
                             f"{x['single_iops'] / 1000:,.1f}k | {x['ratio']:.2f}x |")
        lines.append("")
        if "v2" in dp:
            checks.append(("v2 reads through 16 layers >= 0.9x one layer", f"{dp['v2']['ratio']:.2f}x",
                           dp["v2"]["ratio"] >= 0.9))


def render_criterion(cr, lines):
    g = cr["groups"]
    lines.append("### Library micro-benchmarks (criterion)\n")
    lines.append("`cargo bench --bench image`: median time per 4 KiB operation; the plain file is "
                 "pread/pwrite on a `std::fs::File` on the same filesystem (tmpfs by default), "
                 "the limit.\n")
    lines.append("| operation | cowimg | plain file | cowimg ÷ plain |")
    lines.append("|---|---|---|---|")
    for group, impls in g.items():
        c = next((v for k, v in impls.items() if k.startswith("cowimg")), None)
        f = next((v for k, v in impls.items() if k.startswith("plain_file")), None)
        if c and f:
            lines.append(f"| {group} | {c['median_ns'] / 1000:.2f} µs | {f['median_ns'] / 1000:.2f} µs | "
                         f"{c['median_ns'] / f['median_ns']:.2f}x |")
    lines.append("")


def render():
    runs = sorted([d for d in RESULTS_DIR.iterdir() if d.is_dir() and d.name != "debug"],
                  key=lambda d: d.name, reverse=True) if RESULTS_DIR.exists() else []
    lines = ["# cowimg benchmark results", "",
             "Generated by `benches/report.py` from `benches/results/<run>/*.json`, newest run "
             "first. Run everything with `benches/run.sh` (`QUICK=1` for a fast pass); see "
             "the scripts' docstrings for the knobs.", ""]
    # The hand-written reading of the latest run (what limits the targets that are not met,
    # with the profiles behind it) goes first.
    analysis = BENCHES / "ANALYSIS.md"
    if analysis.exists():
        lines += [analysis.read_text().rstrip(), ""]
    for d in runs:
        parts = {n: load(d, f"{n}.json")
                 for n in ("nbd", "commit_convert", "scale", "exports", "criterion", "v2")}
        present = [v for v in parts.values() if v]
        if not present:
            continue
        m = present[0]["machine"]
        lines.append(f"## Run {d.name}{' (QUICK)' if m.get('quick') else ''}\n")
        lines.append(f"{m['date']} - {machine_line(m)}\n")
        if parts["nbd"] or parts["v2"]:
            v = (parts["nbd"] or parts["v2"])["versions"]
            lines.append(f"Versions: {v['cowimg']}; {v['qemu-nbd']}; {v['nbdkit']}; {v['fio']}.\n")
        checks = []
        body = []
        if parts["nbd"]:
            render_nbd(d, parts["nbd"], body, checks)
        if parts["commit_convert"]:
            render_cc(d, parts["commit_convert"], body, checks)
        if parts["scale"]:
            render_scale(parts["scale"], body, checks)
        if parts["exports"]:
            render_exports(parts["exports"], body, checks)
        if parts["criterion"]:
            render_criterion(parts["criterion"], body)
        if parts["v2"]:
            render_v2(parts["v2"], body, checks)
        if checks:
            lines.append("### Targets\n")
            lines.append("| target | measured | |")
            lines.append("|---|---|---|")
            for what, got, ok in checks:
                lines.append(f"| {what} | {got} | {verdict(ok)} |")
            lines.append("")
        lines.extend(body)
    (BENCHES / "RESULTS.md").write_text("\n".join(lines) + "\n")
    log("wrote", BENCHES / "RESULTS.md")


if __name__ == "__main__":
    if sys.argv[1:] == ["collect-criterion"]:
        collect_criterion()
    else:
        render()
