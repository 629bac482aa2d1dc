//! `cowimg attach` and `cowimg detach` end to end: a real block device (the kernel's NBD
//! client where it exists, nbdfuse and a loop device otherwise), written through, detached,
//! and the image checked afterwards. Needs root, nbdfuse and losetup.
mod nbd_support;

use nbd_support::*;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

const SIZE: u64 = 16 << 20;

fn cowimg(run_dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cowimg"))
        .args(args)
        .env("COWIMG_RUN_DIR", run_dir)
        .output()
        .expect("running cowimg")
}

fn can_attach() -> bool {
    have_root() && have_tool("nbdfuse") && have_tool("losetup")
}

/// Attaches and returns the device, failing the test with cowimg's message otherwise.
fn attach(run_dir: &Path, args: &[&str]) -> PathBuf {
    let mut all = vec!["attach"];
    all.extend_from_slice(args);
    let out = cowimg(run_dir, &all);
    assert!(
        out.status.success(),
        "attach failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        device.starts_with("/dev/"),
        "attach printed {device:?}, not a device"
    );
    PathBuf::from(device)
}

fn detach(run_dir: &Path, device: &Path) -> std::process::Output {
    let out = cowimg(run_dir, &["detach", &device.to_string_lossy()]);
    eprintln!(
        "detach {}: {}",
        device.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The attachment record attach left for `device`.
fn record(run_dir: &Path, device: &Path) -> serde_json::Value {
    let name = device.file_name().unwrap().to_string_lossy();
    let text = std::fs::read_to_string(run_dir.join("attached").join(format!("{name}.json")))
        .expect("the attachment record");
    serde_json::from_str(&text).unwrap()
}

fn process_exists(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit(')').next().unwrap().trim_start().starts_with('Z'))
}

#[test]
fn attach_serves_an_image_as_a_block_device_and_detach_flushes_and_stops_everything() {
    if !can_attach() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let img = dir.path().join("disk.cow");
    create_image(&img, SIZE);
    let device = attach(&run_dir, &[&img.to_string_lossy()]);
    let server = record(&run_dir, &device)["server_pid"].as_u64().unwrap();
    assert!(process_exists(server));
    let data = pattern(1 << 20, 4 << 20, 3);
    {
        let mut dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&device)
            .unwrap();
        let size = dev.seek(SeekFrom::End(0)).unwrap();
        assert_eq!(size, SIZE, "the device's size");
        dev.seek(SeekFrom::Start(4 << 20)).unwrap();
        dev.write_all(&data).unwrap();
        // No fsync: detach must flush what the device still holds.
    }
    let out = detach(&run_dir, &device);
    assert!(
        out.status.success(),
        "detach failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!process_exists(server), "the server is still running");
    assert_eq!(
        std::fs::read_dir(run_dir.join("attached")).unwrap().count(),
        0,
        "the record is left behind"
    );
    assert_eq!(read_image(&img, 4 << 20, 1 << 20), data);
    assert_check_clean(&img);
}

#[test]
fn a_read_only_attachment_refuses_writes_and_leaves_the_image_unchanged() {
    if !can_attach() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let img = dir.path().join("disk.cow");
    create_image(&img, SIZE);
    let before = std::fs::read(&img).unwrap();
    let device = attach(&run_dir, &["-r", &img.to_string_lossy()]);
    assert!(
        std::fs::OpenOptions::new()
            .write(true)
            .open(&device)
            .and_then(|mut d| d.write_all(&[1; 4096]).and_then(|()| d.sync_all()))
            .is_err(),
        "a write to the read-only device succeeded"
    );
    let mut zeros = vec![1u8; 4096];
    std::fs::File::open(&device)
        .unwrap()
        .read_exact(&mut zeros)
        .unwrap();
    assert!(zeros.iter().all(|&b| b == 0));
    assert!(detach(&run_dir, &device).status.success());
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

#[test]
fn attach_takes_the_uri_of_a_running_server_and_detach_leaves_that_server_alone() {
    if !can_attach() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let img = dir.path().join("disk.cow");
    create_image(&img, SIZE);
    let data = pattern(65536, 0, 9);
    {
        let image = cowimg::image::Image::open(&img, &Default::default()).unwrap();
        image.write_at(&data, 0).unwrap();
        image.flush().unwrap();
    }
    let mut server = Server::start(dir.path(), &img, &["--export-name", "vm1"]);
    let uri = format!("nbd+unix:///vm1?socket={}", server.socket.display());
    let device = attach(&run_dir, &[&uri]);
    assert!(record(&run_dir, &device)["server_pid"].is_null());
    let mut got = vec![0u8; data.len()];
    std::fs::File::open(&device)
        .unwrap()
        .read_exact(&mut got)
        .unwrap();
    assert_eq!(got, data);
    assert!(detach(&run_dir, &device).status.success());
    // The server is not attach's to stop: it still serves.
    let mut c = RawClient::connect(&server.socket);
    c.greet(1);
    c.send_option(OPT_ABORT, &[]);
    server.stop();
}

#[test]
fn detach_refuses_a_mounted_device_and_one_it_did_not_attach() {
    if !can_attach() || !have_tool("mkfs.ext4") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let img = dir.path().join("disk.cow");
    create_image(&img, SIZE);
    let device = attach(&run_dir, &[&img.to_string_lossy()]);
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&device));
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run(Command::new("mount").arg(&device).arg(&mnt));
    let refused = detach(&run_dir, &device);
    let message = String::from_utf8_lossy(&refused.stderr).into_owned();
    run(Command::new("umount").arg(&mnt));
    assert!(
        !refused.status.success() && message.contains("is mounted at"),
        "detach of a mounted device: {message}"
    );
    assert!(detach(&run_dir, &device).status.success());
    let unknown = detach(&run_dir, Path::new("/dev/loop250"));
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("not attached by cowimg attach"));
    assert_check_clean(&img);
}
