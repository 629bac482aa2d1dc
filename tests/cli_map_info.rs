//! `cowimg map`, `cowimg info` and `cowimg create`: what they report, checked against what
//! was written and against the files themselves.
mod cli_support;
use cli_support::*;
use serde_json::Value;
use std::path::Path;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const UNIT: u64 = 4 * KIB;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    Zero,
}

fn num(e: &Value, key: &str) -> u64 {
    e[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {e}"))
}

/// A 4 MiB raw base: random data in the first 3 MiB, a hole in the last.
fn make_sparse_base(d: &Path) {
    let file = std::fs::File::create(d.join("base.raw")).expect("creating base.raw");
    file.set_len(4 * MIB).expect("sizing base.raw");
    std::os::unix::fs::FileExt::write_all_at(&file, &random_bytes(3 * MIB as usize, 5), 0)
        .expect("writing base.raw");
}

#[test]
fn map_json_shows_what_was_written_discarded_and_left_to_the_backing_file() {
    let dir = tempdir();
    let d = dir.path();
    make_sparse_base(d);
    cowimg_in(d, &["create", "-b", "base.raw", "-F", "raw", "top.cow"]).ok();
    cowimg_io(
        d,
        "top.cow",
        &[
            "write -P 1 64K 8K",
            "write -P 2 100000 10",
            "write -z 256K 64K",
            "discard 1M 128K",
            "discard 3076K 4K",
            "write -P 3 3584K 4K",
        ],
    )
    .ok();
    // Expected state of every 4K unit: (depth, kind). The backing file holds data below
    // 3 MiB and a hole above; a partial write owns its whole unit.
    let mut expected: Vec<(u64, Kind)> = (0..4 * MIB / UNIT)
        .map(|u| {
            (
                1,
                if u * UNIT < 3 * MIB {
                    Kind::Data
                } else {
                    Kind::Zero
                },
            )
        })
        .collect();
    let mut own = |start: u64, len: u64, kind: Kind| {
        for u in start / UNIT..(start + len).div_ceil(UNIT) {
            expected[u as usize] = (0, kind);
        }
    };
    own(64 * KIB, 8 * KIB, Kind::Data);
    own(100000, 10, Kind::Data);
    own(256 * KIB, 64 * KIB, Kind::Zero);
    own(MIB, 128 * KIB, Kind::Zero);
    own(3076 * KIB, 4 * KIB, Kind::Zero);
    own(3584 * KIB, 4 * KIB, Kind::Data);

    let map = json(&cowimg_in(d, &["map", "--json", "top.cow"]).ok());
    let merged = contents(d, "top.cow");
    let top_file = read_file(&d.join("top.cow"));
    let base_file = read_file(&d.join("base.raw"));
    let mut pos = 0;
    for e in map.as_array().expect("an array") {
        let (start, length, depth) = (num(e, "start"), num(e, "length"), num(e, "depth"));
        assert_eq!(start, pos, "entries are contiguous: {e}");
        assert_eq!(e["compressed"], false);
        assert_eq!(e["present"], true, "every range comes from some layer: {e}");
        let kind = if e["data"] == true {
            assert_eq!(e["zero"], false, "{e}");
            Kind::Data
        } else {
            assert_eq!(e["zero"], true, "{e}");
            Kind::Zero
        };
        for u in start / UNIT..(start + length) / UNIT {
            assert_eq!(
                expected[u as usize],
                (depth, kind),
                "unit at {:#x} in {e}",
                u * UNIT
            );
        }
        // Where a range has a host offset, that is where its bytes are.
        let range = start as usize..(start + length) as usize;
        match (depth, kind) {
            (0, Kind::Data) => {
                let host = num(e, "offset") as usize;
                assert_eq!(&top_file[host..host + range.len()], &merged[range], "{e}");
            }
            (0, Kind::Zero) => assert!(e.get("offset").is_none(), "{e}"),
            _ => {
                assert_eq!(num(e, "offset"), start, "a raw file maps 1:1: {e}");
                assert_eq!(&base_file[range.clone()], &merged[range], "{e}");
            }
        }
        pos += length;
    }
    assert_eq!(pos, 4 * MIB, "the map covers the whole virtual size");
}

#[test]
fn map_of_an_image_without_backing_shows_unallocated_ranges_as_absent_zeros() {
    let dir = tempdir();
    let d = dir.path();
    cowimg_in(d, &["create", "-s", "1M", "img.cow"]).ok();
    cowimg_io(d, "img.cow", &["write 512K 4K"]).ok();
    let map = json(&cowimg_in(d, &["map", "--json", "img.cow"]).ok());
    let summary: Vec<(u64, u64, bool, bool, bool)> = map
        .as_array()
        .expect("an array")
        .iter()
        .map(|e| {
            assert_eq!(num(e, "depth"), 0);
            let b = |k: &str| e[k].as_bool().expect("a bool");
            (
                num(e, "start"),
                num(e, "length"),
                b("present"),
                b("zero"),
                b("data"),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (0, 512 * KIB, false, true, false),
            (512 * KIB, 4 * KIB, true, false, true),
            (516 * KIB, 508 * KIB, false, true, false),
        ]
    );
}

#[test]
fn human_map_lists_data_ranges_with_the_file_that_holds_them() {
    let dir = tempdir();
    let d = dir.path();
    make_sparse_base(d);
    cowimg_in(d, &["create", "-b", "base.raw", "-F", "raw", "top.cow"]).ok();
    cowimg_io(d, "top.cow", &["write 0 64K", "write -z 1M 2M"]).ok();
    let out = cowimg_in(d, &["map", "top.cow"]).ok();
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["Offset", "Length", "Mapped", "to", "File"]);
    assert_eq!(rows.len(), 3, "{out}");
    assert_eq!(
        (rows[1][0], rows[1][1], rows[1][3]),
        ("0", "0x10000", "top.cow")
    );
    assert_eq!(rows[2], ["0x10000", "0xf0000", "0x10000", "base.raw"]);
}

#[test]
fn info_json_names_the_recorded_and_the_resolved_backing_file() {
    let dir = tempdir();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).expect("mkdir");
    write_file(&d.join("sub/base.raw"), &random_bytes(3 * MIB as usize, 9));
    // Recorded relative to the overlay's directory, not to the working directory.
    let out = cowimg_in(
        d,
        &[
            "create",
            "-c",
            "16K",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "sub/top.cow",
        ],
    )
    .ok();
    assert_eq!(
        out,
        "Formatting 'sub/top.cow', fmt=cowimg cluster_size=16384 backing_file=base.raw \
         backing_fmt=raw size=3145728\n"
    );
    let info = json(&cowimg_in(d, &["info", "--json", "sub/top.cow"]).ok());
    assert_eq!(info["filename"], "sub/top.cow");
    assert_eq!(info["format"], "cowimg");
    assert_eq!(info["virtual-size"], 3 * MIB);
    assert_eq!(info["cluster-size"], 16384);
    assert_eq!(info["backing-filename"], "base.raw");
    assert_eq!(info["full-backing-filename"], "sub/base.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(info["dirty-flag"], false);
    assert_eq!(info["format-specific"]["type"], "cowimg");
    assert_eq!(info["format-specific"]["data"]["sub-cluster-size"], 4096);
    assert!(num(&info, "actual-size") > 0);

    let human = cowimg_in(d, &["info", "sub/top.cow"]).ok();
    for line in [
        "image: sub/top.cow",
        "file format: cowimg",
        "virtual size: 3 MiB (3145728 bytes)",
        "cluster_size: 16384",
        "backing file: base.raw (actual path: sub/base.raw)",
        "backing file format: raw",
    ] {
        assert!(human.lines().any(|l| l == line), "no {line:?} in:\n{human}");
    }
}

#[test]
fn info_backing_chain_lists_every_layer_down_to_the_raw_file() {
    let dir = tempdir();
    let d = dir.path();
    make_sparse_base(d);
    cowimg_in(d, &["create", "-b", "base.raw", "-F", "raw", "mid.cow"]).ok();
    cowimg_in(
        d,
        &[
            "create", "-s", "8M", "-b", "mid.cow", "-F", "cowimg", "top.cow",
        ],
    )
    .ok();
    let chain = json(&cowimg_in(d, &["info", "--json", "--backing-chain", "top.cow"]).ok());
    let layers = chain.as_array().expect("an array");
    let names: Vec<(&str, &str, u64)> = layers
        .iter()
        .map(|l| {
            let s = |k: &str| l[k].as_str().expect("a string");
            (s("filename"), s("format"), num(l, "virtual-size"))
        })
        .collect();
    assert_eq!(
        names,
        [
            ("top.cow", "cowimg", 8 * MIB),
            ("mid.cow", "cowimg", 4 * MIB),
            ("base.raw", "raw", 4 * MIB)
        ]
    );
    assert_eq!(layers[1]["backing-filename-format"], "raw");
    assert!(layers[2].get("cluster-size").is_none());
    // The raw file's last MiB is a hole.
    assert!(
        num(&layers[2], "actual-size") <= 3 * MIB + 64 * KIB,
        "{}",
        layers[2]
    );

    let human = cowimg_in(d, &["info", "--backing-chain", "top.cow"]).ok();
    assert_eq!(human.matches("image: ").count(), 3, "{human}");
    assert!(
        human.contains("\n\nimage: base.raw\nfile format: raw\n"),
        "{human}"
    );
}

#[test]
fn info_works_when_the_backing_file_is_missing_but_the_chain_does_not() {
    let dir = tempdir();
    let d = dir.path();
    make_sparse_base(d);
    cowimg_in(d, &["create", "-b", "base.raw", "-F", "raw", "top.cow"]).ok();
    std::fs::remove_file(d.join("base.raw")).expect("removing base.raw");
    let info = json(&cowimg_in(d, &["info", "--json", "top.cow"]).ok());
    assert_eq!(info["virtual-size"], 4 * MIB);
    let run = cowimg_in(d, &["info", "--backing-chain", "top.cow"]);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("base.raw: opening: No such file"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_16_tib_overlay_is_created_written_and_inspected_cheaply() {
    let dir = tempdir();
    let d = dir.path();
    cowimg_in(d, &["create", "img.cow", "16T"]).ok();
    cowimg_io(
        d,
        "img.cow",
        &[
            "write 0 64K",
            "write -P 1 15T 4k",
            "discard 8T 1G",
            "read -P 1 15T 4k",
        ],
    )
    .ok();
    let info = json(&cowimg_in(d, &["info", "--json", "img.cow"]).ok());
    assert_eq!(info["virtual-size"], 16u64 << 40);
    assert!(num(&info, "actual-size") < 4 * MIB, "{info}");
    let map = json(&cowimg_in(d, &["map", "--json", "img.cow"]).ok());
    let entries = map.as_array().expect("an array");
    assert_eq!(entries.len(), 4, "{map}");
    let end = entries.last().map(|e| num(e, "start") + num(e, "length"));
    assert_eq!(end, Some(16u64 << 40));
}

#[test]
fn create_takes_the_size_from_the_backing_file_or_a_positional_argument() {
    let dir = tempdir();
    let d = dir.path();
    make_sparse_base(d);
    cowimg_in(d, &["create", "-b", "base.raw", "-F", "raw", "a.cow"]).ok();
    cowimg_in(d, &["create", "-b", "base.raw", "-F", "raw", "b.cow", "1G"]).ok();
    cowimg_in(d, &["create", "-f", "cowimg", "-c", "2M", "c.cow", "1.5G"]).ok();
    let field =
        |image: &str, key: &str| num(&json(&cowimg_in(d, &["info", "--json", image]).ok()), key);
    assert_eq!(field("a.cow", "virtual-size"), 4 * MIB);
    assert_eq!(field("b.cow", "virtual-size"), 1 << 30);
    assert_eq!(field("c.cow", "virtual-size"), 1536 * MIB);
    assert_eq!(field("c.cow", "cluster-size"), 2 * MIB);
}

#[test]
fn create_refuses_a_backing_file_without_its_format_and_an_existing_file() {
    let dir = tempdir();
    let d = dir.path();
    make_sparse_base(d);
    let run = cowimg_in(d, &["create", "-b", "base.raw", "top.cow"]);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("backing format must be given with -F"),
        "{}",
        run.stderr
    );
    assert!(!d.join("top.cow").exists());

    let run = cowimg_in(d, &["create", "-s", "1M", "base.raw"]);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("base.raw: creating: File exists"),
        "{}",
        run.stderr
    );
    assert_eq!(
        std::fs::metadata(d.join("base.raw")).expect("stat").len(),
        4 * MIB
    );

    let run = cowimg_in(d, &["create", "none.cow"]);
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("a size is needed"), "{}", run.stderr);
}

#[test]
fn info_shows_a_file_without_the_cowimg_magic_as_raw() {
    let dir = tempdir();
    let d = dir.path();
    make_sparse_base(d);
    let info = json(&cowimg_in(d, &["info", "--json", "base.raw"]).ok());
    assert_eq!(info["format"], "raw");
    assert_eq!(info["virtual-size"], 4 * MIB);
    assert!(info.get("cluster-size").is_none(), "{info}");
    let human = cowimg_in(d, &["info", "base.raw"]).ok();
    assert!(
        human.starts_with(
            "image: base.raw\nfile format: raw\nvirtual size: 4 MiB (4194304 bytes)\n"
        ),
        "{human}"
    );
}

/// (start, length, depth, present, zero, data) with adjacent equal runs merged: host
/// offsets differ between formats, the rest must not.
fn normalized_map(map: &Value) -> Vec<(u64, u64, u64, bool, bool, bool)> {
    let mut out: Vec<(u64, u64, u64, bool, bool, bool)> = Vec::new();
    for e in map.as_array().expect("an array") {
        let b = |k: &str| e[k].as_bool().expect("a bool");
        let entry = (
            num(e, "start"),
            num(e, "length"),
            num(e, "depth"),
            b("present"),
            b("zero"),
            b("data"),
        );
        match out.last_mut() {
            Some(last)
                if last.0 + last.1 == entry.0
                    && (last.2, last.3, last.4, last.5) == (entry.2, entry.3, entry.4, entry.5) =>
            {
                last.1 += entry.1
            }
            _ => out.push(entry),
        }
    }
    out
}

#[test]
fn map_json_agrees_with_qemu_img_map_of_a_qcow2_overlay() {
    if !have_tool("qemu-img") || !have_tool("qemu-io") {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    make_sparse_base(d);
    // Cluster-aligned, so that qcow2's 64K clusters and cowimg's 4K units agree.
    let writes = [
        "write -P 1 64K 128K",
        "write -z 512K 64K",
        "discard 1M 192K",
        "write -P 2 3M 64K",
        "discard 3712K 64K",
    ];
    cowimg_in(d, &["create", "-b", "base.raw", "-F", "raw", "top.cow"]).ok();
    cowimg_io(d, "top.cow", &writes).ok();
    qemu_in(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
        ],
    )
    .ok();
    let mut args = vec!["-f", "qcow2", "top.qcow2"];
    for w in writes {
        args.extend(["-c", w]);
    }
    qemu_in(d, "qemu-io", &args).ok();

    let ours = json(&cowimg_in(d, &["map", "--json", "top.cow"]).ok());
    let theirs = json(&qemu_in(d, "qemu-img", &["map", "--output=json", "top.qcow2"]).ok());
    assert_eq!(normalized_map(&ours), normalized_map(&theirs));
    qemu_in(
        d,
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", "top.qcow2", "q.raw"],
    )
    .ok();
    assert_same_bytes(
        &contents(d, "top.cow"),
        &read_file(&d.join("q.raw")),
        "same contents",
    );
}
