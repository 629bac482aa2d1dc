//! A small, read-only NBD client for the reading commands (`compare`, `map`, `measure`)
//! given an NBD URI: the fixed newstyle handshake with `NBD_OPT_GO`, then `NBD_CMD_READ`
//! with simple replies (structured replies are never negotiated), one request at a time.
//!
//! The server is not trusted: every length it sends is checked against a bound before
//! anything is allocated, and every read and write on the socket has a timeout, so a
//! server that stalls or lies ends the command with an error instead of a hang.
use super::protocol::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

/// Most bytes asked for in one READ: well under every server's maximum block size.
const READ_CHUNK: usize = 1 << 20;
/// Option replies larger than this are refused (the server sends at most a few strings).
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// How long the server may take to answer anything.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Where an NBD URI points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(String),
    Unix(std::path::PathBuf),
}

/// A parsed `nbd://HOST[:PORT][/EXPORT]` or `nbd+unix:///[EXPORT]?socket=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    pub address: Address,
    pub export: String,
}

/// Whether a command-line argument names an NBD export rather than a file.
pub fn is_uri(text: &str) -> bool {
    text.starts_with("nbd://") || text.starts_with("nbd+unix://")
}

/// Parses the two URI forms qemu and libnbd take without TLS.
pub fn parse_uri(text: &str) -> Result<Uri, String> {
    let bad = |why: &str| format!("{text}: {why}");
    if let Some(rest) = text.strip_prefix("nbd+unix://") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let export = path.strip_prefix('/').unwrap_or(path).to_string();
        let socket = query
            .split('&')
            .find_map(|pair| pair.strip_prefix("socket="))
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("nbd+unix:// needs ?socket=PATH"))?;
        return Ok(Uri {
            address: Address::Unix(socket.into()),
            export,
        });
    }
    let rest = text
        .strip_prefix("nbd://")
        .ok_or_else(|| bad("not an nbd:// or nbd+unix:// URI"))?;
    if rest.contains('?') {
        return Err(bad("query parameters are not supported in nbd:// URIs"));
    }
    let (host, export) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return Err(bad("no host"));
    }
    // A bracketed IPv6 address keeps its colons; a port is what follows the last colon
    // outside brackets.
    let has_port = match host.rfind(']') {
        Some(close) => host[close..].contains(':'),
        None => host.contains(':'),
    };
    let address = if has_port {
        host.to_string()
    } else {
        format!("{host}:10809")
    };
    Ok(Uri {
        address: Address::Tcp(address),
        export: export.to_string(),
    })
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// An open export, read-only.
pub struct Client {
    uri: String,
    size: u64,
    stream: Mutex<Box<dyn Stream>>,
}

type IoResult<T> = std::io::Result<T>;

fn protocol_error(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

fn read_u16(s: &mut dyn Stream) -> IoResult<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut dyn Stream) -> IoResult<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut dyn Stream) -> IoResult<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl Client {
    /// Connects and negotiates the export the URI names.
    pub fn connect(text: &str) -> crate::Result<Client> {
        let uri = parse_uri(text).map_err(|reason| crate::Error::Invalid {
            path: text.into(),
            reason,
        })?;
        let fail = |op: &'static str| {
            move |source: std::io::Error| crate::Error::File {
                path: text.into(),
                op,
                source,
            }
        };
        let mut stream: Box<dyn Stream> = match &uri.address {
            Address::Tcp(address) => {
                let s = TcpStream::connect(address).map_err(fail("connecting"))?;
                s.set_read_timeout(Some(TIMEOUT))
                    .map_err(fail("connecting"))?;
                s.set_write_timeout(Some(TIMEOUT))
                    .map_err(fail("connecting"))?;
                s.set_nodelay(true).map_err(fail("connecting"))?;
                Box::new(s)
            }
            Address::Unix(path) => {
                let s = UnixStream::connect(path).map_err(fail("connecting"))?;
                s.set_read_timeout(Some(TIMEOUT))
                    .map_err(fail("connecting"))?;
                s.set_write_timeout(Some(TIMEOUT))
                    .map_err(fail("connecting"))?;
                Box::new(s)
            }
        };
        let size = handshake(stream.as_mut(), &uri.export).map_err(fail("negotiating"))?;
        Ok(Client {
            uri: text.into(),
            size,
            stream: Mutex::new(stream),
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the export's end read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
        let avail = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let mut done = 0;
        while done < avail {
            let n = (avail - done).min(READ_CHUNK);
            let at = offset + done as u64;
            read_request(stream.as_mut(), &mut buf[done..done + n], at).map_err(|source| {
                crate::Error::Io {
                    path: self.uri.clone().into(),
                    op: "reading over NBD",
                    offset: at,
                    source,
                }
            })?;
            done += n;
        }
        Ok(())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let stream = self.stream.get_mut().unwrap_or_else(|e| e.into_inner());
        // Best effort: the server treats a vanished client the same way.
        let _ = stream.write_all(&request(CMD_DISC, 0, 0, 0));
    }
}

fn request(command: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut r = [0u8; 28];
    r[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    r[4..6].copy_from_slice(&0u16.to_be_bytes());
    r[6..8].copy_from_slice(&command.to_be_bytes());
    r[8..16].copy_from_slice(&cookie.to_be_bytes());
    r[16..24].copy_from_slice(&offset.to_be_bytes());
    r[24..28].copy_from_slice(&length.to_be_bytes());
    r
}

fn read_request(s: &mut dyn Stream, buf: &mut [u8], offset: u64) -> IoResult<()> {
    let cookie = offset; // one request in flight: any value the reply must echo
    s.write_all(&request(CMD_READ, cookie, offset, buf.len() as u32))?;
    let magic = read_u32(s)?;
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(protocol_error(format!(
            "reply magic {magic:#x} is not the simple reply's (structured replies were not negotiated)"
        )));
    }
    let error = read_u32(s)?;
    let echoed = read_u64(s)?;
    if echoed != cookie {
        return Err(protocol_error(format!(
            "reply cookie {echoed:#x} does not match the request's {cookie:#x}"
        )));
    }
    if error != 0 {
        return Err(std::io::Error::from_raw_os_error(error as i32));
    }
    s.read_exact(buf)
}

/// Fixed newstyle handshake and `NBD_OPT_GO`; returns the export's size.
fn handshake(s: &mut dyn Stream, export: &str) -> IoResult<u64> {
    if read_u64(s)? != NBDMAGIC {
        return Err(protocol_error("not an NBD server (bad magic)".into()));
    }
    if read_u64(s)? != IHAVEOPT {
        return Err(protocol_error(
            "the server does not speak the newstyle handshake".into(),
        ));
    }
    let flags = read_u16(s)?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol_error(
            "the server does not speak the fixed newstyle handshake".into(),
        ));
    }
    let mut client_flags = CLIENT_FIXED_NEWSTYLE;
    if flags & FLAG_NO_ZEROES != 0 {
        client_flags |= CLIENT_NO_ZEROES;
    }
    s.write_all(&client_flags.to_be_bytes())?;
    if export.len() > 4096 {
        return Err(protocol_error("export name longer than 4096 bytes".into()));
    }
    let mut data = Vec::with_capacity(6 + export.len());
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes()); // no information requests
    let mut option = Vec::with_capacity(16 + data.len());
    option.extend_from_slice(&IHAVEOPT.to_be_bytes());
    option.extend_from_slice(&OPT_GO.to_be_bytes());
    option.extend_from_slice(&(data.len() as u32).to_be_bytes());
    option.extend_from_slice(&data);
    s.write_all(&option)?;
    let mut size = None;
    loop {
        if read_u64(s)? != OPTION_REPLY_MAGIC {
            return Err(protocol_error("bad option reply magic".into()));
        }
        let replied_to = read_u32(s)?;
        let kind = read_u32(s)?;
        let len = read_u32(s)?;
        if replied_to != OPT_GO {
            return Err(protocol_error(format!(
                "reply to option {replied_to}, not to NBD_OPT_GO"
            )));
        }
        if len > MAX_OPTION_REPLY {
            return Err(protocol_error(format!(
                "option reply of {len} bytes (at most {MAX_OPTION_REPLY})"
            )));
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload)?;
        match kind {
            REP_ACK => break,
            REP_INFO
                if payload.len() >= 12
                    && u16::from_be_bytes([payload[0], payload[1]]) == INFO_EXPORT =>
            {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&payload[2..10]);
                size = Some(u64::from_be_bytes(bytes));
            }
            kind if kind & (1 << 31) != 0 => {
                let message = String::from_utf8_lossy(&payload);
                return Err(protocol_error(format!(
                    "the server refused export '{export}' (error {:#x}{}{message})",
                    kind,
                    if message.is_empty() { "" } else { ": " }
                )));
            }
            _ => {} // a reply this client did not ask for the meaning of
        }
    }
    size.ok_or_else(|| protocol_error("the server did not send the export's size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_name_a_tcp_or_unix_address_and_an_export() {
        assert_eq!(
            parse_uri("nbd://localhost").unwrap(),
            Uri {
                address: Address::Tcp("localhost:10809".into()),
                export: String::new()
            }
        );
        assert_eq!(
            parse_uri("nbd://127.0.0.1:1234/disk").unwrap(),
            Uri {
                address: Address::Tcp("127.0.0.1:1234".into()),
                export: "disk".into()
            }
        );
        assert_eq!(
            parse_uri("nbd://[::1]/x").unwrap().address,
            Address::Tcp("[::1]:10809".into())
        );
        assert_eq!(
            parse_uri("nbd+unix:///exp?socket=/run/s.sock").unwrap(),
            Uri {
                address: Address::Unix("/run/s.sock".into()),
                export: "exp".into()
            }
        );
        assert!(parse_uri("nbd+unix:///").is_err());
        assert!(parse_uri("nbd://").is_err());
        assert!(parse_uri("nbds://host").is_err());
        assert!(parse_uri("nbd://host?tls=on").is_err());
    }
}
