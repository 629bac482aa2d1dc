//! What one client can take from the others: request memory, connection slots, buffers,
//! work for nobody, and the log. Raw-socket clients stall, flood and leave; a fresh client
//! must still be served at once, and the stalled ones must lose what they held.
mod nbd_support;

use nbd_support::*;
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SIZE: u64 = 64 << 20;
const BIG: u32 = 32 << 20;

/// A 64 MiB image with 0x5a in its first 64 KiB, in a new directory.
fn fresh_image() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("disk.cow");
    create_image(&p, SIZE);
    let img = cowimg::image::Image::open(&p, &Default::default()).unwrap();
    img.write_at(&[0x5a; 65536], 0).unwrap();
    img.flush().unwrap();
    (dir, p)
}

/// Connects, negotiates and reads 4 KiB; returns how long the READ took to be answered.
fn timed_small_read(mut c: RawClient) -> Duration {
    c.go(true, &[]);
    let started = Instant::now();
    let r = c.call(CMD_READ, 0, 0, 4096, &[]);
    let took = started.elapsed();
    assert_eq!(r.error, 0);
    assert!(r.data.iter().all(|&b| b == 0x5a), "wrong data");
    c.request(CMD_DISC, 0, 1, 0, 0, &[]);
    took
}

/// The server's resident memory, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

/// Waits until `c`'s connection is closed by the server, or `timeout` passes.
fn closed_within(c: &mut RawClient, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    c.s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut b = vec![0u8; 1 << 16];
    while Instant::now() < deadline {
        match c.s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

fn stop_and_check(mut server: Server, img: &Path) {
    server.stop();
    assert_check_clean(img);
}

#[test]
fn clients_stalled_in_write_payloads_do_not_delay_a_fresh_clients_read() {
    let (_dir, img) = fresh_image();
    let server = Server::start(_dir.path(), &img, &[]);
    // Eight clients each announce a 32 MiB WRITE and send one byte of it: 256 MiB, the whole
    // server's request memory, if each could reserve all it asked for.
    let mut stalled = Vec::new();
    for i in 0..8 {
        let mut c = RawClient::connect(&server.socket);
        c.go(false, &[]);
        c.request(CMD_WRITE, 0, i, 0, BIG, &[1]);
        stalled.push(c);
    }
    std::thread::sleep(Duration::from_millis(300));
    let took = timed_small_read(RawClient::connect(&server.socket));
    assert!(
        took < Duration::from_secs(1),
        "a 4 KiB READ took {took:?} while other clients stalled"
    );
    drop(stalled);
    stop_and_check(server, &img);
}

#[test]
fn clients_that_never_read_their_replies_do_not_delay_a_fresh_clients_read() {
    let (_dir, img) = fresh_image();
    let server = Server::start(_dir.path(), &img, &[]);
    let mut stalled = Vec::new();
    for i in 0..4 {
        let mut c = RawClient::connect(&server.socket);
        c.go(false, &[]);
        c.request(CMD_READ, 0, 2 * i, 0, BIG, &[]);
        c.request(CMD_READ, 0, 2 * i + 1, 0, BIG, &[]);
        stalled.push(c);
    }
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        let took = timed_small_read(RawClient::connect(&server.socket));
        assert!(
            took < Duration::from_secs(1),
            "a 4 KiB READ took {took:?} while other clients held their replies"
        );
    }
    drop(stalled);
    stop_and_check(server, &img);
}

#[test]
fn a_client_that_stops_sending_a_write_payload_is_dropped_after_the_io_timeout() {
    let (_dir, img) = fresh_image();
    let server = Server::start(_dir.path(), &img, &["--io-timeout", "1"]);
    let mut c = RawClient::connect(&server.socket);
    c.go(false, &[]);
    c.request(CMD_WRITE, 0, 7, 0, BIG, &[0xee; 4096]);
    assert!(
        closed_within(&mut c, Duration::from_secs(5)),
        "the stalled writer is still connected"
    );
    assert!(
        server.wait_for_log("--io-timeout", Duration::from_secs(5)),
        "the log does not say why:\n{}",
        server.log()
    );
    assert!(timed_small_read(RawClient::connect(&server.socket)) < Duration::from_secs(1));
    stop_and_check(server, &img);
}

#[test]
fn a_client_that_reads_a_reply_a_trickle_at_a_time_is_dropped_after_the_io_timeout() {
    let (_dir, img) = fresh_image();
    let server = Server::start(_dir.path(), &img, &["--io-timeout", "1"]);
    let mut c = RawClient::connect(&server.socket);
    c.go(false, &[]);
    c.request(CMD_READ, 0, 7, 0, BIG, &[]);
    // Reading a little now and then keeps every single write call of the reply making
    // progress; the deadline is for the whole reply, so this must not keep it alive.
    let started = Instant::now();
    let mut b = vec![0u8; 1 << 20];
    let mut total = 0usize;
    while started.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(100));
        match c.s.read(&mut b[..16 << 10]) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    assert!(
        server.log().contains("did not read a reply"),
        "the trickling reader was not dropped within {:?}:\n{}",
        started.elapsed(),
        server.log()
    );
    // What the kernel had already queued still arrives, then the end.
    loop {
        match c.s.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    assert!(total < BIG as usize, "the whole reply was sent");
    stop_and_check(server, &img);
}

/// The summary line of connection `id` and its "N requests" figure.
fn request_count(log: &str, id: u32) -> (String, u64) {
    let line = log
        .lines()
        .find(|l| l.contains(&format!("connection {id} from")) && l.contains(" requests ("))
        .unwrap_or_else(|| panic!("no summary for connection {id}:\n{log}"));
    let before = line.split(" requests (").next().unwrap();
    let count = before.rsplit(' ').next().unwrap().parse().unwrap();
    (line.to_string(), count)
}

#[test]
fn the_queued_reads_of_a_client_that_left_are_not_run() {
    let (_dir, img) = fresh_image();
    let server = Server::start(_dir.path(), &img, &[]);
    let mut c = RawClient::connect(&server.socket);
    c.go(false, &[]);
    // 300 READs of 32 MiB: 10 GiB of reads for 8,400 bytes sent, then gone.
    let mut batch = Vec::new();
    for i in 0..300u64 {
        batch.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        batch.extend_from_slice(&0u16.to_be_bytes());
        batch.extend_from_slice(&CMD_READ.to_be_bytes());
        batch.extend_from_slice(&i.to_be_bytes());
        batch.extend_from_slice(&0u64.to_be_bytes());
        batch.extend_from_slice(&BIG.to_be_bytes());
    }
    std::io::Write::write_all(&mut c.s, &batch).unwrap();
    drop(c);
    assert!(
        server.wait_for_log("connection 1 from", Duration::from_secs(20)),
        "the departed client's connection did not end:\n{}",
        server.log()
    );
    // Each of the connection's workers may have taken one request before the hang-up was
    // seen; none takes more after it.
    let (line, requests) = request_count(&server.log(), 1);
    assert!(
        requests <= 32,
        "{requests} of the 300 requests were read: {line}"
    );
    assert!(line.contains("the client had gone"), "{line}");
    assert!(timed_small_read(RawClient::connect(&server.socket)) < Duration::from_secs(1));
    stop_and_check(server, &img);
}

#[test]
fn idle_connections_give_their_buffers_back() {
    let (_dir, img) = fresh_image();
    let server = Server::start(_dir.path(), &img, &[]);
    let mut clients = Vec::new();
    for _ in 0..16 {
        let mut c = RawClient::connect(&server.socket);
        c.go(false, &[]);
        // Sixteen 2 MiB READs in flight put a buffer in every worker of the connection.
        for cookie in 0..16 {
            c.request(CMD_READ, 0, cookie, cookie << 21, 2 << 20, &[]);
        }
        for _ in 0..16 {
            assert_eq!(c.reply(2 << 20).error, 0);
        }
        clients.push(c);
    }
    // Longer than the server waits before it calls a quiet connection idle.
    std::thread::sleep(Duration::from_secs(3));
    let rss = rss_bytes(server.pid());
    assert!(
        rss < 96 << 20,
        "16 idle connections hold {} MiB of server memory",
        rss >> 20
    );
    // Still connected and working.
    for c in &mut clients {
        let r = c.call(CMD_READ, 0, 0, 4096, &[]);
        assert!(r.error == 0 && r.data.iter().all(|&b| b == 0x5a));
    }
    drop(clients);
    stop_and_check(server, &img);
}

#[test]
fn one_address_cannot_take_every_connection_slot() {
    let (_dir, img) = fresh_image();
    let server = Server::start_tcp(
        &img,
        &[
            "--max-connections",
            "4",
            "--max-connections-per-client",
            "2",
        ],
    );
    let addr = server.tcp.clone().unwrap();
    let other = Ipv4Addr::new(127, 0, 0, 2);
    let mut held: Vec<RawClient> = (0..2)
        .map(|_| {
            let mut c = RawClient::over(Stream::Tcp(tcp_from(other, &addr).unwrap()));
            c.go(false, &[]);
            c
        })
        .collect();
    // A third connection from the same address is closed before its greeting.
    let mut third = RawClient::over(Stream::Tcp(tcp_from(other, &addr).unwrap()));
    assert!(
        third.is_closed(),
        "a third connection from {other} was let in"
    );
    assert!(server.wait_for_log("--max-connections-per-client", Duration::from_secs(5)));
    // Another address still gets in and is served at once.
    let fresh = RawClient::over(Stream::Tcp(
        tcp_from(Ipv4Addr::new(127, 0, 0, 1), &addr).unwrap(),
    ));
    assert!(timed_small_read(fresh) < Duration::from_secs(1));
    for c in &mut held {
        assert_eq!(c.call(CMD_READ, 0, 0, 4096, &[]).error, 0);
    }
    drop(held);
    stop_and_check(server, &img);
}

#[test]
fn idle_clients_are_dropped_after_the_idle_timeout_and_free_their_slots() {
    let (_dir, img) = fresh_image();
    let server = Server::start(
        _dir.path(),
        &img,
        &["--max-connections", "2", "--idle-timeout", "1"],
    );
    let mut idle: Vec<RawClient> = (0..2)
        .map(|_| {
            let mut c = RawClient::connect(&server.socket);
            c.go(false, &[]);
            c
        })
        .collect();
    for c in &mut idle {
        assert!(
            closed_within(c, Duration::from_secs(5)),
            "an idle client is still connected"
        );
    }
    assert!(server.wait_for_log("--idle-timeout", Duration::from_secs(5)));
    // An active client is not idle: requests spaced under the timeout keep it connected.
    let mut active = RawClient::connect(&server.socket);
    active.go(false, &[]);
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(active.call(CMD_READ, 0, 0, 4096, &[]).error, 0);
    }
    active.request(CMD_DISC, 0, 1, 0, 0, &[]);
    stop_and_check(server, &img);
}

#[test]
fn a_flood_of_refused_connections_is_logged_at_most_once_a_second() {
    let (_dir, img) = fresh_image();
    let server = Server::start(_dir.path(), &img, &["--max-connections", "1"]);
    let mut holder = RawClient::connect(&server.socket);
    holder.go(false, &[]);
    let started = Instant::now();
    for _ in 0..300 {
        let mut c = RawClient::connect(&server.socket);
        assert!(c.is_closed(), "a connection over the cap was let in");
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let log = server.log();
    let lines = log.lines().filter(|l| l.contains("refused")).count() as u64;
    assert!(lines >= 1, "no refusal was logged:\n{log}");
    assert!(
        lines <= took.as_secs() + 2,
        "{lines} refusal lines in {took:?}"
    );
    assert_eq!(holder.call(CMD_READ, 0, 0, 4096, &[]).error, 0);
    holder.request(CMD_DISC, 0, 1, 0, 0, &[]);
    // The next line after a quiet second says how many went unlogged.
    std::thread::sleep(Duration::from_millis(1100));
    let mut blocker = RawClient::connect(&server.socket);
    blocker.go(false, &[]);
    let mut c = RawClient::connect(&server.socket);
    assert!(c.is_closed());
    assert!(
        server.wait_for_log("more refused since", Duration::from_secs(5)),
        "the count of unlogged refusals is missing:\n{}",
        server.log()
    );
    stop_and_check(server, &img);
}

/// The NBD_INFO_DESCRIPTION replies of an NBD_OPT_INFO that asks for one.
fn descriptions(server: &Server) -> Vec<Vec<u8>> {
    let mut c = RawClient::connect(&server.socket);
    c.greet(1);
    c.send_option(OPT_INFO, &RawClient::info_payload(b"", &[2]));
    let replies = c.option_replies();
    c.send_option(OPT_ABORT, &[]);
    replies
        .into_iter()
        .filter(|r| r.reply_type == REP_INFO && r.data[..2] == [0, 2])
        .map(|r| r.data[2..].to_vec())
        .collect()
}

#[test]
fn no_description_reveals_the_image_path_unless_one_is_given() {
    let (_dir, img) = fresh_image();
    let server = Server::start(_dir.path(), &img, &[]);
    assert_eq!(descriptions(&server), Vec::<Vec<u8>>::new());
    let mut c = RawClient::connect(&server.socket);
    c.greet(1);
    c.send_option(OPT_LIST, &[]);
    let listed = c.option_replies();
    assert!(
        listed
            .iter()
            .all(|r| !String::from_utf8_lossy(&r.data).contains("disk")),
        "NBD_OPT_LIST names the file"
    );
    drop(c);
    stop_and_check(server, &img);
    let dir2 = tempfile::tempdir().unwrap();
    let server = Server::start(dir2.path(), &img, &["--description", "base image"]);
    assert_eq!(descriptions(&server), vec![b"base image".to_vec()]);
    stop_and_check(server, &img);
}
