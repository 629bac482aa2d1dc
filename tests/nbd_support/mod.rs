//! Helpers shared by the NBD tests: starting `cowimg serve`, finding tools, a minimal raw
//! NBD client for protocol tests.
#![allow(dead_code)]

#[path = "../skip_support/mod.rs"]
mod skip_support;
pub use skip_support::skip_or_fail;

use cowimg::format::BackingFormat;
use cowimg::image::{CreateOptions, Image};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// True when the tool can be run. When it cannot: under CI the test fails, elsewhere it
/// prints why it is skipped and the caller returns.
pub fn have_tool(name: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        skip_or_fail(&format!("{name} is not installed"));
    }
    found
}

/// True when running as root (loop devices, mounts).
pub fn have_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        skip_or_fail("this test needs root");
    }
    root
}

pub fn create_image(path: &Path, size: u64) {
    Image::create(
        path,
        &CreateOptions {
            size: Some(size),
            version: format_version(),
            ..Default::default()
        },
    )
    .expect("create image");
}

/// The format version the tests create images in: 1, or `COWIMG_TEST_FORMAT_VERSION`.
pub fn format_version() -> u32 {
    match std::env::var("COWIMG_TEST_FORMAT_VERSION").as_deref() {
        Ok("2") => 2,
        _ => 1,
    }
}

pub fn create_overlay(path: &Path, backing: &Path, format: BackingFormat) {
    let opts = CreateOptions {
        size: None,
        backing: Some((backing.to_string_lossy().into_owned(), format)),
        version: format_version(),
        ..Default::default()
    };
    Image::create(path, &opts).expect("create overlay");
}

/// A pattern that differs for every byte offset and seed, to detect misplaced data.
pub fn pattern(len: usize, offset: u64, seed: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
        .collect()
}

/// A running `cowimg serve`. Dropping it kills the server.
pub struct Server {
    child: Option<Child>,
    pub socket: PathBuf,
    /// TCP address when started with `--bind`.
    pub tcp: Option<String>,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Serves `image` on a Unix socket in `dir`.
    pub fn start(dir: &Path, image: &Path, extra: &[&str]) -> Server {
        let socket = dir.join(format!("nbd-{}.sock", std::process::id()));
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--socket".into(),
            socket.to_string_lossy().into_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(image.to_string_lossy().into_owned());
        Self::spawn(args, socket, false)
    }

    /// Runs `cowimg serve --socket DIR/nbd-PID.sock ARGS...` (many exports, --dir, ...).
    pub fn start_with(dir: &Path, args: &[&str]) -> Server {
        let socket = dir.join(format!("nbd-{}.sock", std::process::id()));
        let mut all: Vec<String> = vec![
            "serve".into(),
            "--socket".into(),
            socket.to_string_lossy().into_owned(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        Self::spawn(all, socket, false)
    }

    /// Serves `image` on an ephemeral TCP port on 127.0.0.1.
    pub fn start_tcp(image: &Path, extra: &[&str]) -> Server {
        let mut args: Vec<String> = vec!["serve".into(), "--bind".into(), "127.0.0.1:0".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(image.to_string_lossy().into_owned());
        Self::spawn(args, PathBuf::new(), true)
    }

    fn spawn(args: Vec<String>, socket: PathBuf, tcp: bool) -> Server {
        // Another test thread of this binary that forks a child while this test still has
        // the image open shares its lock until that child execs: a brief "image is in use"
        // that the server, started a moment later, must not be failed for.
        let mut tries = 0;
        loop {
            match Self::try_spawn(&args, socket.clone(), tcp) {
                Ok(server) => return server,
                Err(log) if log.contains("image is in use") && tries < 5 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(log) => panic!("{log}"),
            }
        }
    }

    fn try_spawn(args: &[String], socket: PathBuf, tcp: bool) -> Result<Server, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cowimg"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cowimg serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[server] {line}");
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut server = Server {
            child: Some(child),
            socket,
            tcp: None,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = server.log();
            if let Some(line) = log.lines().find(|l| l.contains("cowimg: serving")) {
                if tcp {
                    let addr = line.rsplit("tcp ").next().expect("address in startup line");
                    server.tcp = Some(addr.trim().to_string());
                }
                break;
            }
            if let Some(status) = server
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!(
                    "server exited with {status} before listening:\n{log}"
                ));
            }
            assert!(Instant::now() < deadline, "server did not start:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    pub fn uri(&self) -> String {
        match &self.tcp {
            Some(a) => format!("nbd://{a}"),
            None => format!("nbd+unix:///?socket={}", self.socket.display()),
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits until the log contains `text` (the server logs asynchronously).
    pub fn wait_for_log(&self, text: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(text) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Sends `signal` and waits for the exit; returns the exit status.
    pub fn stop_with(&mut self, signal: i32, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                // Give the log thread a moment to collect the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "server did not exit within {timeout:?} after signal {signal}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and the server must exit 0.
    pub fn stop(&mut self) {
        let status = self.stop_with(libc::SIGTERM, Duration::from_secs(20));
        assert!(
            status.success(),
            "server exited with {status}:\n{}",
            self.log()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs a command, panicking with its output when it fails; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Image check must find no corruption and no leak.
pub fn assert_check_clean(path: &Path) {
    let report = cowimg::image::ops::check(path, false).expect("check runs");
    assert!(
        report.corruptions.is_empty() && report.leaks == 0,
        "check of {} is not clean: {report:?}",
        path.display()
    );
}

/// Reopens an image read-only (after the server stopped) and reads `len` bytes at `offset`.
pub fn read_image(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let opts = cowimg::image::OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let image = cowimg::image::Image::open(path, &opts).expect("reopening the image");
    let mut b = vec![0u8; len];
    image.read_at(&mut b, offset).expect("reading the image");
    b
}

// --- a minimal raw NBD client -------------------------------------------------------
// The wire constants are restated here from the NBD spec rather than taken from
// `cowimg::nbd::protocol`: a wrong constant in the server must not pass its own tests.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const FLAG_FUA: u16 = 1;
pub const FLAG_REQ_ONE: u16 = 8;

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

pub struct OptReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

/// What came back for one request.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub cookie: u64,
    /// 0 on success.
    pub error: u32,
    /// READ data, or the raw payload of BLOCK_STATUS chunks (context id + descriptors).
    pub data: Vec<u8>,
}

/// A client's connection: a Unix socket or TCP.
pub enum Stream {
    Unix(UnixStream),
    Tcp(std::net::TcpStream),
    /// After STARTTLS: a rustls client over the Unix socket.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, UnixStream>>),
    /// Between the STARTTLS reply and the TLS handshake.
    Taken,
}

impl Stream {
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Tls(s) => s.sock.set_read_timeout(t),
            Stream::Taken => Ok(()),
        }
    }
}

impl RawClient {
    /// Runs the TLS handshake as a client (STARTTLS was acknowledged), trusting the CA in
    /// `certs/ca-cert.pem` and presenting `certs/client-{cert,key}.pem`.
    pub fn start_tls(&mut self, certs: &Path) {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(certs.join("ca-cert.pem")).unwrap() {
            roots.add(ca.unwrap()).unwrap();
        }
        let chain: Vec<_> = CertificateDer::pem_file_iter(certs.join("client-cert.pem"))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_file(certs.join("client-key.pem")).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let Stream::Unix(sock) = std::mem::replace(&mut self.s, Stream::Taken) else {
            panic!("TLS over a Unix socket only");
        };
        let mut tls = rustls::StreamOwned::new(conn, sock);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .expect("the TLS handshake");
        }
        self.s = Stream::Tls(Box::new(tls));
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
            Stream::Taken => Ok(0),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
            Stream::Tls(s) => {
                let n = s.write(buf)?;
                s.flush()?;
                Ok(n)
            }
            Stream::Taken => Ok(0),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tls(s) => s.flush(),
            _ => Ok(()),
        }
    }
}

/// Connects to `addr` over TCP from the local address `source` (any address of the
/// 127.0.0.0/8 loopback range works as a distinct client on Linux).
pub fn tcp_from(source: std::net::Ipv4Addr, addr: &str) -> std::io::Result<std::net::TcpStream> {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let target: std::net::SocketAddrV4 = addr.parse().expect("an IPv4 host:port");
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(std::net::SocketAddrV4::new(source, 0)),
    )?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(target),
    )?;
    Ok(std::net::TcpStream::from(fd))
}

pub struct RawClient {
    pub s: Stream,
    pub structured: bool,
}

impl RawClient {
    pub fn connect(path: &Path) -> RawClient {
        let s = UnixStream::connect(path).expect("connect");
        Self::over(Stream::Unix(s))
    }

    pub fn over(s: Stream) -> RawClient {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        RawClient {
            s,
            structured: false,
        }
    }

    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        self.s.read_exact(&mut b).expect("read u16");
        u16::from_be_bytes(b)
    }
    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.s.read_exact(&mut b).expect("read u32");
        u32::from_be_bytes(b)
    }
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.s.read_exact(&mut b).expect("read u64");
        u64::from_be_bytes(b)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).expect("read bytes");
        v
    }
    /// Sends, reporting failure instead of panicking (the server may have been killed).
    pub fn try_send(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.s.write_all(b)
    }

    /// Reads one simple reply's error, or `None` when the connection is gone.
    pub fn try_simple_reply(&mut self) -> Option<u32> {
        let mut b = [0u8; 16];
        self.s.read_exact(&mut b).ok()?;
        Some(u32::from_be_bytes(b[4..8].try_into().unwrap()))
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    /// Reads the greeting and sends client flags.
    pub fn greet(&mut self, client_flags: u32) -> u16 {
        assert_eq!(self.u64(), NBDMAGIC);
        assert_eq!(self.u64(), IHAVEOPT);
        let flags = self.u16();
        self.send(&client_flags.to_be_bytes());
        flags
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    pub fn option_reply(&mut self) -> OptReply {
        assert_eq!(self.u64(), REPLY_MAGIC);
        let option = self.u32();
        let reply_type = self.u32();
        let len = self.u32();
        assert!(len < 1 << 20, "reply length {len}");
        let data = self.bytes(len as usize);
        OptReply {
            option,
            reply_type,
            data,
        }
    }

    /// Replies to one option, up to and including the final ACK or error.
    pub fn option_replies(&mut self) -> Vec<OptReply> {
        let mut v = Vec::new();
        loop {
            let r = self.option_reply();
            let last = r.reply_type == REP_ACK || r.reply_type & 0x8000_0000 != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    pub fn info_payload(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    pub fn meta_payload(name: &[u8], queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// Handshake to transmission with GO for export `name` (no structured replies);
    /// returns the export's size, or the error reply's type and message.
    pub fn go_named(&mut self, name: &str) -> Result<u64, (u32, String)> {
        self.greet(1);
        self.send_option(OPT_GO, &Self::info_payload(name.as_bytes(), &[]));
        let replies = self.option_replies();
        let last = replies.last().unwrap();
        if last.reply_type != REP_ACK {
            return Err((
                last.reply_type,
                String::from_utf8_lossy(&last.data).into_owned(),
            ));
        }
        let export = replies
            .iter()
            .find(|r| r.reply_type == REP_INFO && r.data[..2] == [0, 0])
            .expect("INFO_EXPORT");
        Ok(u64::from_be_bytes(export.data[2..10].try_into().unwrap()))
    }

    /// Full handshake to transmission with GO; returns (size, transmission flags).
    pub fn go(&mut self, structured: bool, contexts: &[&str]) -> (u64, u16) {
        self.greet(1);
        if structured {
            self.send_option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.option_replies().last().unwrap().reply_type, REP_ACK);
            self.structured = true;
            if !contexts.is_empty() {
                self.send_option(OPT_SET_META_CONTEXT, &Self::meta_payload(b"", contexts));
                assert_eq!(self.option_replies().last().unwrap().reply_type, REP_ACK);
            }
        }
        self.send_option(OPT_GO, &Self::info_payload(b"", &[]));
        let replies = self.option_replies();
        assert_eq!(replies.last().unwrap().reply_type, REP_ACK);
        let export = replies
            .iter()
            .find(|r| r.reply_type == REP_INFO && r.data[..2] == [0, 0])
            .expect("INFO_EXPORT");
        let size = u64::from_be_bytes(export.data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(export.data[10..12].try_into().unwrap());
        (size, flags)
    }

    pub fn request(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&command.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&length.to_be_bytes());
        m.extend_from_slice(payload);
        self.send(&m);
    }

    /// Reads one complete reply. `read_len` is the data length of a simple READ reply
    /// (simple replies do not say).
    pub fn reply(&mut self, read_len: usize) -> Reply {
        let magic = self.u32();
        if magic == SIMPLE_REPLY_MAGIC {
            let error = self.u32();
            let cookie = self.u64();
            let data = if error == 0 {
                self.bytes(read_len)
            } else {
                Vec::new()
            };
            return Reply {
                cookie,
                error,
                data,
            };
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "reply magic");
        let mut data = Vec::new();
        let mut error = 0;
        let mut magic = magic;
        loop {
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
            let flags = self.u16();
            let kind = self.u16();
            let cookie = self.u64();
            let len = self.u32() as usize;
            let payload = self.bytes(len);
            match kind {
                0 => {}
                1 => data.extend_from_slice(&payload[8..]),
                5 => data.extend_from_slice(&payload),
                k if k & 0x8000 != 0 => {
                    error = u32::from_be_bytes(payload[..4].try_into().unwrap())
                }
                k => panic!("unexpected chunk type {k}"),
            }
            if flags & 1 != 0 {
                return Reply {
                    cookie,
                    error,
                    data,
                };
            }
            magic = self.u32();
        }
    }

    /// Sends one request and reads its reply.
    pub fn call(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Reply {
        self.request(command, flags, 0x1234, offset, length, payload);
        let read_len = if command == CMD_READ {
            length as usize
        } else {
            0
        };
        let r = self.reply(read_len);
        assert_eq!(r.cookie, 0x1234);
        r
    }

    /// True when the server has closed the connection (reads EOF or a reset).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}
