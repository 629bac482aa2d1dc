//! The control socket and `cowimg ctl`: list, stats, add, remove, flush, live snapshots
//! (under fio and under kill -9), and abuse of the socket itself.
mod nbd_support;

use cowimg::image::{Image, OpenOptions};
use nbd_support::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SIZE: u64 = 16 << 20;

struct Setup {
    dir: tempfile::TempDir,
    server: Server,
    control: PathBuf,
}

/// A server with export "disk" on disk.cow and a control socket.
fn serve_with_control(extra: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.cow");
    create_image(&img, SIZE);
    let control = dir.path().join("control.sock");
    let export = format!("disk={}", img.display());
    let control_arg = control.to_string_lossy().into_owned();
    let mut args = vec!["--export", &export, "--control", &control_arg];
    args.extend_from_slice(extra);
    let server = Server::start_with(dir.path(), &args);
    Setup {
        dir,
        server,
        control,
    }
}

/// Runs `cowimg ctl CONTROL --json ARGS`; returns (exit code, parsed stdout or stderr).
fn ctl(control: &Path, args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cowimg"))
        .arg("ctl")
        .arg(control)
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), v, stderr)
}

fn ctl_ok(control: &Path, args: &[&str]) -> Value {
    let (code, v, stderr) = ctl(control, args);
    assert_eq!(code, 0, "ctl {args:?}: {stderr}");
    v
}

/// Sends raw bytes as one request line and reads one reply line.
fn raw_request(control: &Path, line: &[u8]) -> Option<Value> {
    let mut s = UnixStream::connect(control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(line).ok()?;
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).ok()?;
    serde_json::from_str(&reply).ok()
}

fn connect(socket: &Path, name: &str) -> RawClient {
    let mut c = RawClient::connect(socket);
    assert_eq!(c.go_named(name), Ok(SIZE));
    c
}

#[test]
fn the_control_socket_is_private_to_its_owner() {
    let s = serve_with_control(&[]);
    let mode = std::fs::metadata(&s.control).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
}

#[test]
fn list_stats_add_flush_and_remove_work_through_ctl() {
    let s = serve_with_control(&[]);
    let other = s.dir.path().join("other.cow");
    create_image(&other, SIZE);
    let other_arg = other.to_string_lossy().into_owned();
    ctl_ok(&s.control, &["add", "other", &other_arg]);
    let list = ctl_ok(&s.control, &["list"]);
    let names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["disk", "other"]);

    let mut c = connect(&s.server.socket, "other");
    assert_eq!(c.call(CMD_WRITE, 0, 0, 65536, &[3; 65536]).error, 0);
    let stats = ctl_ok(&s.control, &["stats", "other"]);
    let e = &stats["exports"][0];
    assert_eq!(e["clients"], 1);
    assert_eq!(e["bytes_written"], 65536);
    assert_eq!(e["requests"], 1);
    assert_eq!(e["errors"], 0);
    assert!(e["allocated_bytes"].as_u64().unwrap() >= 65536, "{e}");
    assert!(e["file_size"].as_u64().unwrap() > 0);

    ctl_ok(&s.control, &["flush", "other"]);
    assert_eq!(read_image_shared(&other, 0, 4096), vec![3; 4096]);

    // Removal waits for the client unless forced; forcing flushes, then disconnects.
    assert_eq!(c.call(CMD_WRITE, 0, 65536, 4096, &[4; 4096]).error, 0);
    let (code, _, stderr) = ctl(&s.control, &["remove", "other"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("1 clients"), "{stderr}");
    ctl_ok(&s.control, &["remove", "other", "--force"]);
    assert!(c.is_closed());
    let list = ctl_ok(&s.control, &["list"]);
    assert_eq!(list["exports"].as_array().unwrap().len(), 1);
    // The image is closed and unlocked, with the write made before the removal in it.
    assert_eq!(read_image(&other, 65536, 4096), vec![4; 4096]);
    assert_check_clean(&other);
}

/// Reads an image another process holds open.
fn read_image_shared(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let image = Image::open(
        path,
        &OpenOptions {
            read_only: true,
            force_share: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut buf = vec![0u8; len];
    image.read_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn bad_requests_get_errors_and_leave_the_server_up() {
    let s = serve_with_control(&[]);
    let cases: [&[u8]; 6] = [
        b"this is not json\n",
        b"{\"command\": \"explode\"}\n",
        b"{\"command\": 7}\n",
        b"[1, 2, 3]\n",
        b"{\"command\": \"add\", \"export\": \"../../etc/x\", \"image\": \"/etc/passwd\"}\n",
        b"{\"command\": \"snapshot\", \"export\": \"nope\", \"image\": \"/tmp/x.cow\"}\n",
    ];
    for line in cases {
        let reply = raw_request(&s.control, line).expect("a reply");
        assert_eq!(reply["ok"], false, "{}", String::from_utf8_lossy(line));
        assert!(reply["error"].is_string());
    }
    // A huge line is refused without being buffered whole, and the connection closed.
    let mut huge = vec![b'x'; 1 << 20];
    huge.push(b'\n');
    if let Some(reply) = raw_request(&s.control, &huge) {
        assert_eq!(reply["ok"], false);
    }
    // The escaping name made no file, and the server still serves and answers.
    assert!(!s.dir.path().join("../../etc/x").exists() || Path::new("/etc/x").exists());
    let list = ctl_ok(&s.control, &["list"]);
    assert_eq!(list["exports"][0]["name"], "disk");
    let mut c = connect(&s.server.socket, "disk");
    assert_eq!(c.call(CMD_READ, 0, 0, 4096, &[]).error, 0);
}

#[test]
fn a_snapshot_moves_later_writes_to_the_new_top_without_disconnecting() {
    let s = serve_with_control(&[]);
    let mut c = connect(&s.server.socket, "disk");
    assert_eq!(c.call(CMD_WRITE, 0, 0, 4096, &[1; 4096]).error, 0);
    let new = s.dir.path().join("disk-1.cow");
    let new_arg = new.to_string_lossy().into_owned();
    let reply = ctl_ok(&s.control, &["snapshot", "disk", &new_arg]);
    assert!(reply["old_top"].as_str().unwrap().ends_with("disk.cow"));
    // Same connection: the old write reads through, a new one lands in the new top.
    assert_eq!(c.call(CMD_READ, 0, 0, 4096, &[]).data, vec![1; 4096]);
    assert_eq!(c.call(CMD_WRITE, 0, 4096, 4096, &[2; 4096]).error, 0);
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).error, 0);
    // The old top is a read-only layer now: another process may read it, not write it.
    let old = s.dir.path().join("disk.cow");
    assert_eq!(read_image(&old, 0, 4096), vec![1; 4096]);
    let writer = Image::open(&old, &OpenOptions::default());
    assert!(
        writer
            .as_ref()
            .is_err_and(|e| e.to_string().contains("in use")),
        "a writer of the old top was let in"
    );
    assert_eq!(read_image(&old, 4096, 4096), vec![0; 4096]);
    let list = ctl_ok(&s.control, &["list"]);
    assert!(list["exports"][0]["image"]
        .as_str()
        .unwrap()
        .ends_with("disk-1.cow"));
    drop(c);
    let mut server = s.server;
    server.stop();
    assert_check_clean(&old);
    assert_check_clean(&new);
    assert_eq!(read_image(&new, 0, 8192)[..4096], [1; 4096]);
    assert_eq!(read_image(&new, 0, 8192)[4096..], [2; 4096]);
}

fn fio(uri: &str, args: &[&str]) -> String {
    let out = Command::new("fio")
        .current_dir(std::env::temp_dir())
        .args([
            "--name=snap",
            "--ioengine=nbd",
            "--output-format=terse",
            "--terse-version=3",
            "--verify_state_save=0",
            "--randseed=1234",
        ])
        .arg(format!("--uri={uri}"))
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "fio failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in text.lines().filter(|l| l.starts_with("3;")) {
        assert_eq!(line.split(';').nth(4), Some("0"), "fio job failed: {line}");
    }
    text
}

#[test]
fn live_snapshots_during_fio_verify_lose_nothing() {
    if !have_tool("fio") {
        return;
    }
    let s = serve_with_control(&[]);
    let uri = s.server.uri().replace("/?socket", "/disk?socket");
    let job = [
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=12M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    ];
    let fio_uri = uri.clone();
    let writer = std::thread::spawn(move || fio(&fio_uri, &job));
    let mut tops = vec![s.dir.path().join("disk.cow")];
    let mut during = 0;
    for i in 1..=3 {
        std::thread::sleep(Duration::from_millis(150));
        let new = s.dir.path().join(format!("disk-{i}.cow"));
        ctl_ok(&s.control, &["snapshot", "disk", &new.to_string_lossy()]);
        tops.push(new);
        during += usize::from(!writer.is_finished());
    }
    assert!(during > 0, "fio finished before the first snapshot");
    writer.join().expect("fio reported no error");
    let mut server = s.server;
    server.stop();
    for t in &tops {
        assert_check_clean(t);
    }
    // The chain, served again from its top, reads back exactly what fio wrote.
    let top = tops.last().unwrap();
    let again = Server::start(s.dir.path(), top, &["--read-only"]);
    let mut verify_only = job.to_vec();
    verify_only.push("--verify_only=1");
    fio(&again.uri(), &verify_only);
}

/// Block contents that name the block and the generation, so that a torn or stale
/// block cannot pass for the one expected.
fn block_data(block: u64, generation: u32) -> Vec<u8> {
    let mut d = pattern(4096, block * 4096, generation as u8);
    d[..8].copy_from_slice(&block.to_be_bytes());
    d[8..12].copy_from_slice(&generation.to_be_bytes());
    d
}

#[test]
fn kill_9_around_a_snapshot_leaves_images_that_open_and_hold_every_flushed_write() {
    const BLOCKS: u64 = 256;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for cycle in 0..10 {
        let s = serve_with_control(&[]);
        let socket = s.server.socket.clone();
        let control = s.control.clone();
        let new = s.dir.path().join("disk-1.cow");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        // One writer: write a block, flush, record it as durable; until the server dies.
        let writer = std::thread::spawn(move || {
            let mut durable = std::collections::HashMap::new();
            let Ok(stream) = UnixStream::connect(&socket) else {
                return durable;
            };
            let mut c = RawClient::over(Stream::Unix(stream));
            if c.go_named("disk").is_err() {
                return durable;
            }
            for generation in 1u32.. {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let block = generation as u64 % BLOCKS;
                let data = block_data(block, generation);
                let Some(r) = try_call(&mut c, CMD_WRITE, block * 4096, &data) else {
                    break;
                };
                assert_eq!(r, 0);
                let Some(r) = try_call(&mut c, CMD_FLUSH, 0, &[]) else {
                    break;
                };
                assert_eq!(r, 0);
                durable.insert(block, generation);
            }
            durable
        });
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..120)));
        let snapshot = {
            let control = control.clone();
            let new = new.clone();
            std::thread::spawn(move || {
                let _ = ctl(&control, &["snapshot", "disk", &new.to_string_lossy()]);
            })
        };
        // `cowimg ctl` takes some milliseconds to start: kill before, during and after.
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
        // SAFETY: kill(2) of the server child, by its pid.
        unsafe { libc::kill(s.server.pid() as i32, libc::SIGKILL) };
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let durable = writer.join().unwrap();
        snapshot.join().unwrap();
        eprintln!(
            "cycle {cycle}: {} blocks flushed, snapshot {}",
            durable.len(),
            if new.exists() { "made" } else { "not made" }
        );
        drop(s.server);

        let old = s.dir.path().join("disk.cow");
        let mut layers = vec![old.clone()];
        if new.exists() {
            layers.push(new.clone());
        }
        for l in &layers {
            let report = cowimg::image::ops::check(l, false).expect("check runs");
            assert!(
                report.corruptions.is_empty(),
                "cycle {cycle}: {} corrupt after kill -9: {report:?}",
                l.display()
            );
        }
        let top = Image::open(
            layers.last().unwrap(),
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("cycle {cycle}: the chain does not open: {e}"));
        let mut buf = vec![0u8; 4096];
        for (&block, &generation) in &durable {
            top.read_at(&mut buf, block * 4096).unwrap();
            let found = u32::from_be_bytes(buf[8..12].try_into().unwrap());
            // The last write to a block may have been sent after its flush was recorded.
            assert!(
                found >= generation && buf == block_data(block, found),
                "cycle {cycle}: block {block} holds generation {found}, flushed {generation}"
            );
        }
    }
}

/// One request; `None` once the server is gone.
fn try_call(c: &mut RawClient, command: u16, offset: u64, data: &[u8]) -> Option<u32> {
    let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&command.to_be_bytes());
    m.extend_from_slice(&1u64.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    c.try_send(&m).ok()?;
    c.try_simple_reply()
}
