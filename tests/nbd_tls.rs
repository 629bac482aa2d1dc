//! TLS for `cowimg serve`: certificates made here with openssl, real clients (nbdinfo,
//! qemu-img, nbdcopy, nbd-client) over TLS agreeing with plain text, and the refusals a
//! server owes clients that are not allowed, not upgraded, or not speaking TLS at all.
mod nbd_support;

use nbd_support::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const OPT_STARTTLS: u32 = 5;
const REP_ERR_TLS_REQD: u32 = 0x8000_0005;

fn have_tls_tools() -> bool {
    have_tool("openssl") && have_tool("nbdinfo")
}

fn openssl(dir: &Path, args: &[&str]) {
    run(Command::new("openssl").current_dir(dir).args(args));
}

/// A CA named `ca` in `dir`, and a certificate signed by it for `cn` with the extensions
/// `ext` (an openssl extension section, given inline).
fn make_ca(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{ca}-key.pem"),
            "-out",
            &format!("{ca}-cert.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

fn make_cert(dir: &Path, ca: &str, name: &str, cn: &str, ext: &str) {
    let ext_file = dir.join(format!("{name}.ext"));
    std::fs::write(&ext_file, ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}-cert.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-out",
            &format!("{name}-cert.pem"),
            "-days",
            "2",
            "-extfile",
            &ext_file.to_string_lossy(),
        ],
    );
}

const SERVER_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n";
const CLIENT_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";

/// Certificates for one test: `server/` in the layout the server reads, `client-a/` and
/// `client-b/` in the layout libnbd and qemu read (both signed by the CA), and `stranger/`,
/// signed by another CA.
struct Pki {
    server: PathBuf,
    client_a: PathBuf,
    client_b: PathBuf,
    stranger: PathBuf,
}

fn make_pki(dir: &Path) -> Pki {
    let work = dir.join("pki");
    std::fs::create_dir_all(&work).unwrap();
    make_ca(&work, "ca");
    make_ca(&work, "other-ca");
    make_cert(&work, "ca", "server", "localhost", SERVER_EXT);
    make_cert(&work, "ca", "client-a", "client-a", CLIENT_EXT);
    make_cert(&work, "ca", "client-b", "client-b", CLIENT_EXT);
    make_cert(&work, "other-ca", "stranger", "client-a", CLIENT_EXT);
    let layout = |name: &str, files: &[(&str, &str)]| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for (from, to) in files {
            std::fs::copy(work.join(from), d.join(to)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.to_string_lossy().ends_with("-key.pem") {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
        d
    };
    let client = |name: &str, ca: &str| {
        layout(
            name,
            &[
                (&format!("{ca}-cert.pem") as &str, "ca-cert.pem"),
                (&format!("{name}-cert.pem"), "client-cert.pem"),
                (&format!("{name}-key.pem"), "client-key.pem"),
            ],
        )
    };
    Pki {
        server: layout(
            "server",
            &[
                ("ca-cert.pem", "ca-cert.pem"),
                ("server-cert.pem", "server-cert.pem"),
                ("server-key.pem", "server-key.pem"),
            ],
        ),
        client_a: client("client-a", "ca"),
        client_b: client("client-b", "ca"),
        stranger: client("stranger", "ca"),
    }
}

/// A 32 MiB image whose first 4 MiB hold a pattern.
fn image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.cow");
    create_image(&p, 32 * MIB);
    let img = cowimg::image::Image::open(&p, &Default::default()).unwrap();
    img.write_at(&pattern(4 << 20, 0, 5), 0).unwrap();
    img.flush().unwrap();
    p
}

fn tls_uri(server: &Server, certs: &Path) -> String {
    format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        server.socket.display(),
        certs.display()
    )
}

fn output(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("running a client");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `nbdinfo --json` without the fields that differ between plain text and TLS.
fn nbdinfo_json(uri: &str) -> String {
    let text = run(Command::new("nbdinfo").args(["--json", uri]));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut export = v["exports"][0].clone();
    export.as_object_mut().unwrap().remove("uri");
    export.to_string()
}

#[test]
fn nbdinfo_nbdcopy_and_qemu_img_over_tls_agree_with_plain_text() {
    if !have_tls_tools() || !have_tool("nbdcopy") || !have_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let img = image(dir.path());
    let plain = {
        let mut s = Server::start(dir.path(), &img, &[]);
        let info = nbdinfo_json(&s.uri());
        let copy = dir.path().join("plain.raw");
        run(Command::new("nbdcopy").arg(s.uri()).arg(&copy));
        s.stop();
        (info, std::fs::read(&copy).unwrap())
    };
    let tls_dir = dir.path().join("tls");
    std::fs::create_dir(&tls_dir).unwrap();
    let mut server = Server::start(
        &tls_dir,
        &img,
        &[
            "--tls=require",
            "--tls-certificates",
            &pki.server.to_string_lossy(),
            "--tls-verify-peer",
        ],
    );
    let uri = tls_uri(&server, &pki.client_a);
    assert_eq!(nbdinfo_json(&uri), plain.0, "nbdinfo over TLS");
    let copy = dir.path().join("tls.raw");
    run(Command::new("nbdcopy").arg(&uri).arg(&copy));
    assert_eq!(std::fs::read(&copy).unwrap(), plain.1, "nbdcopy over TLS");
    // Writes too: copy a file in over TLS, and read it back in plain text later.
    let data = dir.path().join("new.raw");
    std::fs::write(&data, pattern(32 << 20, 0, 11)).unwrap();
    run(Command::new("nbdcopy").arg(&data).arg(&uri));
    // qemu-img speaks TLS with GnuTLS's x509 credentials object.
    let (ok, text) = output(Command::new("qemu-img").args([
        "info",
        "--object",
        &format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            pki.client_a.display()
        ),
        "--image-opts",
        &format!(
            "driver=nbd,server.type=unix,server.path={},tls-creds=tls0,tls-hostname=localhost",
            server.socket.display()
        ),
    ]));
    assert!(
        ok && text.contains("32 MiB"),
        "qemu-img info over TLS:\n{text}"
    );
    server.stop();
    let log = server.log();
    assert!(log.contains("TLS") && log.contains("client-a"), "{log}");
    assert_eq!(read_image(&img, 0, 32 << 20), pattern(32 << 20, 0, 11));
}

#[test]
fn nbd_client_negotiates_over_tls_with_its_certificate_options() {
    if !have_tls_tools() || !have_tool("nbd-client") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let img = image(dir.path());
    let mut server = Server::start(
        dir.path(),
        &img,
        &[
            "--tls=require",
            "--tls-certificates",
            &pki.server.to_string_lossy(),
        ],
    );
    let c = &pki.client_a;
    let (_, text) = output(
        Command::new("timeout")
            .args(["20", "nbd-client", "-unix"])
            .arg(&server.socket)
            .arg("/dev/nbd0")
            .arg("-cacertfile")
            .arg(c.join("ca-cert.pem"))
            .arg("-certfile")
            .arg(c.join("client-cert.pem"))
            .arg("-keyfile")
            .arg(c.join("client-key.pem"))
            .args(["-tlshostname", "localhost", "-nofork"]),
    );
    assert!(
        text.contains("Negotiation: ..size = 32MB"),
        "nbd-client did not negotiate over TLS:\n{text}\nserver log:\n{}",
        server.log()
    );
    server.stop();
}

/// True when the server ends the connection within 10 s; whatever it sends first (a TLS
/// alert, say) is read and dropped.
fn ends_soon(c: &mut RawClient) -> bool {
    c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match c.s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }
}

/// A raw client that has sent its flags (fixed newstyle).
fn greeted(server: &Server) -> RawClient {
    let mut c = RawClient::connect(&server.socket);
    c.greet(1);
    c
}

/// nbdinfo over TLS with client-a's certificate succeeds.
fn good_client_still_works(server: &Server, pki: &Pki) {
    let (ok, text) = output(Command::new("nbdinfo").arg(tls_uri(server, &pki.client_a)));
    assert!(
        ok,
        "a good client failed after the abuse:\n{text}\n{}",
        server.log()
    );
}

#[test]
fn a_server_that_requires_tls_refuses_plain_text_and_survives_bad_clients() {
    if !have_tls_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let img = image(dir.path());
    let mut server = Server::start(
        dir.path(),
        &img,
        &[
            "--tls=require",
            "--tls-certificates",
            &pki.server.to_string_lossy(),
            "--tls-verify-peer",
            "--handshake-timeout",
            "2",
        ],
    );
    // Every option but STARTTLS and ABORT: NBD_REP_ERR_TLS_REQD.
    let mut c = greeted(&server);
    for option in [
        OPT_LIST,
        OPT_INFO,
        OPT_GO,
        OPT_STRUCTURED_REPLY,
        OPT_LIST_META_CONTEXT,
    ] {
        let payload = if option == OPT_INFO || option == OPT_GO {
            RawClient::info_payload(b"", &[])
        } else if option == OPT_LIST_META_CONTEXT {
            RawClient::meta_payload(b"", &["base:allocation"])
        } else {
            Vec::new()
        };
        c.send_option(option, &payload);
        let replies = c.option_replies();
        assert_eq!(
            replies.last().unwrap().reply_type,
            REP_ERR_TLS_REQD,
            "option {option}"
        );
    }
    // EXPORT_NAME in plain text ends the connection.
    c.send_option(OPT_EXPORT_NAME, b"");
    assert!(c.is_closed(), "EXPORT_NAME in plain text was answered");

    // Garbage instead of a ClientHello: a clean disconnect.
    let mut c = greeted(&server);
    c.send_option(OPT_STARTTLS, &[]);
    assert_eq!(c.option_replies().last().unwrap().reply_type, REP_ACK);
    c.send(&[0x42; 512]);
    assert!(ends_soon(&mut c), "garbage was accepted as TLS");

    // A client that stops in the middle of the TLS handshake: the handshake timeout ends it.
    let mut c = greeted(&server);
    c.send_option(OPT_STARTTLS, &[]);
    assert_eq!(c.option_replies().last().unwrap().reply_type, REP_ACK);
    c.send(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]); // a ClientHello's first bytes
    let started = Instant::now();
    assert!(
        ends_soon(&mut c),
        "a stalled TLS handshake outlived the handshake timeout"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // A certificate from another CA, and none at all, are refused.
    let (ok, text) = output(Command::new("nbdinfo").arg(tls_uri(&server, &pki.stranger)));
    assert!(!ok, "a certificate from another CA was accepted:\n{text}");
    let no_cert = dir.path().join("no-cert");
    std::fs::create_dir(&no_cert).unwrap();
    std::fs::copy(
        pki.client_a.join("ca-cert.pem"),
        no_cert.join("ca-cert.pem"),
    )
    .unwrap();
    let (ok, _) = output(Command::new("nbdinfo").arg(tls_uri(&server, &no_cert)));
    assert!(
        !ok,
        "a client without a certificate was accepted under --tls-verify-peer"
    );
    good_client_still_works(&server, &pki);
    server.stop();
}

#[test]
fn starttls_forgets_what_was_negotiated_before_it_and_is_refused_twice() {
    if !have_tls_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let img = image(dir.path());
    let mut server = Server::start(
        dir.path(),
        &img,
        &[
            "--tls=on",
            "--tls-certificates",
            &pki.server.to_string_lossy(),
        ],
    );
    // --tls=on: plain-text clients still work.
    let mut c = RawClient::connect(&server.socket);
    let (size, _) = c.go(false, &[]);
    assert_eq!(size, 32 * MIB);
    c.request(CMD_DISC, 0, 1, 0, 0, &[]);
    // Structured replies negotiated in plain text, then STARTTLS: the upgrade resets them
    // (CVE-2021-3716), so after GO a READ gets a simple reply.
    let mut c = greeted(&server);
    c.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_replies().last().unwrap().reply_type, REP_ACK);
    c.send_option(OPT_STARTTLS, &[]);
    assert_eq!(c.option_replies().last().unwrap().reply_type, REP_ACK);
    c.start_tls(&pki.client_a);
    // A second STARTTLS, over TLS, is refused and the session goes on.
    c.send_option(OPT_STARTTLS, &[]);
    assert_eq!(
        c.option_replies().last().unwrap().reply_type,
        REP_ERR_INVALID
    );
    c.send_option(OPT_GO, &RawClient::info_payload(b"", &[]));
    assert_eq!(c.option_replies().last().unwrap().reply_type, REP_ACK);
    c.structured = false;
    c.request(CMD_READ, 0, 7, 0, 4096, &[]);
    let mut magic = [0u8; 4];
    c.s.read_exact(&mut magic).unwrap();
    assert_eq!(
        u32::from_be_bytes(magic),
        SIMPLE_REPLY_MAGIC,
        "structured replies survived STARTTLS"
    );
    let rest = c.bytes(12 + 4096);
    assert_eq!(&rest[..4], &[0; 4], "the READ failed");
    assert_eq!(&rest[12..], &pattern(4096, 0, 5)[..]);
    // A STARTTLS after the export was chosen is no option any more: a protocol error that
    // ends this connection only.
    c.send_option(OPT_STARTTLS, &[]);
    assert!(c.is_closed());
    good_client_still_works(&server, &pki);
    server.stop();
}

#[test]
fn an_identity_not_allowed_for_an_export_gets_policy_and_does_not_see_it() {
    if !have_tls_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let img = image(dir.path());
    let mut server = Server::start(
        dir.path(),
        &img,
        &[
            "--tls=require",
            "--tls-certificates",
            &pki.server.to_string_lossy(),
            "--tls-verify-peer",
            "--allow",
            "client-a",
        ],
    );
    good_client_still_works(&server, &pki);
    let (ok, text) = output(Command::new("nbdinfo").arg(tls_uri(&server, &pki.client_b)));
    assert!(!ok, "client-b was let in:\n{text}");
    let (ok, list) = output(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(tls_uri(&server, &pki.client_b)),
    );
    assert!(
        !list.contains("export=\"\"") || !ok,
        "client-b sees the export:\n{list}"
    );
    server.stop();
    let log = server.log();
    assert!(
        log.contains("client-b") && log.contains("not allowed"),
        "{log}"
    );
}

/// Reads the first bytes a server sends to a raw socket that sent nothing.
fn greeting_bytes(socket: &Path) -> Vec<u8> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = vec![0u8; 18];
    s.read_exact(&mut b).unwrap();
    let _ = s.write_all(&0u32.to_be_bytes());
    b
}

#[test]
fn a_key_readable_by_others_gets_a_warning_and_sighup_reloads_the_certificates() {
    if !have_tls_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let img = image(dir.path());
    use std::os::unix::fs::PermissionsExt;
    let key = pki.server.join("server-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut server = Server::start(
        dir.path(),
        &img,
        &[
            "--tls=require",
            "--tls-certificates",
            &pki.server.to_string_lossy(),
        ],
    );
    assert!(server.wait_for_log("readable by others", Duration::from_secs(5)));
    // A connection stays up across a reload.
    let mut held = greeted(&server);
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(server.pid() as i32, libc::SIGHUP) };
    assert!(
        server.wait_for_log("reloaded", Duration::from_secs(5)),
        "{}",
        server.log()
    );
    assert_eq!(greeting_bytes(&server.socket).len(), 18);
    held.send_option(OPT_STARTTLS, &[]);
    assert_eq!(held.option_replies().last().unwrap().reply_type, REP_ACK);
    good_client_still_works(&server, &pki);
    server.stop();
}
