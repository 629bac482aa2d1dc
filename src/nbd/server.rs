//! The listener: accepts clients, runs one thread per connection (handshake, then the
//! transmission workers), and shuts everything down on SIGINT/SIGTERM.
use super::connection::{Memory, Params, Transmission};
use super::export::{Export, Exports};
use super::handshake;
use super::socket::{DeadlineIo, Listener, PeerIdentity, Socket, Transport};
use super::tls::{Credentials, TlsMode, TlsSocket};
use super::{Listen, ServeConfig};
use crate::error::Error;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bytes of READ/WRITE data all connections together may hold at once.
const REQUEST_MEMORY: u64 = 256 << 20;
/// Refused connections are logged at most this often (a flood would fill the log).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// On shutdown, connections get this long to answer requests already being served before
/// their sockets are closed under them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection the server knows about.
pub(crate) struct Live {
    /// A handle to hang up with.
    pub socket: Socket,
    pub identity: PeerIdentity,
    /// The export it picked, once the handshake is over.
    pub export: Option<Arc<Export>>,
}

/// State shared by the accept loop, the connection threads and the control socket.
pub(crate) struct Shared {
    pub exports: Exports,
    config: ServeConfig,
    pub shutting_down: AtomicBool,
    memory: Memory,
    /// Live connections, by number.
    pub live: Mutex<HashMap<u64, Live>>,
    changed: Condvar,
    refusals: Mutex<RefusalLog>,
}

/// Refusals since the last line logged about them.
struct RefusalLog {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl Shared {
    /// Logs a refused connection, or counts it when one was logged less than
    /// [`REFUSAL_LOG_INTERVAL`] ago; the next line says how many went unlogged.
    fn log_refusal(&self, message: std::fmt::Arguments) {
        let mut log = lock(&self.refusals);
        let now = Instant::now();
        if log
            .last_logged
            .is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_INTERVAL)
        {
            log.unlogged += 1;
            return;
        }
        let unlogged = std::mem::take(&mut log.unlogged);
        log.last_logged = Some(now);
        drop(log);
        if unlogged > 0 {
            eprintln!("cowimg: {message} (and {unlogged} more refused since the last such line)");
        } else {
            eprintln!("cowimg: {message}");
        }
    }
}

pub(crate) fn serve(
    exports: Exports,
    config: ServeConfig,
    control: Option<PathBuf>,
) -> crate::Result<()> {
    let listener = open_listener(&config.listen)?;
    listener
        .set_nonblocking()
        .map_err(|e| listen_error(&config.listen, e))?;
    let signals = SignalPipe::install().map_err(|e| Error::File {
        path: "signal handlers".into(),
        op: "installing",
        source: e,
    })?;
    let all = exports.all();
    let what = match all.as_slice() {
        [one] if !exports.grows() => {
            let image = one.image();
            format!(
                "{} ({} bytes{})",
                image.path().display(),
                image.virtual_size(),
                if one.read_only { ", read-only" } else { "" },
            )
        }
        many if exports.grows() => format!("{} exports (more on demand)", many.len()),
        many => format!("{} exports", many.len()),
    };
    eprintln!("cowimg: serving {what} on {}", listener.describe());
    let shared = Arc::new(Shared {
        exports,
        shutting_down: AtomicBool::new(false),
        memory: Memory::new(REQUEST_MEMORY, config.max_connections),
        config,
        live: Mutex::new(HashMap::new()),
        changed: Condvar::new(),
        refusals: Mutex::new(RefusalLog {
            last_logged: None,
            unlogged: 0,
        }),
    });
    let control = match control {
        Some(path) => Some(super::control::start(&shared, &path)?),
        None => None,
    };
    let mut threads = Vec::new();
    let mut next_id = 1u64;
    let signal = loop {
        match wait_readable(&listener, &signals.read) {
            Ok(Event::Signal) => match signals.take() {
                libc::SIGHUP => {
                    // New connections get the new certificates; live ones keep theirs.
                    if let Some(credentials) = &shared.config.tls {
                        match credentials.reload() {
                            Ok(()) => eprintln!(
                                "cowimg: SIGHUP: reloaded the TLS certificates from {}",
                                credentials.dir().display()
                            ),
                            Err(e) => {
                                eprintln!("cowimg: SIGHUP: keeping the old TLS certificates: {e}")
                            }
                        }
                    }
                    continue;
                }
                signal => break signal,
            },
            Ok(Event::Connection) => {}
            Err(e) => {
                eprintln!("cowimg: waiting for connections failed: {e}");
                break 0;
            }
        }
        loop {
            let (socket, peer) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on poll.
                    eprintln!("cowimg: accepting a connection failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            };
            threads.retain(|t: &std::thread::JoinHandle<()>| !t.is_finished());
            let id = next_id;
            next_id += 1;
            if let Some(t) = start_connection(&shared, id, socket, peer) {
                threads.push(t);
            }
        }
    };
    if signal != 0 {
        eprintln!("cowimg: received signal {signal}, shutting down");
    }
    drop(listener);
    drop(control);
    shut_down(&shared, threads);
    drop(signals);
    // Every export is flushed, whatever one of them answers.
    let mut first_error = None;
    for export in shared.exports.all() {
        if let Err(e) = export.image().flush() {
            eprintln!(
                "cowimg: export \"{}\": flushing at exit failed: {e}",
                export.name
            );
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn listen_error(listen: &Listen, source: io::Error) -> Error {
    let path: PathBuf = match listen {
        Listen::Tcp(a) => a.into(),
        Listen::Unix(p) => p.clone(),
        Listen::Systemd => "systemd socket".into(),
    };
    Error::File {
        path,
        op: "listening",
        source,
    }
}

fn open_listener(listen: &Listen) -> crate::Result<Listener> {
    match listen {
        Listen::Tcp(addr) => Listener::bind_tcp(addr).map_err(|e| listen_error(listen, e)),
        Listen::Unix(path) => Listener::bind_unix(path).map_err(|e| listen_error(listen, e)),
        Listen::Systemd => Listener::from_systemd().map_err(|reason| Error::Invalid {
            path: "LISTEN_FDS".into(),
            reason,
        }),
    }
}

/// Registers the connection and starts its thread, or refuses it when the server is full.
fn start_connection(
    shared: &Arc<Shared>,
    id: u64,
    socket: Socket,
    peer: String,
) -> Option<std::thread::JoinHandle<()>> {
    {
        let identity = socket.identity();
        let mut live = lock(&shared.live);
        let config = &shared.config;
        if live.len() >= config.max_connections {
            drop(live);
            shared.log_refusal(format_args!("connection {id} from {peer}: refused, {} clients already connected (--max-connections)", config.max_connections));
            return None;
        }
        let per_client = config.max_connections_per_client;
        // Over TCP the address is the client; a Unix socket's clients are the local users
        // its file mode lets in, often one user for many clients, so they are not capped.
        let capped = matches!(identity, PeerIdentity::Address(_));
        if capped
            && per_client > 0
            && live.values().filter(|l| l.identity == identity).count() >= per_client
        {
            drop(live);
            shared.log_refusal(format_args!("connection {id} from {peer}: refused, {identity} already has {per_client} connections (--max-connections-per-client)"));
            return None;
        }
        match socket.try_clone() {
            Ok(handle) => {
                live.insert(
                    id,
                    Live {
                        socket: handle,
                        identity,
                        export: None,
                    },
                );
            }
            Err(e) => {
                drop(live);
                shared.log_refusal(format_args!("connection {id} from {peer}: refused: {e}"));
                return None;
            }
        }
    }
    let s = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            let started = Instant::now();
            let summary = run_connection(&s, id, &peer, socket);
            lock(&s.live).remove(&id);
            s.changed.notify_all();
            eprintln!(
                "cowimg: connection {id} from {peer}: {summary} ({:.1}s)",
                started.elapsed().as_secs_f64()
            );
        });
    match spawned {
        Ok(t) => Some(t),
        Err(e) => {
            lock(&shared.live).remove(&id);
            eprintln!("cowimg: connection {id}: refused, cannot start a thread: {e}");
            None
        }
    }
}

/// The connection during the handshake: reads and writes bounded by the handshake's
/// deadline, over the socket or, after STARTTLS, over TLS.
struct HandshakeChannel<'a> {
    transport: Arc<dyn Transport>,
    socket: &'a Socket,
    until: Instant,
    mode: TlsMode,
    credentials: Option<&'a Credentials>,
}

impl HandshakeChannel<'_> {
    fn io(&self) -> DeadlineIo<'_> {
        DeadlineIo::new(self.transport.as_ref(), self.until)
    }
}

impl Read for HandshakeChannel<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.io().read(buf)
    }
}

impl Write for HandshakeChannel<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.io().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl handshake::Channel for HandshakeChannel<'_> {
    fn tls_mode(&self) -> TlsMode {
        self.mode
    }

    fn start_tls(&mut self) -> io::Result<Option<String>> {
        let credentials = self
            .credentials
            .ok_or_else(|| io::Error::other("TLS has no certificates"))?;
        // The TLS handshake counts against the handshake's deadline.
        let tls = TlsSocket::accept(self.socket.try_clone()?, credentials.config(), self.until)?;
        let identity = tls.identity.clone();
        self.transport = Arc::new(tls);
        Ok(identity)
    }
}

/// Runs one connection to its end; returns the summary for the log line.
fn run_connection(shared: &Shared, id: u64, peer: &str, socket: Socket) -> String {
    socket.tune();
    let config = &shared.config;
    let transport: Arc<dyn Transport> = match socket
        .try_clone()
        .and_then(|s| s.set_read_tick().map(|()| s))
    {
        Ok(s) => Arc::new(s),
        Err(e) => return format!("cannot set up the connection: {e}"),
    };
    let mut channel = HandshakeChannel {
        transport,
        socket: &socket,
        until: Instant::now() + config.handshake_timeout,
        mode: config.tls_mode,
        credentials: config.tls.as_deref(),
    };
    let who = format!("connection {id} from {peer}");
    let negotiated =
        handshake::negotiate(&mut channel, &shared.exports, &who, &shared.shutting_down);
    let transport = channel.transport;
    let negotiated = match negotiated {
        Ok(n) => n,
        Err(end) => {
            socket.shutdown(Shutdown::Both);
            return end.to_string();
        }
    };
    let export = Arc::clone(&negotiated.export);
    // Counted before the removal check, so that `remove` (which takes the export out, then
    // counts) cannot miss a client that is just entering.
    export.stats.clients.fetch_add(1, Ordering::SeqCst);
    let summary = if export.removed.load(Ordering::SeqCst) {
        socket.shutdown(Shutdown::Both);
        format!("export \"{}\" was removed", export.name)
    } else {
        if let Some(l) = lock(&shared.live).get_mut(&id) {
            l.export = Some(Arc::clone(&export));
        }
        transmit(shared, transport, negotiated)
    };
    export.stats.clients.fetch_sub(1, Ordering::SeqCst);
    summary
}

fn transmit(
    shared: &Shared,
    transport: Arc<dyn Transport>,
    negotiated: handshake::Negotiated<Arc<Export>>,
) -> String {
    let config = &shared.config;
    let export = &*negotiated.export;
    let params = Params {
        export,
        read_only: export.read_only,
        structured: negotiated.structured,
        contexts: negotiated.contexts,
        memory: &shared.memory,
        shutting_down: &shared.shutting_down,
        io_timeout: config.io_timeout,
        idle_timeout: config.idle_timeout,
    };
    let transmission = match Transmission::new(transport, params) {
        Ok(t) => t,
        Err(e) => return format!("cannot set up the connection: {e}"),
    };
    let end = transmission.run(config.workers_per_connection);
    let st = &transmission.stats;
    let mut flush_note = String::new();
    if st.wrote.load(Ordering::Relaxed) {
        // Clients such as nbdcopy end with a FLUSH anyway; this covers those that do not.
        if let Err(e) = export.image().flush() {
            flush_note = format!(", flushing at disconnect failed: {e}");
        }
    }
    let mut contexts = Vec::new();
    if negotiated.contexts.allocation {
        contexts.push(handshake::CONTEXT_ALLOCATION);
    }
    if negotiated.contexts.layer {
        contexts.push(handshake::CONTEXT_LAYER);
    }
    let tls = match (&negotiated.tls, &negotiated.identity) {
        (false, _) => String::new(),
        (true, Some(id)) => format!(" over TLS as \"{id}\""),
        (true, None) => " over TLS".to_string(),
    };
    format!(
        "export \"{}\"{tls} via {}{}{}, {} requests ({} errors), {} bytes read, {} written; {}{}",
        negotiated.export_name,
        negotiated.entered_with,
        if negotiated.structured {
            ", structured replies"
        } else {
            ""
        },
        if contexts.is_empty() {
            String::new()
        } else {
            format!(", contexts {}", contexts.join(" "))
        },
        st.requests.load(Ordering::Relaxed),
        st.errors.load(Ordering::Relaxed),
        st.bytes_read.load(Ordering::Relaxed),
        st.bytes_written.load(Ordering::Relaxed),
        end,
        flush_note
    )
}

/// Ends every connection: stop reading new requests (idle clients wake up at once, see
/// CVE-2024-7409), let requests in progress answer, then close whatever is left.
fn shut_down(shared: &Shared, threads: Vec<std::thread::JoinHandle<()>>) {
    shared.shutting_down.store(true, Ordering::SeqCst);
    {
        let live = lock(&shared.live);
        for l in live.values() {
            l.socket.shutdown(Shutdown::Read);
        }
    }
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    let mut live = lock(&shared.live);
    while !live.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            for l in live.values() {
                l.socket.shutdown(Shutdown::Both);
            }
            break;
        }
        live = shared
            .changed
            .wait_timeout(live, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    drop(live);
    for t in threads {
        let _ = t.join();
    }
}

enum Event {
    Connection,
    Signal,
}

fn wait_readable(listener: &Listener, signal: &OwnedFd) -> io::Result<Event> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    // SAFETY: the listener outlives this call, so its descriptor stays valid while borrowed.
    let lfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(listener.as_raw_fd()) };
    loop {
        let mut fds = [
            PollFd::new(lfd, PollFlags::POLLIN),
            PollFd::new(signal.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {
                if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                    return Ok(Event::Signal);
                }
                if fds[0].revents().is_some_and(|r| !r.is_empty()) {
                    return Ok(Event::Connection);
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The write end of the self-pipe the signal handler writes to (-1: none installed).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: libc::c_int) {
    let fd = WAKE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = signal as u8;
        // SAFETY: write(2) is async-signal-safe, the buffer is a live local, and errno is
        // saved and restored so the interrupted code does not see it change.
        unsafe {
            let errno = libc::__errno_location();
            let saved = *errno;
            libc::write(fd, (&byte as *const u8).cast(), 1);
            *errno = saved;
        }
    }
}

/// SIGINT/SIGTERM handlers that wake the accept loop through a pipe; the previous
/// handlers come back on drop.
struct SignalPipe {
    read: OwnedFd,
    _write: OwnedFd,
    previous: Vec<(nix::sys::signal::Signal, nix::sys::signal::SigAction)>,
}

impl SignalPipe {
    fn install() -> io::Result<SignalPipe> {
        use nix::fcntl::OFlag;
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        WAKE_FD.store(write.as_raw_fd(), Ordering::SeqCst);
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let mut previous = Vec::new();
        for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            // SAFETY: the handler only calls async-signal-safe functions.
            let old = unsafe { sigaction(sig, &action) }?;
            previous.push((sig, old));
        }
        Ok(SignalPipe {
            read,
            _write: write,
            previous,
        })
    }

    /// The signal that woke us.
    fn take(&self) -> i32 {
        let mut b = [0u8; 1];
        match nix::unistd::read(self.read.as_raw_fd(), &mut b) {
            Ok(1) => b[0] as i32,
            _ => 0,
        }
    }
}

impl Drop for SignalPipe {
    fn drop(&mut self) {
        for (sig, old) in &self.previous {
            // SAFETY: restores the handler that was installed before ours.
            unsafe {
                let _ = nix::sys::signal::sigaction(*sig, old);
            }
        }
        WAKE_FD.store(-1, Ordering::SeqCst);
    }
}
