//! Listening and connected sockets (TCP or Unix), including one handed over by systemd.
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What `Socket::wait` saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Readiness {
    /// Bytes (or end of file) can be read.
    pub readable: bool,
    /// The peer has shut down its sending side (or the connection is gone).
    pub peer_closed: bool,
}

/// Who a client is, for the per-client connection cap: its IP address over TCP (not the
/// port, which a client picks freely), its user id over a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum PeerIdentity {
    Address(std::net::IpAddr),
    User(u32),
    Unknown,
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerIdentity::Address(a) => write!(f, "{a}"),
            PeerIdentity::User(uid) => write!(f, "uid {uid}"),
            PeerIdentity::Unknown => write!(f, "unknown peer"),
        }
    }
}

/// A connected client socket.
pub(crate) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) {
        // Fails only when the peer is already gone, which is what we want anyway.
        let _ = match self {
            Socket::Tcp(s) => s.shutdown(how),
            Socket::Unix(s) => s.shutdown(how),
        };
    }

    pub fn identity(&self) -> PeerIdentity {
        match self {
            Socket::Tcp(s) => s
                .peer_addr()
                .map_or(PeerIdentity::Unknown, |a| PeerIdentity::Address(a.ip())),
            Socket::Unix(s) => {
                use nix::sys::socket::{getsockopt, sockopt};
                getsockopt(s, sockopt::PeerCredentials)
                    .map_or(PeerIdentity::Unknown, |c| PeerIdentity::User(c.uid()))
            }
        }
    }

    /// Reads what has arrived, without waiting: `WouldBlock` when nothing has.
    pub fn read_available(&self, buf: &mut [u8]) -> io::Result<usize> {
        use nix::sys::socket::{recv, MsgFlags};
        loop {
            match recv(self.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Waits until the socket is readable, or `timeout` passes (`None`: no limit). Also
    /// reports whether the peer has closed its side, which a read would only show once
    /// every byte before it was consumed.
    pub fn wait(&self, readable: bool, timeout: Option<Duration>) -> io::Result<Readiness> {
        let events = if readable { libc::POLLIN } else { 0 } | libc::POLLRDHUP;
        let revents = self.poll(events, timeout)?;
        let gone = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR;
        Ok(Readiness {
            readable: revents & (libc::POLLIN | gone) != 0,
            peer_closed: revents & gone != 0,
        })
    }

    /// Waits until the socket can take more bytes (or has failed), or `timeout` passes.
    fn wait_writable(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.poll(libc::POLLOUT, timeout).map(|_| ())
    }

    /// poll(2) on this socket alone; returns the events that happened (none on timeout).
    fn poll(&self, events: libc::c_short, timeout: Option<Duration>) -> io::Result<libc::c_short> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let ms: libc::c_int = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    // Round up, so a wait never ends before its deadline.
                    left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
                }
            };
            let mut fd = libc::pollfd {
                fd: self.as_raw_fd(),
                events,
                revents: 0,
            };
            // SAFETY: `fd` is a live local pollfd and the count is 1; the descriptor is owned
            // by `self`, which outlives the call.
            let r = unsafe { libc::poll(&mut fd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            return Ok(fd.revents);
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_read_timeout(t),
            Socket::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Options for a fast data path: no Nagle delay on TCP (the spec asks for it), large
    /// send buffers so a 1 MiB read reply goes out in one call, keepalive to notice peers
    /// that vanished.
    pub fn tune(&self) {
        use nix::sys::socket::{setsockopt, sockopt};
        match self {
            Socket::Tcp(s) => {
                let _ = s.set_nodelay(true);
                let _ = setsockopt(s, sockopt::KeepAlive, &true);
            }
            Socket::Unix(s) => {
                // Unix sockets do not autotune; the kernel caps this at wmem_max.
                let _ = setsockopt(s, sockopt::SndBuf, &(4 << 20));
            }
        }
    }

    /// Writes every byte of `parts`, with as few system calls as the kernel allows (one
    /// sendmsg when the socket buffer has room). With a `timeout`, the whole reply must be
    /// written within it. The socket's send timeout cannot give that: TCP restarts it with
    /// every call and Unix sockets with every buffer they queue, so a client reading a few
    /// bytes at a time would keep a reply, and its memory, alive for ever. So the writes do
    /// not block, and the waits between them are polls bounded by the deadline.
    pub fn write_all_vectored(&self, parts: &[&[u8]], timeout: Option<Duration>) -> io::Result<()> {
        use nix::sys::socket::{sendmsg, MsgFlags, UnixAddr};
        const MAX_PARTS: usize = 4;
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut index = 0; // first part not fully written
        let mut skip = 0; // bytes of parts[index] already written
        while index < parts.len() {
            if parts[index].len() == skip {
                index += 1;
                skip = 0;
                continue;
            }
            let mut slices = [IoSlice::new(&[]); MAX_PARTS];
            let mut n = 0;
            for (i, p) in parts[index..].iter().take(MAX_PARTS).enumerate() {
                slices[i] = IoSlice::new(if i == 0 { &p[skip..] } else { p });
                n = i + 1;
            }
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            let mut written =
                match sendmsg::<UnixAddr>(self.as_raw_fd(), &slices[..n], &[], flags, None) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "socket accepted no bytes",
                        ))
                    }
                    Ok(w) => w,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(nix::errno::Errno::EAGAIN) => {
                        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                        if left.is_some_and(|l| l.is_zero()) {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "the client did not read the reply in time",
                            ));
                        }
                        self.wait_writable(left)?;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
            while written > 0 {
                let left = parts[index].len() - skip;
                if written >= left {
                    written -= left;
                    index += 1;
                    skip = 0;
                } else {
                    skip += written;
                    written = 0;
                }
            }
        }
        Ok(())
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Socket::Tcp(s) => s.as_raw_fd(),
            Socket::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket.
pub(crate) enum Listener {
    Tcp(TcpListener),
    /// The path is removed when the listener is dropped, if we created it.
    Unix(UnixListener, Option<PathBuf>),
}

impl Listener {
    pub fn bind_tcp(addr: &str) -> io::Result<Listener> {
        let mut last = io::Error::new(io::ErrorKind::InvalidInput, "address resolves to nothing");
        for a in addr.to_socket_addrs()? {
            match TcpListener::bind(a) {
                Ok(l) => return Ok(Listener::Tcp(l)),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Binds a Unix socket at `path`. A stale socket file (nothing listening on it) left by
    /// a server that was killed is replaced; a live one is not.
    pub fn bind_unix(path: &Path) -> io::Result<Listener> {
        match UnixListener::bind(path) {
            Ok(l) => Ok(Listener::Unix(l, Some(path.to_path_buf()))),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                use std::os::unix::fs::FileTypeExt;
                let is_socket = std::fs::symlink_metadata(path)
                    .map(|m| m.file_type().is_socket())
                    .unwrap_or(false);
                if !is_socket || UnixStream::connect(path).is_ok() {
                    return Err(e);
                }
                std::fs::remove_file(path)?;
                Ok(Listener::Unix(
                    UnixListener::bind(path)?,
                    Some(path.to_path_buf()),
                ))
            }
            Err(e) => Err(e),
        }
    }

    /// Takes the first socket passed by systemd socket activation (fd 3), checking that
    /// LISTEN_PID names this process and that the descriptor is a listening socket.
    pub fn from_systemd() -> Result<Listener, String> {
        use nix::sys::socket::{
            getsockname, getsockopt, sockopt, AddressFamily, SockaddrLike, SockaddrStorage,
        };
        const FIRST_FD: RawFd = 3;
        let pid = std::env::var("LISTEN_PID").map_err(|_| "LISTEN_PID is not set".to_string())?;
        if pid.trim() != std::process::id().to_string() {
            return Err(format!(
                "LISTEN_PID={pid} is not this process ({})",
                std::process::id()
            ));
        }
        let fds: u32 = std::env::var("LISTEN_FDS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| "LISTEN_FDS is not a number".to_string())?;
        if fds < 1 {
            return Err("LISTEN_FDS is 0: systemd passed no socket".into());
        }
        // SAFETY: fd 3 is ours by the socket activation protocol (LISTEN_PID matched); the
        // borrow only lives for these checks.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(FIRST_FD) };
        let listening = getsockopt(&fd, sockopt::AcceptConn)
            .map_err(|e| format!("fd 3 from systemd is not a socket: {e}"))?;
        if !listening {
            return Err("fd 3 from systemd is not a listening socket".into());
        }
        let addr: SockaddrStorage =
            getsockname(FIRST_FD).map_err(|e| format!("fd 3 from systemd: getsockname: {e}"))?;
        let _ = nix::fcntl::fcntl(
            FIRST_FD,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(var);
        }
        match addr.family() {
            // SAFETY: the descriptor is a listening socket of this family that nothing else
            // in the process owns; the listener takes ownership of it.
            Some(AddressFamily::Unix) => Ok(Listener::Unix(
                unsafe { UnixListener::from_raw_fd(FIRST_FD) },
                None,
            )),
            // SAFETY: as above.
            Some(AddressFamily::Inet) | Some(AddressFamily::Inet6) => {
                Ok(Listener::Tcp(unsafe { TcpListener::from_raw_fd(FIRST_FD) }))
            }
            other => Err(format!(
                "fd 3 from systemd has unsupported address family {other:?}"
            )),
        }
    }

    pub fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l, _) => l.set_nonblocking(true),
        }
    }

    /// Accepts one connection; `WouldBlock` when none is pending.
    pub fn accept(&self) -> io::Result<(Socket, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                s.set_nonblocking(false)?;
                Ok((Socket::Tcp(s), peer.to_string()))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Ok((Socket::Unix(s), "unix socket".to_string()))
            }
        }
    }

    /// Where we listen, for the startup message (with the real port when bound to port 0).
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp {a}"),
                Err(_) => "tcp (unknown address)".into(),
            },
            Listener::Unix(l, _) => match l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            {
                Some(p) => format!("unix {p}"),
                None => "unix socket".into(),
            },
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, Some(path)) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The longest one read waits before it returns `WouldBlock`, so that the reader can
/// notice deadlines, idleness and shutdown. One blocking read per request costs one system
/// call; polling first would cost three.
pub(crate) const READ_TICK: Duration = Duration::from_millis(500);

/// What the transmission phase needs of a connection: a plain socket, or TLS over one.
pub(crate) trait Transport: Send + Sync {
    /// Reads what arrives, waiting at most [`READ_TICK`] (`set_read_tick` must have been
    /// called): `Ok(0)` at the end, `WouldBlock` when the tick passed without data.
    fn read_some(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Makes `read_some` wait at most [`READ_TICK`].
    fn set_read_tick(&self) -> io::Result<()>;
    /// True when the peer has shut down its sending side, or the connection is gone.
    fn peer_closed(&self) -> bool;
    fn write_all_vectored(&self, parts: &[&[u8]], timeout: Option<Duration>) -> io::Result<()>;
    fn shutdown(&self, how: Shutdown);
}

impl Transport for Socket {
    fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let r = match self {
                Socket::Tcp(s) => {
                    let mut r: &TcpStream = s;
                    r.read(buf)
                }
                Socket::Unix(s) => {
                    let mut r: &UnixStream = s;
                    r.read(buf)
                }
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // SO_RCVTIMEO's expiry shows as EAGAIN.
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(io::ErrorKind::WouldBlock.into())
                }
                other => return other,
            }
        }
    }
    fn set_read_tick(&self) -> io::Result<()> {
        self.set_read_timeout(Some(READ_TICK))
    }
    fn peer_closed(&self) -> bool {
        self.wait(false, Some(Duration::ZERO))
            .is_ok_and(|r| r.peer_closed)
    }
    fn write_all_vectored(&self, parts: &[&[u8]], timeout: Option<Duration>) -> io::Result<()> {
        Socket::write_all_vectored(self, parts, timeout)
    }
    fn shutdown(&self, how: Shutdown) {
        Socket::shutdown(self, how)
    }
}

/// Blocking reads and writes over a transport, each bounded by what is left of one
/// deadline (the handshake's).
pub(crate) struct DeadlineIo<'a> {
    transport: &'a dyn Transport,
    until: Instant,
}

impl<'a> DeadlineIo<'a> {
    /// `transport.set_read_tick()` must have been called: each read waits at most a tick
    /// before the deadline is looked at again.
    pub fn new(transport: &'a dyn Transport, until: Instant) -> DeadlineIo<'a> {
        DeadlineIo { transport, until }
    }

    fn left(&self) -> io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake timed out",
            ));
        }
        Ok(left)
    }
}

impl Read for DeadlineIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.transport.read_some(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.left()?;
                }
                other => return other,
            }
        }
    }
}

impl Write for DeadlineIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.transport.write_all_vectored(&[buf], Some(left))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
