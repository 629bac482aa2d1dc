//! The fixed newstyle handshake: greeting, client flags, then options until the client
//! picks the export (GO or EXPORT_NAME), aborts, or breaks a rule.
//!
//! Every length the client sends is checked before anything is allocated for it: option
//! payloads are capped at [`MAX_OPTION_LEN`] and strings at [`MAX_STRING`].
use super::protocol::*;
use super::tls::TlsMode;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Name of the standard allocation context.
pub const CONTEXT_ALLOCATION: &str = "base:allocation";
/// Name of our context telling which layer of the backing chain holds each range; see
/// [`crate::nbd`] for its values.
pub const CONTEXT_LAYER: &str = "cowimg:layer";
/// Unknown export names logged per connection.
const MAX_UNKNOWN_LOGGED: u32 = 3;
/// The IDs we give the contexts when a client selects them.
pub const CONTEXT_ID_ALLOCATION: u32 = 1;
pub const CONTEXT_ID_LAYER: u32 = 2;

/// What the server says about one export.
pub(crate) struct ExportInfo {
    /// The export's canonical name (sent for NBD_INFO_NAME).
    pub name: String,
    pub size: u64,
    pub read_only: bool,
    /// Sent only when the operator set one: a default would reveal server file names.
    pub description: Option<String>,
}

/// The exports a server offers, as the handshake sees them.
pub(crate) trait Catalog {
    /// What the connection needs of the export it picked.
    type Export;
    /// The export a client asks for by name, or why there is none (sent to the client).
    /// It may create the export (overlays on demand), so it is only called for names a
    /// client sent in INFO, GO, EXPORT_NAME or a meta context request.
    fn find(&self, requested: &[u8]) -> Result<(ExportInfo, Self::Export), String>;
    /// Names and descriptions for NBD_OPT_LIST.
    fn list(&self) -> Vec<(String, String)>;
    /// The client identities (certificate common names) allowed to use the export `name`;
    /// `None`: anyone.
    fn allowed(&self, _name: &str) -> Option<Vec<String>> {
        None
    }
}

/// The connection a handshake runs on, which STARTTLS can upgrade.
pub(crate) trait Channel: Read + Write {
    fn tls_mode(&self) -> TlsMode;
    /// Runs the TLS handshake (the client was told to start it); afterwards every byte is
    /// encrypted. Returns the client certificate's subject common name, if any.
    fn start_tls(&mut self) -> io::Result<Option<String>>;
}

impl ExportInfo {
    /// The transmission flags. CAN_MULTI_CONN is true here: all connections share one
    /// `Image`, and `Image::flush` makes every completed write durable, whichever
    /// connection made it.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_CAN_MULTI_CONN
            | TFLAG_SEND_CACHE;
        if self.read_only {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
        }
        if structured {
            f |= TFLAG_SEND_DF;
        }
        f
    }
}

/// The meta contexts a client selected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MetaContexts {
    pub allocation: bool,
    pub layer: bool,
}

impl MetaContexts {
    pub fn any(&self) -> bool {
        self.allocation || self.layer
    }
}

/// The result of a successful handshake.
pub(crate) struct Negotiated<E> {
    /// The client upgraded with STARTTLS.
    pub tls: bool,
    /// Its certificate's subject common name, if it sent one.
    pub identity: Option<String>,
    pub structured: bool,
    pub contexts: MetaContexts,
    pub export_name: String,
    pub export: E,
    /// The option that entered transmission: "GO" or "EXPORT_NAME".
    pub entered_with: &'static str,
}

/// Why a handshake ended without reaching transmission.
#[derive(Debug)]
pub(crate) enum HandshakeEnd {
    /// The client sent NBD_OPT_ABORT.
    Aborted,
    /// The client broke the protocol; we hung up.
    Violation(String),
    /// The socket failed or the client went away (or the handshake timed out).
    Io(io::Error),
}

impl std::fmt::Display for HandshakeEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeEnd::Aborted => write!(f, "client aborted the handshake"),
            HandshakeEnd::Violation(m) => write!(f, "protocol violation during handshake: {m}"),
            HandshakeEnd::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                write!(f, "client closed the connection during the handshake")
            }
            HandshakeEnd::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                write!(f, "handshake timed out")
            }
            HandshakeEnd::Io(e) => write!(f, "handshake failed: {e}"),
        }
    }
}

impl From<io::Error> for HandshakeEnd {
    fn from(e: io::Error) -> Self {
        HandshakeEnd::Io(e)
    }
}

fn violation<T>(msg: impl Into<String>) -> Result<T, HandshakeEnd> {
    Err(HandshakeEnd::Violation(msg.into()))
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads a length-prefixed string from `data` at `*pos`, checking it against both the
/// bytes left and [`MAX_STRING`].
fn take_string<'d>(data: &'d [u8], pos: &mut usize) -> Result<&'d [u8], String> {
    let rest = &data[*pos..];
    if rest.len() < 4 {
        return Err("string length runs past the end of the option".into());
    }
    let len = be_u32(rest) as usize;
    if len > MAX_STRING {
        return Err(format!(
            "string of {len} bytes is longer than the {MAX_STRING} allowed"
        ));
    }
    if len > rest.len() - 4 {
        return Err(format!(
            "string of {len} bytes runs past the end of the option"
        ));
    }
    *pos += 4 + len;
    Ok(&rest[4..4 + len])
}

/// The payload of NBD_OPT_INFO / NBD_OPT_GO: an export name and a list of info types.
fn parse_info_request(data: &[u8]) -> Result<(&[u8], Vec<u16>), String> {
    let mut pos = 0;
    let name = take_string(data, &mut pos)?;
    let rest = &data[pos..];
    if rest.len() < 2 {
        return Err("missing the count of information requests".into());
    }
    let n = be_u16(rest) as usize;
    if rest.len() != 2 + 2 * n {
        return Err(format!(
            "{n} information requests do not match the option length"
        ));
    }
    Ok((name, rest[2..].chunks_exact(2).map(be_u16).collect()))
}

/// The payload of NBD_OPT_LIST/SET_META_CONTEXT: an export name and queries.
fn parse_meta_request(data: &[u8]) -> Result<(&[u8], Vec<&[u8]>), String> {
    let mut pos = 0;
    let name = take_string(data, &mut pos)?;
    if data.len() - pos < 4 {
        return Err("missing the count of queries".into());
    }
    let count = be_u32(&data[pos..]) as usize;
    pos += 4;
    // Every query takes at least four bytes, which bounds the loop by the option length.
    if count > (data.len() - pos) / 4 {
        return Err(format!("{count} queries do not fit in the option"));
    }
    let mut queries = Vec::new();
    for _ in 0..count {
        queries.push(take_string(data, &mut pos)?);
    }
    if pos != data.len() {
        return Err("trailing bytes after the last query".into());
    }
    Ok((name, queries))
}

/// Contexts a LIST query matches: exact names, or a namespace wildcard ("base:").
fn list_matches(query: &[u8]) -> MetaContexts {
    MetaContexts {
        allocation: query == b"base:" || query == CONTEXT_ALLOCATION.as_bytes(),
        layer: query == b"cowimg:" || query == CONTEXT_LAYER.as_bytes(),
    }
}

/// Contexts a SET query selects: exact names only (the spec says wildcards select none).
fn set_matches(query: &[u8]) -> MetaContexts {
    MetaContexts {
        allocation: query == CONTEXT_ALLOCATION.as_bytes(),
        layer: query == CONTEXT_LAYER.as_bytes(),
    }
}

fn lossy(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let mut s: String = s.chars().filter(|c| !c.is_control()).collect();
    if s.len() > 64 {
        let mut cut = 64;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

struct Session<'a, S: Channel, C: Catalog> {
    io: &'a mut S,
    /// STARTTLS happened.
    upgraded: bool,
    identity: Option<String>,
    catalog: &'a C,
    /// Names the connection in log lines.
    who: &'a str,
    /// Unknown names logged so far: a client looping over INFO must not flood the log.
    unknown_logged: u32,
    shutting_down: &'a AtomicBool,
    structured: bool,
    contexts: MetaContexts,
    out: Vec<u8>,
}

impl<S: Channel, C: Catalog> Session<'_, S, C> {
    fn send(&mut self) -> io::Result<()> {
        let r = self.io.write_all(&self.out);
        self.out.clear();
        r
    }

    fn reply(&mut self, option: u32, reply_type: u32, payload: &[&[u8]]) -> io::Result<()> {
        option_reply(&mut self.out, option, reply_type, payload);
        self.send()
    }

    fn error(&mut self, option: u32, reply_type: u32, message: &str) -> io::Result<()> {
        self.reply(option, reply_type, &[message.as_bytes()])
    }

    fn run(&mut self) -> Result<Negotiated<C::Export>, HandshakeEnd> {
        self.io.write_all(&greeting())?;
        let mut flags = [0u8; 4];
        self.io.read_exact(&mut flags)?;
        let client_flags = u32::from_be_bytes(flags);
        if client_flags & !KNOWN_CLIENT_FLAGS != 0 {
            return violation(format!("unknown client flags {client_flags:#x}"));
        }
        let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
        loop {
            let mut h = [0u8; OPTION_HEADER_LEN];
            self.io.read_exact(&mut h)?;
            let h = OptionHeader::parse(&h);
            if h.magic != IHAVEOPT {
                return violation(format!("bad option magic {:#018x}", h.magic));
            }
            let limit = if h.option == OPT_EXPORT_NAME {
                MAX_STRING as u32
            } else {
                MAX_OPTION_LEN
            };
            if h.length > limit {
                // The stream cannot be resynchronised without reading the payload, which
                // we refuse to do: say why, then hang up.
                if h.option != OPT_EXPORT_NAME {
                    let msg = format!(
                        "option length {} exceeds the {limit} bytes this server accepts",
                        h.length
                    );
                    self.error(h.option, REP_ERR_TOO_BIG, &msg)?;
                }
                return violation(format!(
                    "option {} with length {} (limit {limit})",
                    h.option, h.length
                ));
            }
            let mut data = vec![0u8; h.length as usize];
            self.io.read_exact(&mut data)?;
            if self.shutting_down.load(Ordering::Relaxed) && h.option != OPT_ABORT {
                self.error(h.option, REP_ERR_SHUTDOWN, "server is shutting down")?;
                continue;
            }
            if self.io.tls_mode() == TlsMode::Require
                && !self.upgraded
                && !matches!(h.option, OPT_STARTTLS | OPT_ABORT)
            {
                if h.option == OPT_EXPORT_NAME {
                    // EXPORT_NAME has no error reply: the only refusal is to hang up.
                    return violation("EXPORT_NAME before STARTTLS on a server that requires TLS");
                }
                self.error(
                    h.option,
                    REP_ERR_TLS_REQD,
                    "this server requires TLS (NBD_OPT_STARTTLS)",
                )?;
                continue;
            }
            match h.option {
                OPT_EXPORT_NAME => {
                    let (info, export) = match self.catalog.find(&data) {
                        Ok(found) => found,
                        // There is no way to refuse EXPORT_NAME but to hang up.
                        Err(why) => return violation(format!("EXPORT_NAME: {why}")),
                    };
                    if let Err(why) = self.check_allowed(&info.name) {
                        return violation(format!("EXPORT_NAME: {why}"));
                    }
                    let flags = info.transmission_flags(self.structured);
                    self.out.extend_from_slice(&info.size.to_be_bytes());
                    self.out.extend_from_slice(&flags.to_be_bytes());
                    if !no_zeroes {
                        self.out.extend_from_slice(&[0u8; 124]);
                    }
                    self.send()?;
                    return Ok(self.negotiated(&data, export, "EXPORT_NAME"));
                }
                OPT_ABORT => {
                    // The client may already have closed its end; the ACK is a courtesy.
                    let _ = self.reply(h.option, REP_ACK, &[]);
                    return Err(HandshakeEnd::Aborted);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        self.error(h.option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                        continue;
                    }
                    let listed = self.catalog.list();
                    let visible: Vec<_> = listed
                        .into_iter()
                        .filter(|(name, _)| self.check_allowed(name).is_ok())
                        .collect();
                    for (name, description) in visible {
                        let name = &name.as_bytes()[..name.len().min(MAX_STRING)];
                        let description =
                            &description.as_bytes()[..description.len().min(MAX_STRING)];
                        option_reply(
                            &mut self.out,
                            h.option,
                            REP_SERVER,
                            &[&(name.len() as u32).to_be_bytes(), name, description],
                        );
                        // Sent as it goes: a thousand exports are not held in one buffer.
                        if self.out.len() >= 64 * 1024 {
                            self.send()?;
                        }
                    }
                    self.reply(h.option, REP_ACK, &[])?;
                }
                OPT_STARTTLS => self.starttls(h.option, &data)?,
                OPT_INFO | OPT_GO => {
                    if let Some(export) = self.info(h.option, &data)? {
                        if h.option == OPT_GO {
                            let (name, _) = parse_info_request(&data).unwrap_or((&[], Vec::new()));
                            return Ok(self.negotiated(name, export, "GO"));
                        }
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        self.error(
                            h.option,
                            REP_ERR_INVALID,
                            "NBD_OPT_STRUCTURED_REPLY takes no data",
                        )?;
                        continue;
                    }
                    self.structured = true;
                    self.reply(h.option, REP_ACK, &[])?;
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    self.meta_context(h.option, &data)?
                }
                other => self.error(
                    other,
                    REP_ERR_UNSUP,
                    &format!("option {other} is not supported by this server"),
                )?,
            }
        }
    }

    /// NBD_OPT_STARTTLS: acknowledged in plain text, then the TLS handshake. Everything
    /// negotiated before it is forgotten (CVE-2021-3716: state from before the upgrade
    /// must not survive it).
    fn starttls(&mut self, option: u32, data: &[u8]) -> Result<(), HandshakeEnd> {
        if self.io.tls_mode() == TlsMode::Off {
            self.error(
                option,
                REP_ERR_POLICY,
                "TLS is not enabled on this server (--tls)",
            )?;
            return Ok(());
        }
        if !data.is_empty() {
            self.error(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")?;
            return Ok(());
        }
        if self.upgraded {
            self.error(option, REP_ERR_INVALID, "TLS is already in use")?;
            return Ok(());
        }
        self.reply(option, REP_ACK, &[])?;
        self.identity = self.io.start_tls()?;
        self.upgraded = true;
        self.structured = false;
        self.contexts = MetaContexts::default();
        eprintln!(
            "cowimg: {}: TLS, client {}",
            self.who,
            self.identity
                .as_deref()
                .map_or("without a certificate".to_string(), |id| format!(
                    "\"{id}\""
                ))
        );
        Ok(())
    }

    /// Whether this connection's client may use the export `name`.
    fn check_allowed(&self, name: &str) -> Result<(), String> {
        let Some(allowed) = self.catalog.allowed(name) else {
            return Ok(());
        };
        match &self.identity {
            Some(id) if allowed.iter().any(|a| a == id) => Ok(()),
            Some(id) => Err(format!("client \"{id}\" is not allowed to use export \"{name}\"")),
            None => Err(format!(
                "export \"{name}\" needs a client certificate (TLS with --tls-verify-peer); this client is not allowed"
            )),
        }
    }

    fn negotiated(
        &self,
        name: &[u8],
        export: C::Export,
        entered_with: &'static str,
    ) -> Negotiated<C::Export> {
        Negotiated {
            tls: self.upgraded,
            identity: self.identity.clone(),
            structured: self.structured,
            contexts: self.contexts,
            export_name: lossy(name),
            export,
            entered_with,
        }
    }

    /// Looks `name` up; an unknown name is answered with `REP_ERR_UNKNOWN` and logged, since
    /// the operator may have expected the export to exist.
    fn find(&mut self, option: u32, name: &[u8]) -> io::Result<Option<(ExportInfo, C::Export)>> {
        match self.catalog.find(name) {
            Ok(found) => match self.check_allowed(&found.0.name) {
                Ok(()) => Ok(Some(found)),
                Err(why) => {
                    eprintln!("cowimg: {}: {why}", self.who);
                    self.error(option, REP_ERR_POLICY, &why)?;
                    Ok(None)
                }
            },
            Err(why) => {
                self.unknown_logged += 1;
                if self.unknown_logged <= MAX_UNKNOWN_LOGGED {
                    let more = if self.unknown_logged == MAX_UNKNOWN_LOGGED {
                        " (further unknown names on this connection are not logged)"
                    } else {
                        ""
                    };
                    eprintln!("cowimg: {}: {why}{more}", self.who);
                }
                self.error(option, REP_ERR_UNKNOWN, &why)?;
                Ok(None)
            }
        }
    }

    /// Answers INFO or GO; returns the export when it was accepted.
    fn info(&mut self, option: u32, data: &[u8]) -> io::Result<Option<C::Export>> {
        let (name, requests) = match parse_info_request(data) {
            Ok(r) => r,
            Err(msg) => {
                self.error(option, REP_ERR_INVALID, &msg)?;
                return Ok(None);
            }
        };
        let Some((info, export)) = self.find(option, name)? else {
            return Ok(None);
        };
        let flags = info.transmission_flags(self.structured);
        option_reply(
            &mut self.out,
            option,
            REP_INFO,
            &[&info_export(info.size, flags)],
        );
        // Our constraints are the protocol defaults, so sending them unasked is harmless.
        option_reply(&mut self.out, option, REP_INFO, &[&info_block_size()]);
        if requests.contains(&INFO_NAME) {
            // The export served for any name has an empty name of its own.
            let canonical = if info.name.is_empty() {
                name
            } else {
                info.name.as_bytes()
            };
            option_reply(
                &mut self.out,
                option,
                REP_INFO,
                &[&INFO_NAME.to_be_bytes(), canonical],
            );
        }
        if let Some(d) = info
            .description
            .as_ref()
            .filter(|_| requests.contains(&INFO_DESCRIPTION))
        {
            let d = d.as_bytes();
            let d = &d[..d.len().min(MAX_STRING)];
            option_reply(
                &mut self.out,
                option,
                REP_INFO,
                &[&INFO_DESCRIPTION.to_be_bytes(), d],
            );
        }
        option_reply(&mut self.out, option, REP_ACK, &[]);
        self.send()?;
        Ok(Some(export))
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the selection even when it fails.
            self.contexts = MetaContexts::default();
            if !self.structured {
                return self.error(
                    option,
                    REP_ERR_INVALID,
                    "negotiate structured replies before selecting meta contexts",
                );
            }
        }
        let (name, queries) = match parse_meta_request(data) {
            Ok(r) => r,
            Err(msg) => return self.error(option, REP_ERR_INVALID, &msg),
        };
        if self.find(option, name)?.is_none() {
            return Ok(());
        }
        let mut found = MetaContexts::default();
        if !set && queries.is_empty() {
            found = MetaContexts {
                allocation: true,
                layer: true,
            };
        }
        for q in &queries {
            let m = if set { set_matches(q) } else { list_matches(q) };
            found.allocation |= m.allocation;
            found.layer |= m.layer;
        }
        // LIST replies carry ID 0, as the spec asks; SET replies carry the real IDs.
        let id = |real: u32| if set { real } else { 0 };
        if found.allocation {
            option_reply(
                &mut self.out,
                option,
                REP_META_CONTEXT,
                &[
                    &id(CONTEXT_ID_ALLOCATION).to_be_bytes(),
                    CONTEXT_ALLOCATION.as_bytes(),
                ],
            );
        }
        if found.layer {
            option_reply(
                &mut self.out,
                option,
                REP_META_CONTEXT,
                &[
                    &id(CONTEXT_ID_LAYER).to_be_bytes(),
                    CONTEXT_LAYER.as_bytes(),
                ],
            );
        }
        option_reply(&mut self.out, option, REP_ACK, &[]);
        if set {
            self.contexts = found;
        }
        self.send()
    }
}

/// Runs the handshake on `io` (whose reads and writes the caller bounds in time); `who`
/// names the connection in log lines.
pub(crate) fn negotiate<S: Channel, C: Catalog>(
    io: &mut S,
    catalog: &C,
    who: &str,
    shutting_down: &AtomicBool,
) -> Result<Negotiated<C::Export>, HandshakeEnd> {
    Session {
        io,
        upgraded: false,
        identity: None,
        catalog,
        who,
        unknown_logged: 0,
        shutting_down,
        structured: false,
        contexts: MetaContexts::default(),
        out: Vec::new(),
    }
    .run()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &[u8]) -> Vec<u8> {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s);
        v
    }

    #[test]
    fn info_request_with_wrong_count_is_invalid() {
        let mut d = string(b"x");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        assert!(parse_info_request(&d).is_err());
        d.extend_from_slice(&1u16.to_be_bytes());
        assert_eq!(parse_info_request(&d).unwrap(), (&b"x"[..], vec![3, 1]));
    }

    #[test]
    fn huge_name_length_is_rejected_without_allocating() {
        let mut d = 0xffff_ffffu32.to_be_bytes().to_vec();
        d.extend_from_slice(&[0, 0]);
        assert!(parse_info_request(&d).is_err());
        assert!(parse_meta_request(&d).is_err());
    }

    #[test]
    fn meta_query_count_larger_than_the_option_is_rejected() {
        let mut d = string(b"");
        d.extend_from_slice(&0x4000_0000u32.to_be_bytes());
        assert!(parse_meta_request(&d).is_err());
    }

    #[test]
    fn meta_queries_parse_and_match() {
        let mut d = string(b"");
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend(string(b"base:"));
        d.extend(string(b"cowimg:layer"));
        d.extend(string(b"qemu:dirty-bitmap:x"));
        let (name, q) = parse_meta_request(&d).unwrap();
        assert!(name.is_empty());
        assert_eq!(q.len(), 3);
        assert_eq!(
            list_matches(q[0]),
            MetaContexts {
                allocation: true,
                layer: false
            }
        );
        assert_eq!(set_matches(q[0]), MetaContexts::default());
        assert_eq!(
            set_matches(q[1]),
            MetaContexts {
                allocation: false,
                layer: true
            }
        );
        assert_eq!(list_matches(q[2]), MetaContexts::default());
    }

    #[test]
    fn multi_conn_is_advertised_and_write_flags_follow_read_only() {
        let rw = ExportInfo {
            name: String::new(),
            size: 1,
            read_only: false,
            description: None,
        };
        let f = rw.transmission_flags(true);
        assert_ne!(f & TFLAG_CAN_MULTI_CONN, 0);
        assert_ne!(f & TFLAG_SEND_DF, 0);
        assert_ne!(f & TFLAG_SEND_FAST_ZERO, 0);
        let ro = ExportInfo {
            read_only: true,
            ..rw
        };
        let f = ro.transmission_flags(false);
        assert_ne!(f & TFLAG_READ_ONLY, 0);
        assert_eq!(
            f & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_DF),
            0
        );
    }
}
