//! `serve --read-only` and `io -r` take any format the reading commands take: a raw file
//! (probed or -f raw) is served through an empty in-memory overlay; writable serving and
//! writing io stay cowimg-only.
mod nbd_support;

use nbd_support::{have_tool, Server};
use std::process::Command;

fn random_file(path: &std::path::Path, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    // Data in the middle, holes around it, so that block status has something to say.
    for (i, b) in bytes[len / 4..len / 2].iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    std::fs::write(path, &bytes).expect("writing the raw file");
    bytes
}

#[test]
fn serve_read_only_serves_a_raw_file_byte_for_byte() {
    if !have_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("disk.raw");
    random_file(&raw, 4 << 20);
    let mut server = Server::start(dir.path(), &raw, &["--read-only"]);
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&raw)
        .arg(server.uri())
        .output()
        .expect("running qemu-img compare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        (out.status.code(), stdout.trim()),
        (Some(0), "Images are identical."),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.stop();
}

#[test]
fn serving_a_raw_file_writable_is_refused_with_a_way_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("disk.raw");
    random_file(&raw, 1 << 20);
    for format in [&[][..], &["-f", "raw"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_cowimg"))
            .arg("serve")
            .args(format)
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .arg(&raw)
            .output()
            .expect("running cowimg serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("disk.raw") && stderr.contains("--read-only"),
            "{stderr}"
        );
    }
}

#[test]
fn io_r_reads_a_raw_file_and_io_without_r_refuses_to_write_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("disk.raw");
    let bytes = random_file(&raw, 1 << 20);
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cowimg"))
            .args(args)
            .arg(&raw)
            .output()
            .expect("running cowimg io")
    };
    let out = run(&["io", "-r", "-c", "read -P 0 0 64k"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pattern = format!("read -P {} {} 1", bytes[(1 << 18) + 1], (1 << 18) + 1);
    let out = run(&["io", "-r", "-f", "raw", "-c", &pattern]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["io", "-c", "write 0 1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("qemu-io -f raw"));
    assert_eq!(
        std::fs::read(&raw).expect("reading back"),
        bytes,
        "the file changed"
    );
}

fn cowimg(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cowimg"))
        .args(args)
        .output()
        .expect("running cowimg")
}

#[test]
fn compare_info_map_and_measure_read_nbd_uris() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("disk.raw");
    let bytes = random_file(&raw, 3 << 20);
    let raw_arg = raw.to_str().expect("utf-8 path");
    let mut server = Server::start(dir.path(), &raw, &["--read-only"]);
    let uri = server.uri();

    let out = cowimg(&["compare", raw_arg, &uri]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        (out.status.code(), stdout.as_ref()),
        (Some(0), "Images are identical.\n"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut changed = bytes.clone();
    changed[(3 << 20) - 1] ^= 1;
    let other = dir.path().join("other.raw");
    std::fs::write(&other, &changed).expect("writing");
    let out = cowimg(&["compare", &uri, other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("Content mismatch at offset {}!\n", (3 << 20) - 512)
    );

    let out = cowimg(&["measure", "--output=json", &uri]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let measure: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(measure["required"], 3 << 20);
    let out = cowimg(&["info", "--output=json", &uri]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        (info["format"].as_str(), info["virtual-size"].as_u64()),
        (Some("raw"), Some(3 << 20))
    );
    let out = cowimg(&["map", "--output=json", &uri]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(map[0]["length"], 3 << 20);
    server.stop();
}

#[test]
fn a_server_that_is_not_nbd_is_an_error_not_a_hang() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("binding");
    let fake = std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            // An HTTP server, say: not the NBD magic.
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let started = std::time::Instant::now();
    let out = cowimg(&["compare", &uri, &uri]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("fake.sock") && stderr.contains("not an NBD server"),
        "{stderr}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    let _ = fake.join();
}
