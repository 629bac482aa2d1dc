//! Server lifecycle: shutdown with idle clients, handshake timeout, connection cap,
//! systemd socket activation, TCP.
mod nbd_support;

use nbd_support::*;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

const SIZE: u64 = 4 << 20;

#[test]
fn sigterm_closes_idle_clients_flushes_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.cow");
    create_image(&img, SIZE);
    let mut server = Server::start(dir.path(), &img, &[]);
    // One client idle in the handshake, one idle in transmission after an unflushed write,
    // one idle before even reading the greeting (CVE-2024-7409: none may stall shutdown).
    let mut in_handshake = RawClient::connect(&server.socket);
    in_handshake.greet(1);
    let mut idle = RawClient::connect(&server.socket);
    idle.go(true, &[]);
    assert_eq!(idle.call(CMD_WRITE, 0, 8192, 4096, &[0x42; 4096]).error, 0);
    let _silent = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
    let status = server.stop_with(libc::SIGTERM, Duration::from_secs(15));
    assert!(status.success(), "exit status {status}:\n{}", server.log());
    assert!(idle.is_closed());
    assert!(in_handshake.is_closed());
    assert!(
        !server.socket.exists(),
        "the socket file is removed on exit"
    );
    // The write was never flushed by the client; the server flushed at exit.
    let b = read_image(&img, 8192, 4096);
    assert!(b.iter().all(|&x| x == 0x42));
    assert_check_clean(&img);
}

#[test]
fn sigint_also_shuts_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.cow");
    create_image(&img, SIZE);
    let mut server = Server::start(dir.path(), &img, &[]);
    let mut c = RawClient::connect(&server.socket);
    c.go(false, &[]);
    let status = server.stop_with(libc::SIGINT, Duration::from_secs(15));
    assert!(status.success(), "exit status {status}");
    assert!(
        server.log().contains("server shutting down"),
        "{}",
        server.log()
    );
}

#[test]
fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.cow");
    create_image(&img, SIZE);
    let mut server = Server::start(dir.path(), &img, &["--handshake-timeout", "1"]);
    let mut c = RawClient::connect(&server.socket);
    c.greet(1);
    // Say nothing more: the server hangs up (the client's own read timeout is 30 s).
    assert!(c.is_closed());
    assert!(
        server.wait_for_log("handshake timed out", Duration::from_secs(10)),
        "{}",
        server.log()
    );
    // A client that finished its handshake may stay idle past that time.
    let mut idle = RawClient::connect(&server.socket);
    idle.go(false, &[]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(idle.call(CMD_READ, 0, 0, 512, &[]).error, 0);
    server.stop();
}

#[test]
fn connections_over_the_cap_are_refused_and_the_others_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.cow");
    create_image(&img, SIZE);
    let mut server = Server::start(dir.path(), &img, &["--max-connections", "2"]);
    let mut a = RawClient::connect(&server.socket);
    a.go(true, &[]);
    let mut b = RawClient::connect(&server.socket);
    b.go(true, &[]);
    let mut extra = RawClient::connect(&server.socket);
    assert!(extra.is_closed(), "third connection accepted");
    assert!(server.wait_for_log(
        "refused, 2 clients already connected",
        Duration::from_secs(10)
    ));
    assert_eq!(a.call(CMD_WRITE, 0, 0, 512, &[1; 512]).error, 0);
    assert_eq!(
        b.call(CMD_READ, 0, 0, 512, &[]).data,
        vec![1; 512],
        "multi-conn: writes are visible on other connections"
    );
    a.request(CMD_DISC, 0, 0, 0, 0, &[]);
    assert!(a.is_closed());
    assert!(server.wait_for_log("NBD_CMD_DISC", Duration::from_secs(10)));
    let mut c = RawClient::connect(&server.socket);
    c.go(false, &[]);
    assert_eq!(c.call(CMD_READ, 0, 0, 512, &[]).data, vec![1; 512]);
    server.stop();
}

#[test]
fn tcp_listener_serves_and_logs_the_peer() {
    if !have_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.cow");
    create_image(&img, SIZE);
    let mut server = Server::start_tcp(&img, &[]);
    assert!(
        server.tcp.as_deref().unwrap().starts_with("127.0.0.1:"),
        "binds loopback"
    );
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &server.uri(),
        "-c",
        "write -P 7 0 64k",
        "-c",
        "read -P 7 0 64k",
    ]));
    assert!(!out.contains("fail"), "{out}");
    server.stop();
    assert!(server.log().contains("from 127.0.0.1:"), "{}", server.log());
}

#[test]
fn socket_activation_takes_the_listening_socket_from_fd_3() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.cow");
    create_image(&img, SIZE);
    let path = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let fd = listener.as_raw_fd();
    // LISTEN_PID must be the server's own pid: a shell exports its $$ and execs the server.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" serve \"$1\"")
        .arg(env!("CARGO_BIN_EXE_cowimg"))
        .arg(&img);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (dup2, fcntl) run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::fcntl(3, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(listener);
    let mut c = RawClient::connect(&path);
    let (size, _) = c.go(true, &[]);
    assert_eq!(size, SIZE);
    assert_eq!(c.call(CMD_WRITE, 0, 0, 4, b"abcd").error, 0);
    c.request(CMD_DISC, 0, 0, 0, 0, &[]);
    assert!(c.is_closed());
    // SAFETY: plain kill(2) of our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("serving") && log.contains("activated.sock"),
        "{log}"
    );
    assert!(path.exists(), "a socket systemd owns is not removed");
}
