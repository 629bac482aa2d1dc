//! TLS credentials for the NBD server (NBD_OPT_STARTTLS), with rustls.
//!
//! Certificates come from a directory in the layout nbdkit and qemu use: `ca-cert.pem` (the
//! CA that signs client certificates, needed with `--tls-verify-peer`), `server-cert.pem`
//! (the server's certificate, then its chain) and `server-key.pem`. They are read at start
//! and again on SIGHUP; a connection keeps the configuration it started with, so a reload
//! drops no one. A client's identity is its certificate's subject common name.
//!
//! TLS-PSK (`--tls-psk`, the psktool format GnuTLS clients read) is not offered: rustls has
//! no external pre-shared keys (it implements resumption PSKs only), and a second TLS stack
//! in C for one feature is not worth its weight here.
use super::socket::{Socket, Transport, READ_TICK};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// `--tls`: whether clients may, or must, upgrade to TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No STARTTLS (answered with NBD_REP_ERR_POLICY).
    Off,
    /// Plain-text clients and TLS clients alike.
    On,
    /// Every option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD until the upgrade.
    Require,
}

impl TlsMode {
    pub fn name(self) -> &'static str {
        match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        }
    }

    pub fn parse(text: &str) -> Option<TlsMode> {
        match text {
            "off" => Some(TlsMode::Off),
            "on" => Some(TlsMode::On),
            "require" => Some(TlsMode::Require),
            _ => None,
        }
    }
}

/// The server's certificates, replaceable while it runs.
pub struct Credentials {
    dir: PathBuf,
    verify_peer: bool,
    current: RwLock<Arc<ServerConfig>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("dir", &self.dir)
            .field("verify_peer", &self.verify_peer)
            .finish()
    }
}

impl Credentials {
    /// Reads the certificates in `dir`; every problem is a message naming the file.
    pub fn load(dir: &Path, verify_peer: bool) -> Result<Credentials, String> {
        let config = build_config(dir, verify_peer)?;
        Ok(Credentials {
            dir: dir.to_path_buf(),
            verify_peer,
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// Reads the certificates again (on SIGHUP). On error the old ones stay in use.
    pub fn reload(&self) -> Result<(), String> {
        let config = build_config(&self.dir, self.verify_peer)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        Ok(())
    }

    /// The configuration a new connection uses.
    pub fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build_config(dir: &Path, verify_peer: bool) -> Result<ServerConfig, String> {
    let cert_path = dir.join("server-cert.pem");
    let key_path = dir.join("server-key.pem");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| format!("{}: {e}", cert_path.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", cert_path.display()));
    }
    warn_if_others_can_read(&key_path);
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = if verify_peer {
        let ca_path = dir.join("ca-cert.pem");
        let mut roots = RootCertStore::empty();
        let cas = CertificateDer::pem_file_iter(&ca_path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e}", ca_path.display()))?;
        for ca in cas {
            roots
                .add(ca)
                .map_err(|e| format!("{}: {e}", ca_path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!(
                "{}: no CA certificate in it (--tls-verify-peer needs one)",
                ca_path.display()
            ));
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| format!("{}: {e}", ca_path.display()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("{} and {}: {e}", cert_path.display(), key_path.display()))
}

/// A private key others can read is a key others may have: say so (as ssh does).
fn warn_if_others_can_read(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            eprintln!(
                "cowimg: warning: {} is readable by {} (mode {:o}); it should be 0600",
                path.display(),
                if mode & 0o007 != 0 {
                    "others"
                } else {
                    "its group"
                },
                mode & 0o777
            );
        }
    }
}

/// The subject common name of a DER certificate: the identity `--allow` lists name.
pub fn subject_common_name(cert: &[u8]) -> Option<String> {
    // Certificate ::= SEQUENCE { tbsCertificate, ... }; TBSCertificate ::= SEQUENCE {
    // [0] version OPTIONAL, serialNumber, signature, issuer, validity, subject, ... }
    let (cert_body, _) = der::expect(cert, der::SEQUENCE)?;
    let (tbs, _) = der::expect(cert_body, der::SEQUENCE)?;
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = der::element(rest)?.2;
    }
    for _ in 0..4 {
        rest = der::element(rest)?.2; // serial, signature, issuer, validity
    }
    let (subject, _) = der::expect(rest, der::SEQUENCE)?;
    // Name ::= SEQUENCE OF RelativeDistinguishedName (SET OF AttributeTypeAndValue); the
    // last common name is the most specific one.
    let mut found = None;
    let mut rdns = subject;
    while !rdns.is_empty() {
        let (set, after) = der::expect(rdns, der::SET)?;
        rdns = after;
        let mut attributes = set;
        while !attributes.is_empty() {
            let (attribute, after) = der::expect(attributes, der::SEQUENCE)?;
            attributes = after;
            let (oid, value) = der::expect(attribute, der::OID)?;
            if oid == der::COMMON_NAME {
                let (tag, text, _) = der::element(value)?;
                if matches!(tag, 0x0c | 0x13 | 0x16) {
                    found = std::str::from_utf8(text).ok().map(str::to_string);
                }
            }
        }
    }
    found
}

/// Just enough DER to walk to a certificate's subject. Every length is checked against the
/// bytes that are there, so a malformed certificate gives `None`, never a panic.
mod der {
    pub const SEQUENCE: u8 = 0x30;
    pub const SET: u8 = 0x31;
    pub const OID: u8 = 0x06;
    /// 2.5.4.3, id-at-commonName.
    pub const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

    /// (tag, contents, the bytes after the element).
    pub fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (first as usize, rest)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |l, &b| (l << 8) | b as usize);
            (len, &rest[n..])
        };
        if len > rest.len() {
            return None;
        }
        Some((tag, &rest[..len], &rest[len..]))
    }

    /// The contents of an element with tag `tag`, and the bytes after it.
    pub fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (t, contents, rest) = element(input)?;
        (t == tag).then_some((contents, rest))
    }
}

/// A connection after STARTTLS: rustls over the socket, shared by the connection's reader
/// and writers. Records are read and written without blocking; the writer encrypts under
/// the lock and sends outside it (under the connection's output lock, which keeps records
/// in order), so a slow reader of replies never blocks the reading of requests.
pub(crate) struct TlsSocket {
    socket: Socket,
    conn: Mutex<rustls::ServerConnection>,
    /// Ciphertext read from the socket and not yet handed to rustls. rustls asks for 4 KiB
    /// at a time; reading the socket in large pieces keeps a 1 MiB WRITE payload to a few
    /// system calls instead of 256. Only the connection's reader uses it.
    incoming: Mutex<Incoming>,
    /// Ciphertext on its way out, kept for the next reply.
    outgoing: Mutex<Vec<u8>>,
    /// The client certificate's subject common name, if it sent one.
    pub identity: Option<String>,
}

/// Plaintext is encrypted and sent in pieces of this size, so that a 32 MiB reply does not
/// need a second 32 MiB of ciphertext.
const SEND_PIECE: usize = 256 << 10;

/// The size of the reads of ciphertext from the socket.
const INCOMING: usize = 256 << 10;

struct Incoming {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// Reads what the socket has into rustls, without blocking: buffered ciphertext first, and
/// the buffer refilled from the socket in one large read when it is empty.
struct BufferedNonBlocking<'a> {
    incoming: &'a mut Incoming,
    socket: &'a Socket,
}

impl Read for BufferedNonBlocking<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let inc = &mut *self.incoming;
        if inc.start == inc.end {
            inc.start = 0;
            inc.end = 0;
            inc.end = self.socket.read_available(&mut inc.buf)?;
            if inc.end == 0 {
                return Ok(0);
            }
        }
        let n = out.len().min(inc.end - inc.start);
        out[..n].copy_from_slice(&inc.buf[inc.start..inc.start + n]);
        inc.start += n;
        Ok(n)
    }
}

impl TlsSocket {
    /// Runs the TLS handshake on `socket` (the client has been told to start it), all of it
    /// before `deadline`.
    pub fn accept(
        socket: Socket,
        config: Arc<ServerConfig>,
        deadline: Instant,
    ) -> io::Result<TlsSocket> {
        let mut conn = rustls::ServerConnection::new(config)
            .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
        let mut incoming = Incoming {
            buf: vec![0u8; INCOMING].into_boxed_slice(),
            start: 0,
            end: 0,
        };
        let left = || {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                ))
            } else {
                Ok(left)
            }
        };
        while conn.is_handshaking() {
            if conn.wants_write() {
                let mut out = Vec::new();
                while conn.wants_write() {
                    conn.write_tls(&mut out)?;
                }
                socket.write_all_vectored(&[&out], Some(left()?))?;
                continue;
            }
            let mut source = BufferedNonBlocking {
                incoming: &mut incoming,
                socket: &socket,
            };
            match conn.read_tls(&mut source) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed the connection during the TLS handshake",
                    ))
                }
                Ok(_) => {
                    if let Err(e) = conn.process_new_packets() {
                        // Tell the client why (an alert), as far as it listens.
                        let mut out = Vec::new();
                        while conn.wants_write() && conn.write_tls(&mut out).is_ok() {}
                        let _ = socket.write_all_vectored(&[&out], Some(Duration::from_secs(1)));
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("TLS handshake failed: {e}"),
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    socket.wait(true, Some(left()?))?;
                }
                Err(e) => return Err(e),
            }
        }
        // What rustls still has to say after the handshake (TLS 1.3 session tickets) goes
        // now: a client may wait for it before it sends anything.
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out)?;
        }
        if !out.is_empty() {
            socket.write_all_vectored(&[&out], Some(left()?))?;
        }
        let identity = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| subject_common_name(cert));
        Ok(TlsSocket {
            socket,
            conn: Mutex::new(conn),
            // What the handshake read past its last record is the client's first option.
            incoming: Mutex::new(incoming),
            outgoing: Mutex::new(Vec::new()),
            identity,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, rustls::ServerConnection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Transport for TlsSocket {
    fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut incoming = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            {
                let mut conn = self.lock();
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n), // 0: the client sent close_notify
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                let mut source = BufferedNonBlocking {
                    incoming: &mut incoming,
                    socket: &self.socket,
                };
                match conn.read_tls(&mut source) {
                    Ok(0) => return Ok(0),
                    Ok(_) => {
                        conn.process_new_packets().map_err(|e| {
                            io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
                        })?;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            // Nothing yet: wait for the socket outside the lock, so writers can go on.
            if !self.socket.wait(true, Some(READ_TICK))?.readable {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
    }

    fn set_read_tick(&self) -> io::Result<()> {
        Ok(()) // reads never block on the socket; `read_some` polls for one tick
    }

    fn peer_closed(&self) -> bool {
        self.socket.peer_closed()
    }

    fn write_all_vectored(&self, parts: &[&[u8]], timeout: Option<Duration>) -> io::Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut pending: &[u8] = &[];
        let mut rest = parts.iter();
        // Replies are written one at a time (under the connection's output lock), so one
        // buffer of ciphertext serves them all instead of an allocation per reply.
        let mut out = self.outgoing.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // Encrypt up to SEND_PIECE bytes of plaintext, under the lock.
            out.clear();
            {
                let mut conn = self.lock();
                let mut taken = 0;
                while taken < SEND_PIECE {
                    if pending.is_empty() {
                        match rest.next() {
                            Some(p) => pending = p,
                            None => break,
                        }
                        continue;
                    }
                    let n = (SEND_PIECE - taken).min(pending.len());
                    let written = conn.writer().write(&pending[..n])?;
                    if written == 0 {
                        break; // rustls' buffer is full: send what it holds first
                    }
                    pending = &pending[written..];
                    taken += written;
                }
                while conn.wants_write() {
                    conn.write_tls(&mut *out)?;
                }
            }
            if out.is_empty() && pending.is_empty() && rest.len() == 0 {
                return Ok(());
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client did not read the reply in time",
                ));
            }
            self.socket.write_all_vectored(&[&out], left)?;
        }
    }

    fn shutdown(&self, how: Shutdown) {
        self.socket.shutdown(how)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DER length.
    fn len(n: usize) -> Vec<u8> {
        if n < 0x80 {
            vec![n as u8]
        } else {
            vec![0x82, (n >> 8) as u8, n as u8]
        }
    }

    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend(len(body.len()));
        v.extend_from_slice(body);
        v
    }

    fn name(cn: &str) -> Vec<u8> {
        let country = tlv(0x30, &[tlv(0x06, &[0x55, 4, 6]), tlv(0x13, b"XX")].concat());
        let common = tlv(
            0x30,
            &[tlv(0x06, &[0x55, 4, 3]), tlv(0x0c, cn.as_bytes())].concat(),
        );
        tlv(0x30, &[tlv(0x31, &country), tlv(0x31, &common)].concat())
    }

    fn certificate(subject_cn: &str) -> Vec<u8> {
        let tbs = [
            tlv(0xa0, &tlv(0x02, &[2])),
            tlv(0x02, &[1]),
            tlv(0x30, &tlv(0x06, &[0x2a, 0x86, 0x48])),
            name("issuer"),
            tlv(0x30, &[]),
            name(subject_cn),
        ]
        .concat();
        tlv(
            0x30,
            &[tlv(0x30, &tbs), tlv(0x30, &[]), tlv(0x03, &[0])].concat(),
        )
    }

    #[test]
    fn the_subject_common_name_is_read_and_not_the_issuers() {
        assert_eq!(
            subject_common_name(&certificate("client-a")).as_deref(),
            Some("client-a")
        );
    }

    #[test]
    fn a_truncated_or_garbled_certificate_has_no_name_and_no_panic() {
        let cert = certificate("client-a");
        for cut in 0..cert.len() {
            let _ = subject_common_name(&cert[..cut]);
        }
        let mut flipped = cert.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xff;
            let _ = subject_common_name(&flipped);
            flipped[i] ^= 0xff;
        }
        assert_eq!(
            subject_common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            None
        );
    }

    #[test]
    fn tls_modes_parse_as_nbdkit_spells_them() {
        assert_eq!(TlsMode::parse("require"), Some(TlsMode::Require));
        assert_eq!(TlsMode::parse("on"), Some(TlsMode::On));
        assert_eq!(TlsMode::parse("off"), Some(TlsMode::Off));
        assert_eq!(TlsMode::parse("yes"), None);
    }
}
