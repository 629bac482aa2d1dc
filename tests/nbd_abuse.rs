//! Hostile and broken clients, from a raw socket: the server must answer with errors or
//! hang up on that client, keep serving everyone else, and leave the image intact.
mod nbd_support;

use cowimg::image::{Image, OpenOptions};
use nbd_support::*;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;

const SIZE: u64 = 8 << 20;

/// An image of SIZE bytes with 0x5a in its first 64 KiB.
fn image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("disk.cow");
    create_image(&p, SIZE);
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.write_at(&[0x5a; 65536], 0).unwrap();
    img.flush().unwrap();
    p
}

/// A well-behaved client still gets correct data.
fn normal_client_works(server: &Server) {
    let mut c = RawClient::connect(&server.socket);
    let (size, _) = c.go(true, &["base:allocation"]);
    assert_eq!(size, SIZE);
    let r = c.call(CMD_READ, 0, 0, 4096, &[]);
    assert_eq!(r.error, 0);
    assert!(r.data.iter().all(|&b| b == 0x5a));
    c.request(CMD_DISC, 0, 1, 0, 0, &[]);
}

/// A fresh image (see `image`) in a new directory, served with `args`.
fn serve_fresh_image(args: &[&str]) -> (tempfile::TempDir, std::path::PathBuf, Server) {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let server = Server::start(dir.path(), &img, args);
    (dir, img, server)
}

fn finish(mut server: Server, img: &Path) {
    normal_client_works(&server);
    server.stop();
    assert_check_clean(img);
    let b = read_image(img, 0, 65536);
    assert!(b.iter().all(|&x| x == 0x5a), "the first 64 KiB changed");
}

#[test]
fn truncated_handshakes_leave_the_server_serving() {
    let (_dir, img, server) = serve_fresh_image(&[]);
    // Connect and leave at once.
    drop(UnixStream::connect(&server.socket).unwrap());
    // Half the client flags.
    let mut c = RawClient::connect(&server.socket);
    c.bytes(18);
    c.send(&[0, 0]);
    drop(c);
    // Flags, then half an option header.
    let mut c = RawClient::connect(&server.socket);
    c.greet(1);
    c.send(&0x4948_4156u32.to_be_bytes());
    drop(c);
    // An option header promising data that never comes.
    let mut c = RawClient::connect(&server.socket);
    c.greet(1);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&100u32.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0]);
    c.send(&m);
    drop(c);
    finish(server, &img);
}

#[test]
fn unknown_client_flags_and_bad_option_magic_end_the_connection() {
    let (_dir, img, server) = serve_fresh_image(&[]);
    let mut c = RawClient::connect(&server.socket);
    c.greet(1 | 1 << 5);
    assert!(c.is_closed(), "unknown client flag accepted");

    let mut c = RawClient::connect(&server.socket);
    c.greet(1);
    c.send(&[0xde; 16]);
    assert!(c.is_closed(), "bad option magic accepted");
    assert!(server.wait_for_log("unknown client flags", std::time::Duration::from_secs(10)));
    assert!(server.wait_for_log("bad option magic", std::time::Duration::from_secs(10)));
    finish(server, &img);
}

#[test]
fn huge_option_and_name_lengths_are_refused_without_allocating() {
    let (_dir, img, server) = serve_fresh_image(&[]);

    // An option length of 4 GiB: refused before a byte of it is read, then hang up.
    let mut c = RawClient::connect(&server.socket);
    c.greet(1);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_INFO.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&m);
    assert_eq!(c.option_reply().reply_type, REP_ERR_TOO_BIG);
    assert!(c.is_closed());

    // EXPORT_NAME cannot answer with an error: a 1 GiB name just ends the connection.
    let mut c = RawClient::connect(&server.socket);
    c.greet(1);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    m.extend_from_slice(&(1u32 << 30).to_be_bytes());
    c.send(&m);
    assert!(c.is_closed());

    // Lengths inside an option that run past its end, or past 4096: ERR_INVALID, and
    // the negotiation goes on.
    let mut c = RawClient::connect(&server.socket);
    c.greet(1);
    let mut info = u32::MAX.to_be_bytes().to_vec();
    info.extend_from_slice(&[0, 0]);
    c.send_option(OPT_INFO, &info);
    assert_eq!(
        c.option_replies().last().unwrap().reply_type,
        REP_ERR_INVALID
    );
    let long_name = vec![b'a'; 5000];
    c.send_option(OPT_GO, &RawClient::info_payload(&long_name, &[]));
    assert_eq!(
        c.option_replies().last().unwrap().reply_type,
        REP_ERR_INVALID
    );
    c.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_replies().last().unwrap().reply_type, REP_ACK);
    let mut meta = 0u32.to_be_bytes().to_vec();
    meta.extend_from_slice(&0x0fff_ffffu32.to_be_bytes());
    c.send_option(OPT_LIST_META_CONTEXT, &meta);
    assert_eq!(
        c.option_replies().last().unwrap().reply_type,
        REP_ERR_INVALID
    );
    let mut meta = 0u32.to_be_bytes().to_vec();
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&60_000u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    c.send_option(OPT_SET_META_CONTEXT, &meta);
    assert_eq!(
        c.option_replies().last().unwrap().reply_type,
        REP_ERR_INVALID
    );
    // Unknown options are refused and negotiation continues.
    c.send_option(200, b"whatever");
    assert_eq!(c.option_replies().last().unwrap().reply_type, REP_ERR_UNSUP);
    c.send_option(OPT_GO, &RawClient::info_payload(b"", &[3]));
    assert_eq!(c.option_replies().last().unwrap().reply_type, REP_ACK);
    let r = c.call(CMD_READ, 0, 4096, 4096, &[]);
    assert_eq!(r.error, 0);
    assert!(r.data.iter().all(|&b| b == 0x5a));
    finish(server, &img);
}

#[test]
fn meta_context_rules_are_enforced() {
    let (_dir, img, server) = serve_fresh_image(&["--export-name", "disk"]);
    let mut c = RawClient::connect(&server.socket);
    c.greet(1);
    // SET before structured replies is invalid.
    c.send_option(
        OPT_SET_META_CONTEXT,
        &RawClient::meta_payload(b"disk", &["base:allocation"]),
    );
    assert_eq!(
        c.option_replies().last().unwrap().reply_type,
        REP_ERR_INVALID
    );
    c.send_option(OPT_STRUCTURED_REPLY, &[]);
    c.option_replies();
    // Unknown export.
    c.send_option(
        OPT_SET_META_CONTEXT,
        &RawClient::meta_payload(b"nope", &["base:allocation"]),
    );
    assert_eq!(
        c.option_replies().last().unwrap().reply_type,
        REP_ERR_UNKNOWN
    );
    // LIST with no query shows both contexts; a namespace query only its own.
    c.send_option(
        OPT_LIST_META_CONTEXT,
        &RawClient::meta_payload(b"disk", &[]),
    );
    let names: Vec<String> = c
        .option_replies()
        .iter()
        .filter(|r| r.reply_type == REP_META_CONTEXT)
        .map(|r| String::from_utf8_lossy(&r.data[4..]).into_owned())
        .collect();
    assert_eq!(names, ["base:allocation", "cowimg:layer"]);
    c.send_option(
        OPT_LIST_META_CONTEXT,
        &RawClient::meta_payload(b"disk", &["cowimg:", "qemu:allocation-depth"]),
    );
    let names: Vec<String> = c
        .option_replies()
        .iter()
        .filter(|r| r.reply_type == REP_META_CONTEXT)
        .map(|r| String::from_utf8_lossy(&r.data[4..]).into_owned())
        .collect();
    assert_eq!(names, ["cowimg:layer"]);
    // A wildcard selects nothing; then BLOCK_STATUS is EINVAL.
    c.send_option(
        OPT_SET_META_CONTEXT,
        &RawClient::meta_payload(b"disk", &["base:"]),
    );
    assert_eq!(c.option_replies().len(), 1);
    c.send_option(OPT_GO, &RawClient::info_payload(b"nope", &[]));
    assert_eq!(
        c.option_replies().last().unwrap().reply_type,
        REP_ERR_UNKNOWN
    );
    c.send_option(OPT_GO, &RawClient::info_payload(b"disk", &[]));
    assert_eq!(c.option_replies().last().unwrap().reply_type, REP_ACK);
    c.structured = true;
    assert_eq!(c.call(CMD_BLOCK_STATUS, 0, 0, 4096, &[]).error, EINVAL);
    drop(c);

    let mut c = RawClient::connect(&server.socket);
    c.greet(1);
    c.send_option(OPT_ABORT, &[]);
    assert_eq!(c.option_reply().reply_type, REP_ACK);
    assert!(c.is_closed());
    drop(c);
    // EXPORT_NAME of an unknown export cannot be answered: hang up.
    let mut c = RawClient::connect(&server.socket);
    c.greet(1);
    c.send_option(OPT_EXPORT_NAME, b"nope");
    assert!(c.is_closed());
    // EXPORT_NAME with NO_ZEROES: exactly size and flags follow.
    let mut c = RawClient::connect(&server.socket);
    c.greet(3);
    c.send_option(OPT_EXPORT_NAME, b"disk");
    assert_eq!(c.u64(), SIZE);
    let flags = c.u16();
    assert_ne!(flags & 1 << 8, 0, "CAN_MULTI_CONN");
    let r = c.call(CMD_READ, 0, 0, 16, &[]);
    assert_eq!(r.data, vec![0x5a; 16]);
    let mut server = server;
    server.stop();
    assert_check_clean(&img);
}

fn requests_are_checked(structured: bool) {
    let (_dir, img, server) = serve_fresh_image(&[]);
    let mut c = RawClient::connect(&server.socket);
    c.go(structured, &["base:allocation", "cowimg:layer"]);
    let page = vec![0xee; 4096];
    // Past the end, and offset + length overflowing.
    assert_eq!(c.call(CMD_READ, 0, SIZE - 4096, 8192, &[]).error, EINVAL);
    assert_eq!(c.call(CMD_READ, 0, u64::MAX - 100, 4096, &[]).error, EINVAL);
    assert_eq!(c.call(CMD_READ, 0, SIZE + 1, 0, &[]).error, EINVAL);
    assert_eq!(c.call(CMD_WRITE, 0, SIZE - 2048, 4096, &page).error, ENOSPC);
    assert_eq!(
        c.call(CMD_WRITE, 0, u64::MAX - 100, 4096, &page).error,
        ENOSPC
    );
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, SIZE, 1, &[]).error, ENOSPC);
    assert_eq!(c.call(CMD_TRIM, 0, u64::MAX, u32::MAX, &[]).error, EINVAL);
    assert_eq!(c.call(CMD_CACHE, 0, SIZE, 4096, &[]).error, EINVAL);
    if structured {
        assert_eq!(c.call(CMD_BLOCK_STATUS, 0, SIZE - 1, 2, &[]).error, EINVAL);
        assert_eq!(c.call(CMD_BLOCK_STATUS, 0, 0, 0, &[]).error, EINVAL);
    } else {
        assert_eq!(
            c.call(CMD_BLOCK_STATUS, 0, 0, 4096, &[]).error,
            EINVAL,
            "no structured replies"
        );
    }
    // Zero-length requests are harmless no-ops.
    assert_eq!(
        c.call(CMD_READ, 0, 4096, 0, &[]),
        Reply {
            cookie: 0x1234,
            error: 0,
            data: vec![]
        }
    );
    assert_eq!(c.call(CMD_WRITE, 0, 4096, 0, &[]).error, 0);
    assert_eq!(c.call(CMD_TRIM, 0, SIZE, 0, &[]).error, 0);
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 0, 0, &[]).error, 0);
    // Unknown commands and flags.
    assert_eq!(c.call(99, 0, 0, 4096, &[]).error, EINVAL);
    assert_eq!(c.call(CMD_READ, 1 << 7, 0, 4096, &[]).error, EINVAL);
    assert_eq!(c.call(CMD_READ, FLAG_REQ_ONE, 0, 4096, &[]).error, EINVAL);
    assert_eq!(
        c.call(CMD_WRITE, 1 << 1, 65536, 4096, &page).error,
        EINVAL,
        "NO_HOLE on WRITE"
    );
    // READ over the 32 MiB maximum gets an error, not a disconnect; so does CACHE.
    assert_eq!(c.call(CMD_READ, 0, 0, 64 << 20, &[]).error, EINVAL);
    assert_eq!(c.call(CMD_CACHE, 0, 0, 64 << 20, &[]).error, EINVAL);
    // A long TRIM or WRITE_ZEROES is fine.
    assert_eq!(
        c.call(CMD_WRITE_ZEROES, 0, 1 << 20, (SIZE - (1 << 20)) as u32, &[])
            .error,
        0
    );
    // FUA on a read is accepted (the spec says so).
    assert_eq!(c.call(CMD_READ, FLAG_FUA, 0, 4096, &[]).error, 0);
    // Everything still answers.
    let r = c.call(CMD_READ, 0, 0, 65536, &[]);
    assert_eq!(r.error, 0);
    assert!(r.data.iter().all(|&b| b == 0x5a));
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).error, 0);
    c.request(CMD_DISC, 0, 1, 0, 0, &[]);
    assert!(c.is_closed());
    finish(server, &img);
}

#[test]
fn bad_requests_get_errors_with_simple_replies() {
    requests_are_checked(false);
}

#[test]
fn bad_requests_get_errors_with_structured_replies() {
    requests_are_checked(true);
}

#[test]
fn structured_read_errors_come_as_error_chunks() {
    let (_dir, img, server) = serve_fresh_image(&[]);
    let mut c = RawClient::connect(&server.socket);
    c.go(true, &[]);
    c.request(CMD_READ, 0, 77, SIZE, 4096, &[]);
    assert_eq!(
        c.u32(),
        STRUCTURED_REPLY_MAGIC,
        "a READ error must not be a simple reply"
    );
    let flags = c.u16();
    let kind = c.u16();
    assert_eq!((flags & 1, kind), (1, 0x8001));
    assert_eq!(c.u64(), 77);
    let len = c.u32() as usize;
    let payload = c.bytes(len);
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), EINVAL);
    let msg_len = u16::from_be_bytes(payload[4..6].try_into().unwrap()) as usize;
    assert_eq!(msg_len + 6, len);
    finish(server, &img);
}

#[test]
fn write_to_a_read_only_export_is_refused_and_its_payload_drained() {
    let (_dir, img, server) = serve_fresh_image(&["--read-only"]);
    let mut c = RawClient::connect(&server.socket);
    let (_, flags) = c.go(true, &[]);
    assert_ne!(flags & 2, 0, "READ_ONLY flag");
    // A payload that looks like requests: if it were not drained, it would be parsed.
    let mut payload = Vec::new();
    while payload.len() < 1 << 20 {
        payload.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        payload.extend_from_slice(&[0, 0, 0, 2]);
    }
    assert_eq!(
        c.call(CMD_WRITE, 0, 0, payload.len() as u32, &payload)
            .error,
        EPERM
    );
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 0, 4096, &[]).error, EPERM);
    assert_eq!(c.call(CMD_TRIM, 0, 0, 4096, &[]).error, EPERM);
    let r = c.call(CMD_READ, 0, 0, 65536, &[]);
    assert_eq!(r.error, 0);
    assert!(r.data.iter().all(|&b| b == 0x5a));
    finish(server, &img);
}

#[test]
fn oversize_write_and_bad_request_magic_drop_only_that_client() {
    let (_dir, img, server) = serve_fresh_image(&[]);
    let mut bystander = RawClient::connect(&server.socket);
    bystander.go(true, &[]);

    let mut c = RawClient::connect(&server.socket);
    c.go(true, &[]);
    c.request(CMD_WRITE, 0, 1, 0, 64 << 20, &[]);
    assert!(c.is_closed(), "a 64 MiB WRITE must end the connection");

    let mut c = RawClient::connect(&server.socket);
    c.go(false, &[]);
    c.send(&[0xab; 28]);
    assert!(c.is_closed(), "bad request magic must end the connection");

    // A client that vanishes in the middle of a WRITE payload.
    let mut c = RawClient::connect(&server.socket);
    c.go(false, &[]);
    c.request(CMD_WRITE, 0, 1, 0, 1 << 20, &[0x11; 1000]);
    drop(c);

    let r = bystander.call(CMD_READ, 0, 0, 4096, &[]);
    assert_eq!((r.error, r.data[0]), (0, 0x5a));
    assert!(
        server.wait_for_log(
            "exceeds the 33554432 byte maximum",
            std::time::Duration::from_secs(10)
        ),
        "{}",
        server.log()
    );
    finish(server, &img);
}

#[test]
fn pipelined_requests_are_all_answered_with_their_cookies() {
    let (_dir, img, server) = serve_fresh_image(&[]);
    let mut c = RawClient::connect(&server.socket);
    c.go(true, &["base:allocation"]);
    // 100 writes to distinct blocks, sent without waiting, then their replies.
    let mut batch = Vec::new();
    for i in 0..100u64 {
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&CMD_WRITE.to_be_bytes());
        m.extend_from_slice(&(1000 + i).to_be_bytes());
        m.extend_from_slice(&((1 << 20) + i * 8192).to_be_bytes());
        m.extend_from_slice(&8192u32.to_be_bytes());
        m.extend_from_slice(&pattern(8192, i * 8192, 1));
        batch.extend_from_slice(&m);
    }
    c.s.write_all(&batch).unwrap();
    let mut cookies: Vec<u64> = (0..100)
        .map(|_| c.reply(0))
        .inspect(|r| assert_eq!(r.error, 0))
        .map(|r| r.cookie)
        .collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (1000..1100).collect::<Vec<_>>());
    // Then 100 reads, pipelined too.
    for i in 0..100u64 {
        c.request(CMD_READ, 0, 2000 + i, (1 << 20) + i * 8192, 8192, &[]);
    }
    for _ in 0..100 {
        let r = c.reply(8192);
        let i = r.cookie - 2000;
        assert!(
            r.data == pattern(8192, i * 8192, 1),
            "read {i} returned the wrong data"
        );
    }
    finish(server, &img);
}

#[test]
fn an_image_read_error_is_answered_with_eio_and_the_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x33; SIZE as usize]).unwrap();
    let img = dir.path().join("top.cow");
    create_overlay(&img, &base, cowimg::format::BackingFormat::Raw);
    {
        let image = Image::open(&img, &OpenOptions::default()).unwrap();
        image.write_at(&[0x5a; 65536], 0).unwrap();
        image.flush().unwrap();
    }
    let mut server = Server::start(dir.path(), &img, &[]);
    // The backing file loses its contents under the running server: reads that fall
    // through to it fail.
    std::fs::File::options()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(0)
        .unwrap();
    for structured in [false, true] {
        let mut c = RawClient::connect(&server.socket);
        c.go(structured, &[]);
        assert_eq!(c.call(CMD_READ, 0, 1 << 20, 4096, &[]).error, 5, "EIO");
        let r = c.call(CMD_READ, 0, 0, 4096, &[]);
        assert_eq!(
            (r.error, r.data[0]),
            (0, 0x5a),
            "data of the overlay itself still reads"
        );
    }
    server.stop();
    assert!(
        server.log().contains("base.raw"),
        "the image error is logged: {}",
        server.log()
    );
}
