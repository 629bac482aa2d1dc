//! Many exports in one server: `--export`, `--dir`, NBD_OPT_LIST/INFO/GO by name, unknown
//! names, shared backing layers, and overlays created on demand.
mod nbd_support;

use cowimg::format::BackingFormat;
use nbd_support::*;
use std::path::Path;
use std::time::Duration;

const SIZE: u64 = 4 << 20;
const REP_SERVER: u32 = 2;

/// The (name, description) pairs NBD_OPT_LIST returns.
fn list(socket: &Path) -> Vec<(String, String)> {
    let mut c = RawClient::connect(socket);
    c.greet(1);
    c.send_option(OPT_LIST, &[]);
    let replies = c.option_replies();
    assert_eq!(replies.last().unwrap().reply_type, REP_ACK);
    replies
        .iter()
        .filter(|r| r.reply_type == REP_SERVER)
        .map(|r| {
            let n = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
            (
                String::from_utf8_lossy(&r.data[4..4 + n]).into_owned(),
                String::from_utf8_lossy(&r.data[4 + n..]).into_owned(),
            )
        })
        .collect()
}

/// Writes `data` at `offset` of export `name` and flushes.
fn write_to(socket: &Path, name: &str, offset: u64, data: &[u8]) {
    let mut c = RawClient::connect(socket);
    c.go_named(name).expect("export exists");
    let r = c.call(CMD_WRITE, 0, offset, data.len() as u32, data);
    assert_eq!(r.error, 0, "write to {name}");
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).error, 0);
}

fn read_from(socket: &Path, name: &str, offset: u64, len: u32) -> Vec<u8> {
    let mut c = RawClient::connect(socket);
    c.go_named(name).expect("export exists");
    let r = c.call(CMD_READ, 0, offset, len, &[]);
    assert_eq!(r.error, 0, "read from {name}");
    r.data
}

#[test]
fn each_named_export_reaches_its_own_image() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.cow");
    let b = dir.path().join("b.cow");
    create_image(&a, SIZE);
    create_image(&b, 2 * SIZE);
    let a_arg = format!("alpha={}", a.display());
    let b_arg = format!("beta:ro={}", b.display());
    let mut server = Server::start_with(dir.path(), &["--export", &a_arg, "--export", &b_arg]);
    let names: Vec<String> = list(&server.socket).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["alpha", "beta"]);

    let mut c = RawClient::connect(&server.socket);
    assert_eq!(c.go_named("beta"), Ok(2 * SIZE));
    let r = c.call(CMD_WRITE, 0, 0, 4096, &[1; 4096]);
    assert_eq!(r.error, EPERM, "beta is read-only");
    drop(c);

    write_to(&server.socket, "alpha", 65536, &[0x5a; 4096]);
    assert_eq!(
        read_from(&server.socket, "alpha", 65536, 4096),
        vec![0x5a; 4096]
    );
    assert_eq!(
        read_from(&server.socket, "beta", 65536, 4096),
        vec![0; 4096]
    );
    server.stop();
    assert_eq!(read_image(&a, 65536, 4096), vec![0x5a; 4096]);
    assert_eq!(read_image(&b, 65536, 4096), vec![0; 4096]);
    assert_check_clean(&a);
    assert_check_clean(&b);
}

#[test]
fn an_unknown_export_name_is_refused_and_logged_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.cow");
    create_image(&a, SIZE);
    let a_arg = format!("alpha={}", a.display());
    let server = Server::start_with(dir.path(), &["--export", &a_arg]);
    let mut c = RawClient::connect(&server.socket);
    let (reply, message) = c.go_named("no-such-disk").unwrap_err();
    assert_eq!(reply, REP_ERR_UNKNOWN);
    assert!(message.contains("no-such-disk"), "{message}");
    // The same connection may still pick a real export.
    c.send_option(OPT_GO, &RawClient::info_payload(b"alpha", &[]));
    assert_eq!(c.option_replies().last().unwrap().reply_type, REP_ACK);
    assert!(
        server.wait_for_log("no export named \"no-such-disk\"", Duration::from_secs(5)),
        "{}",
        server.log()
    );
    // EXPORT_NAME cannot be refused politely: the server hangs up and says why.
    let mut c = RawClient::connect(&server.socket);
    c.greet(1);
    c.send_option(OPT_EXPORT_NAME, b"other");
    assert!(c.is_closed());
    assert!(server.wait_for_log("\"other\"", Duration::from_secs(5)));
}

#[test]
fn a_directory_exports_cowimg_files_writable_raw_files_read_only_and_skips_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    create_image(&images.join("one.cow"), SIZE);
    create_image(&images.join("two"), SIZE);
    std::fs::write(images.join("base.raw"), pattern(65536, 0, 4)).unwrap();
    std::fs::create_dir(images.join("sub")).unwrap();
    let images_arg = images.to_string_lossy().into_owned();
    let server = Server::start_with(dir.path(), &["--dir", &images_arg]);
    let names: Vec<String> = list(&server.socket).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["base.raw", "one", "two"]);
    assert!(server.log().contains("sub: skipped"), "{}", server.log());
    // A raw file is exported as it is, read-only.
    assert_eq!(
        read_from(&server.socket, "base.raw", 0, 65536),
        pattern(65536, 0, 4)
    );
    let mut c = RawClient::connect(&server.socket);
    c.go_named("base.raw").expect("export exists");
    assert_eq!(c.call(CMD_WRITE, 0, 0, 4096, &[1; 4096]).error, EPERM);
    write_to(&server.socket, "two", 0, &[7; 4096]);
    assert_eq!(read_from(&server.socket, "two", 0, 4096), vec![7; 4096]);
    // A file that appears later is exported when a client first asks for it.
    create_image(&images.join("three.cow"), SIZE);
    assert_eq!(read_from(&server.socket, "three", 0, 4096), vec![0; 4096]);
    // Names that would leave the directory are refused before any path is made of them.
    let mut c = RawClient::connect(&server.socket);
    let (reply, message) = c.go_named("../images/one.cow").unwrap_err();
    assert_eq!(reply, REP_ERR_UNKNOWN);
    assert!(message.contains("refused export name"), "{message}");
}

#[test]
fn the_single_image_form_still_answers_any_name() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.cow");
    create_image(&img, SIZE);
    let server = Server::start(dir.path(), &img, &[]);
    let mut c = RawClient::connect(&server.socket);
    assert_eq!(c.go_named("whatever"), Ok(SIZE));
}

#[test]
fn serving_an_image_that_is_already_exported_writable_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.cow");
    create_image(&a, SIZE);
    let first = format!("first={}", a.display());
    let second = format!("second={}", a.display());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cowimg"))
        .args(["serve", "--socket"])
        .arg(dir.path().join("s.sock"))
        .args(["--export", &first, "--export", &second])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use"), "{stderr}");
}

/// Links in /proc/PID/fd that point at `path`.
fn open_descriptors_of(pid: u32, path: &Path) -> usize {
    let target = std::fs::canonicalize(path).unwrap();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == target))
        .count()
}

#[test]
fn exports_over_one_base_open_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, pattern(SIZE as usize, 0, 3)).unwrap();
    let mut args = Vec::new();
    for i in 0..5 {
        let overlay = dir.path().join(format!("vm{i}.cow"));
        create_overlay(&overlay, &base, BackingFormat::Raw);
        args.push(format!("vm{i}={}", overlay.display()));
    }
    let mut argv = Vec::new();
    for a in &args {
        argv.push("--export");
        argv.push(a);
    }
    let server = Server::start_with(dir.path(), &argv);
    assert_eq!(open_descriptors_of(server.pid(), &base), 1);
    assert_eq!(
        read_from(&server.socket, "vm3", 8192, 4096),
        pattern(4096, 8192, 3)
    );
}

fn overlay_server(dir: &Path, base: &Path, extra: &[&str]) -> Server {
    let overlays = dir.join("overlays");
    std::fs::create_dir_all(&overlays).unwrap();
    let overlays = overlays.to_string_lossy().into_owned();
    let base = base.to_string_lossy().into_owned();
    let mut args = vec!["--overlays", &overlays, "--base", &base, "-F", "raw"];
    args.extend_from_slice(extra);
    Server::start_with(dir, &args)
}

#[test]
fn two_hundred_clients_get_two_hundred_overlays_over_one_base_opened_once() {
    const CLIENTS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let base_bytes = pattern(SIZE as usize, 0, 9);
    std::fs::write(&base, &base_bytes).unwrap();
    let server = overlay_server(
        dir.path(),
        &base,
        &["--max-connections", "256", "--threads", "2"],
    );
    let socket = server.socket.clone();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut c = RawClient::connect(&socket);
                let name = format!("vm{i}");
                assert_eq!(c.go_named(&name), Ok(SIZE), "{name}");
                // Each VM writes its own pattern at its own and at a common offset.
                let own = (i as u64 % 64) * 65536;
                let data = pattern(8192, own, i as u8);
                assert_eq!(c.call(CMD_WRITE, 0, own, 8192, &data).error, 0);
                let common = pattern(4096, SIZE - 4096, i as u8);
                assert_eq!(c.call(CMD_WRITE, 0, SIZE - 4096, 4096, &common).error, 0);
                assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).error, 0);
                assert_eq!(c.call(CMD_READ, 0, own, 8192, &[]).data, data);
                assert_eq!(c.call(CMD_READ, 0, SIZE - 4096, 4096, &[]).data, common);
                // What it did not write still comes from the base.
                let untouched = own + 8192;
                assert_eq!(
                    c.call(CMD_READ, 0, untouched, 4096, &[]).data,
                    base_slice(untouched, 4096)
                );
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a client failed");
    }
    assert_eq!(
        open_descriptors_of(server.pid(), &base),
        1,
        "the base is opened once for {CLIENTS} exports"
    );
    let mut server = server;
    server.stop();
    for i in 0..CLIENTS {
        let overlay = dir.path().join(format!("overlays/vm{i}.cow"));
        assert_check_clean(&overlay);
        let own = (i as u64 % 64) * 65536;
        assert_eq!(read_image(&overlay, own, 8192), pattern(8192, own, i as u8));
    }
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_bytes,
        "the base is unchanged"
    );
}

/// The bytes of the base written by `two_hundred_clients_...` (pattern seed 9).
fn base_slice(offset: u64, len: usize) -> Vec<u8> {
    pattern(len, offset, 9)
}

#[test]
fn clients_racing_for_one_new_name_share_one_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0u8; SIZE as usize]).unwrap();
    let server = overlay_server(dir.path(), &base, &["--threads", "2"]);
    let socket = server.socket.clone();
    let racers: Vec<_> = (0..8u64)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut c = RawClient::connect(&socket);
                assert_eq!(c.go_named("shared"), Ok(SIZE));
                let r = c.call(CMD_WRITE, 0, i * 4096, 4096, &[i as u8 + 1; 4096]);
                assert_eq!(r.error, 0);
                assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).error, 0);
            })
        })
        .collect();
    for r in racers {
        r.join().unwrap();
    }
    let files: Vec<String> = std::fs::read_dir(dir.path().join("overlays"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, ["shared.cow"]);
    for i in 0..8u64 {
        assert_eq!(
            read_from(&server.socket, "shared", i * 4096, 4096),
            vec![i as u8 + 1; 4096]
        );
    }
}

#[test]
fn on_demand_names_that_could_escape_are_refused_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0u8; SIZE as usize]).unwrap();
    let server = overlay_server(dir.path(), &base, &[]);
    let long = "a".repeat(129);
    for bad in ["../escape", "a/b", "..", ".hidden", long.as_str(), "sp ace"] {
        let mut c = RawClient::connect(&server.socket);
        let (reply, _) = c.go_named(bad).unwrap_err();
        assert_eq!(reply, REP_ERR_UNKNOWN, "{bad:?}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path().join("overlays"))
            .unwrap()
            .count(),
        0
    );
    assert!(!dir.path().join("escape.cow").exists());
}

#[test]
fn no_overlay_is_made_past_max_exports() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0u8; SIZE as usize]).unwrap();
    let server = overlay_server(dir.path(), &base, &["--max-exports", "2"]);
    for name in ["one", "two"] {
        assert_eq!(RawClient::connect(&server.socket).go_named(name), Ok(SIZE));
    }
    let (reply, message) = RawClient::connect(&server.socket)
        .go_named("three")
        .unwrap_err();
    assert_eq!(reply, REP_ERR_UNKNOWN);
    assert!(message.contains("--max-exports"), "{message}");
    assert!(!dir.path().join("overlays/three.cow").exists());
    // Existing ones are still served.
    assert_eq!(RawClient::connect(&server.socket).go_named("one"), Ok(SIZE));
}

#[test]
fn a_client_trying_many_unknown_names_does_not_flood_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.cow");
    create_image(&a, SIZE);
    let a_arg = format!("alpha={}", a.display());
    let server = Server::start_with(dir.path(), &["--export", &a_arg]);
    let mut c = RawClient::connect(&server.socket);
    c.greet(1);
    for i in 0..50 {
        let name = format!("guess{i}");
        c.send_option(OPT_INFO, &RawClient::info_payload(name.as_bytes(), &[]));
        assert_eq!(
            c.option_replies().last().unwrap().reply_type,
            REP_ERR_UNKNOWN
        );
    }
    assert!(server.wait_for_log("are not logged", Duration::from_secs(5)));
    let logged = server.log().lines().filter(|l| l.contains("guess")).count();
    assert_eq!(logged, 3, "{}", server.log());
}
