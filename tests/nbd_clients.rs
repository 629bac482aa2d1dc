//! Real NBD clients (libnbd's nbdinfo/nbdcopy, qemu-io/qemu-img, fio, nbd-client) against
//! `cowimg serve`.
mod nbd_support;

use cowimg::format::BackingFormat;
use cowimg::image::{Image, OpenOptions};
use nbd_support::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

/// A three-layer chain with known contents:
/// - `base.raw`, 4 MiB: 0xaa at [2M, 3M), holes elsewhere;
/// - `mid.cow`, 16 MiB, backed by it: 0xbb at [4M, 5M);
/// - `top.cow`, backed by mid: 0xcc at [0, 64K), zeroes written over [8M, 9M).
fn make_chain(dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base.raw");
    let f = std::fs::File::create(&base).unwrap();
    f.set_len(4 * MIB).unwrap();
    f.write_all_at(&vec![0xaa; MIB as usize], 2 * MIB).unwrap();
    let mid = dir.join("mid.cow");
    let opts = cowimg::image::CreateOptions {
        size: Some(16 * MIB),
        backing: Some(("base.raw".into(), BackingFormat::Raw)),
        ..Default::default()
    };
    Image::create(&mid, &opts).unwrap();
    {
        let img = Image::open(&mid, &OpenOptions::default()).unwrap();
        img.write_at(&vec![0xbb; MIB as usize], 4 * MIB).unwrap();
        img.flush().unwrap();
    }
    let top = dir.join("top.cow");
    create_overlay(&top, &mid, BackingFormat::Cowimg);
    let img = Image::open(&top, &OpenOptions::default()).unwrap();
    img.write_at(&vec![0xcc; 65536], 0).unwrap();
    img.write_zeroes(8 * MIB, MIB).unwrap();
    img.flush().unwrap();
    top
}

/// Parses `nbdinfo --map` output into (offset, length, value) rows.
fn parse_map(out: &str) -> Vec<(u64, u64, u32)> {
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
            ))
        })
        .collect()
}

fn value_at(map: &[(u64, u64, u32)], offset: u64) -> u32 {
    map.iter()
        .find(|(o, l, _)| *o <= offset && offset < o + l)
        .unwrap_or_else(|| panic!("offset {offset} not in map {map:?}"))
        .2
}

#[test]
fn nbdinfo_sees_multi_conn_size_contexts_and_maps() {
    if !have_tool("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = make_chain(dir.path());
    let mut server = Server::start(dir.path(), &top, &["--export-name", "disk"]);
    let uri = format!("nbd+unix:///disk?socket={}", server.socket.display());

    let json: serde_json::Value =
        serde_json::from_str(&run(Command::new("nbdinfo").arg("--json").arg(&uri))).unwrap();
    let export = &json["exports"][0];
    assert_eq!(export["export-size"], 16 * MIB);
    assert_eq!(export["can_multi_conn"], true);
    assert_eq!(export["can_flush"], true);
    assert_eq!(export["can_fua"], true);
    assert_eq!(export["can_trim"], true);
    assert_eq!(export["can_zero"], true);
    assert_eq!(export["can_fast_zero"], true);
    assert_eq!(export["can_cache"], true);
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["block_size_maximum"], 32 * MIB);
    let contexts: Vec<&str> = export["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert!(
        contexts.contains(&"base:allocation") && contexts.contains(&"cowimg:layer"),
        "{contexts:?}"
    );

    let alloc = parse_map(&run(Command::new("nbdinfo").arg("--map").arg(&uri)));
    assert_eq!(
        alloc.iter().map(|r| r.1).sum::<u64>(),
        16 * MIB,
        "{alloc:?}"
    );
    assert_eq!(value_at(&alloc, 0), 0, "written data");
    assert_eq!(value_at(&alloc, 2 * MIB + 4096), 0, "raw base data");
    assert_eq!(value_at(&alloc, 4 * MIB + 4096), 0, "mid data");
    assert_eq!(value_at(&alloc, 6 * MIB), 3, "unallocated");
    assert_eq!(value_at(&alloc, 8 * MIB + 4096), 3, "written zeroes");
    assert_eq!(value_at(&alloc, 12 * MIB), 3, "unallocated");

    let layer = parse_map(&run(Command::new("nbdinfo")
        .arg("--map=cowimg:layer")
        .arg(&uri)));
    assert_eq!(
        layer.iter().map(|r| r.1).sum::<u64>(),
        16 * MIB,
        "{layer:?}"
    );
    let expect = [
        (0, 1),
        (65536 - 1, 1),
        (65536, 3),
        (2 * MIB, 3),
        (3 * MIB + 5, 3),
        (4 * MIB, 2),
        (5 * MIB - 1, 2),
        (5 * MIB, 0),
        (8 * MIB, 1),
        (9 * MIB - 1, 1),
        (9 * MIB, 0),
        (16 * MIB - 1, 0),
    ];
    for (offset, value) in expect {
        assert_eq!(
            value_at(&layer, offset),
            value,
            "cowimg:layer at {offset}: {layer:?}"
        );
    }

    // Another name is refused with a message rather than a dropped connection.
    let wrong = format!("nbd+unix:///other?socket={}", server.socket.display());
    let out = Command::new("nbdinfo").arg(&wrong).output().unwrap();
    assert!(
        !out.status.success(),
        "nbdinfo accepted export name \"other\""
    );

    server.stop();
    assert!(
        server.log().contains("contexts cowimg:layer"),
        "{}",
        server.log()
    );
}

#[test]
fn read_only_export_is_advertised_and_refuses_writes() {
    if !have_tool("nbdinfo") || !have_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = make_chain(dir.path());
    let mut server = Server::start(dir.path(), &top, &["--read-only"]);
    let json: serde_json::Value = serde_json::from_str(&run(Command::new("nbdinfo")
        .arg("--json")
        .arg(server.uri())))
    .unwrap();
    assert_eq!(json["exports"][0]["is_read_only"], true);
    assert_eq!(json["exports"][0]["can_trim"], false);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &server.uri(), "-c", "write -P 0x01 0 4k"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() || text.contains("failed"),
        "write to a read-only export succeeded: {text}"
    );
    server.stop();
    let b = read_image(&top, 0, 4096);
    assert!(b.iter().all(|&x| x == 0xcc));
}

/// A raw source with data, holes and runs of zeros, for copies.
fn make_source(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, off) in [0u64, 300_000, 2 * MIB, 2 * MIB + 700_000, 5 * MIB + 4096]
        .iter()
        .enumerate()
    {
        f.write_all_at(&pattern(200_000, *off, i as u8), *off)
            .unwrap();
    }
    f.write_all_at(&vec![0u8; 500_000], 6 * MIB).unwrap();
    f.write_all_at(&pattern(1000, size - 1000, 9), size - 1000)
        .unwrap();
}

#[test]
fn nbdcopy_round_trips_raw_files() {
    if !have_tool("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let src = dir.path().join("src.raw");
    make_source(&src, size);
    let img = dir.path().join("disk.cow");
    create_image(&img, size);
    let mut server = Server::start(dir.path(), &img, &[]);
    run(Command::new("nbdcopy").arg(&src).arg(server.uri()));
    let back = dir.path().join("back.raw");
    run(Command::new("nbdcopy").arg(server.uri()).arg(&back));
    server.stop();
    let a = std::fs::read(&src).unwrap();
    assert_eq!(
        a,
        std::fs::read(&back).unwrap(),
        "copy through the server differs"
    );
    let b = read_image(&img, 0, size as usize);
    assert!(a == b, "image contents differ from the source");
    assert_check_clean(&img);
}

/// The same qemu-io commands against a raw reference file and over NBD.
const QEMU_IO_COMMANDS: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 65000 70000",
    "write -f -P 0x33 1M 1M",
    "write -z 1536k 256k",
    "write -z -u 1800k 300k",
    "discard 2M 128k",
    "aio_write -P 0x44 3M 64k",
    "aio_write -P 0x55 3200k 64k",
    "aio_write -P 0x66 4M 4k 4k 4k",
    "aio_flush",
    "flush",
    "write -P 0x77 7M 1M",
    "write -P 0x88 8388000 608",
    "write -P 0x99 4095 2",
    "read -P 0x11 8k 52k",
    "read -P 0x99 4095 2",
    "read -P 0x33 1M 512k",
    "read -P 0x0 1536k 256k",
    "read -P 0x44 3M 64k",
    "read -P 0x88 8388000 608",
];

fn qemu_io(format_and_target: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(format_and_target);
    for c in QEMU_IO_COMMANDS {
        cmd.arg("-c").arg(c);
    }
    let out = run(&mut cmd);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

fn qemu_io_matches_reference(with_backing: bool) {
    if !have_tool("qemu-io") || !have_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let reference = dir.path().join("ref.raw");
    let img = dir.path().join("disk.cow");
    if with_backing {
        let base = dir.path().join("base.raw");
        make_source(&base, size);
        std::fs::copy(&base, &reference).unwrap();
        create_overlay(&img, &base, BackingFormat::Raw);
    } else {
        std::fs::File::create(&reference)
            .unwrap()
            .set_len(size)
            .unwrap();
        create_image(&img, size);
    }
    qemu_io(&["-f", "raw", reference.to_str().unwrap()]);
    let mut server = Server::start(dir.path(), &img, &[]);
    let uri = server.uri();
    qemu_io(&["-f", "raw", &uri]);
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&reference)
        .arg(&uri));
    server.stop();
    assert_check_clean(&img);
    // And the image itself, reopened, holds the same bytes.
    let b = read_image(&img, 0, size as usize);
    assert!(
        b == std::fs::read(&reference).unwrap(),
        "reopened image differs from the reference"
    );
}

#[test]
fn qemu_io_commands_leave_the_same_bytes_as_on_a_raw_file() {
    qemu_io_matches_reference(false);
}

#[test]
fn qemu_io_commands_on_an_overlay_leave_the_same_bytes_as_on_a_raw_copy() {
    qemu_io_matches_reference(true);
}

#[test]
fn qemu_img_convert_and_map_work_over_nbd() {
    if !have_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = make_chain(dir.path());
    let mut server = Server::start(dir.path(), &top, &[]);
    let out = dir.path().join("out.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &server.uri()])
        .arg(&out));
    let map =
        run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &server.uri()]));
    server.stop();
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes.len() as u64, 16 * MIB);
    assert!(bytes[..65536].iter().all(|&b| b == 0xcc));
    assert!(bytes[2 * MIB as usize..3 * MIB as usize]
        .iter()
        .all(|&b| b == 0xaa));
    assert!(bytes[4 * MIB as usize..5 * MIB as usize]
        .iter()
        .all(|&b| b == 0xbb));
    assert!(bytes[5 * MIB as usize..].iter().all(|&b| b == 0));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let zero_at_8m = map.as_array().unwrap().iter().any(|e| {
        e["start"].as_u64().unwrap() <= 8 * MIB
            && e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap() >= 9 * MIB
            && e["zero"] == true
    });
    assert!(
        zero_at_8m,
        "qemu-img map does not show [8M, 9M) as zero: {map}"
    );
}

fn fio(uri: &str, args: &[&str]) {
    let out = run(Command::new("fio")
        .current_dir(std::env::temp_dir())
        .args([
            "--name=nbd",
            "--ioengine=nbd",
            "--output-format=terse",
            "--terse-version=3",
            "--verify_state_save=0",
        ])
        .arg(format!("--uri={uri}"))
        .args(args));
    // Terse v3: field 5 is the job's error code.
    for line in out.lines().filter(|l| l.starts_with("3;")) {
        assert_eq!(line.split(';').nth(4), Some("0"), "fio job failed: {line}");
    }
}

#[test]
fn fio_writes_verify_with_crc32c_over_several_connections() {
    if !have_tool("fio") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.cow");
    create_image(&img, 64 * MIB);
    let mut server = Server::start(dir.path(), &img, &[]);
    let uri = server.uri();
    let verify = ["--verify=crc32c", "--do_verify=1", "--verify_fatal=1"];
    let mut a = vec!["--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M"];
    a.extend(verify);
    fio(&uri, &a);
    let mut b = vec![
        "--rw=write",
        "--bs=1M",
        "--iodepth=16",
        "--size=16M",
        "--numjobs=4",
        "--offset_increment=16M",
    ];
    b.extend(verify);
    fio(&uri, &b);
    let mut c = vec![
        "--rw=randwrite",
        "--bsrange=512-128k",
        "--iodepth=8",
        "--size=8M",
        "--offset=40M",
    ];
    c.extend(verify);
    fio(&uri, &c);
    server.stop();
    assert_check_clean(&img);
}

fn nbd_client_negotiates(server: &Server, target: &[&str], extra: &[&str]) {
    let out = Command::new("timeout")
        .arg("20")
        .arg("nbd-client")
        .args(target)
        .arg("/dev/nbd0")
        .args(extra)
        .arg("-nofork")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Negotiation: ..size = 32MB"),
        "nbd-client {target:?} {extra:?} did not negotiate:\n{text}\nserver log:\n{}",
        server.log()
    );
}

#[test]
fn nbd_client_negotiates_over_tcp_and_unix_with_go_and_export_name() {
    if !have_tool("nbd-client") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.cow");
    create_image(&img, 32 * MIB);
    let mut tcp = Server::start_tcp(&img, &[]);
    let addr = tcp.tcp.clone().unwrap();
    let (host, port) = addr.rsplit_once(':').unwrap();
    nbd_client_negotiates(&tcp, &[host, port], &[]);
    nbd_client_negotiates(&tcp, &[host, port], &["-g"]);
    tcp.stop();
    let log = tcp.log();
    assert!(
        log.contains("via GO") && log.contains("via EXPORT_NAME"),
        "expected one GO and one EXPORT_NAME session:\n{log}"
    );

    let mut unix = Server::start(dir.path(), &img, &[]);
    let sock = unix.socket.to_string_lossy().into_owned();
    nbd_client_negotiates(&unix, &["-unix", &sock], &[]);
    nbd_client_negotiates(&unix, &["-unix", &sock], &["-g"]);
    unix.stop();
    let log = unix.log();
    assert!(
        log.contains("via GO") && log.contains("via EXPORT_NAME"),
        "expected one GO and one EXPORT_NAME session:\n{log}"
    );
}
