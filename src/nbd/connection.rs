//! The transmission phase of one connection.
//!
//! A fixed set of worker threads share the connection (leader/follower, as nbdkit does):
//! whichever worker holds the input lock reads the next request header and its payload,
//! releases the lock, runs the request against the image and writes the reply under the
//! output lock with one `writev`. So requests run concurrently and are answered out of
//! order, and no request is handed from thread to thread.
//!
//! Memory: the bytes a request's payload or reply data needs are reserved in the server's
//! [`Memory`] before its payload is read. Every connection has a floor of its own that no
//! other client can take, and borrows from a shared pool above it, up to a cap; so however
//! many clients stall with their reservations, a new client's small requests are served at
//! once. A client that stops sending a payload or reading a reply loses its connection, and
//! with it its reservations, when the I/O timeout has passed for the whole payload or reply.
//! Buffers are kept between requests for reuse while the connection is busy, and freed
//! once it has been idle for [`RELEASE_IDLE_BUFFERS`].
use super::export::Export;
use super::handshake::{MetaContexts, CONTEXT_ID_ALLOCATION, CONTEXT_ID_LAYER};
use super::protocol::*;
use super::socket::Transport;
use crate::image::{Extent, ExtentKind};
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bytes of READ data or WRITE payload one connection may hold at once.
pub(crate) const CONNECTION_CAP: u64 = 64 << 20;
/// The most a connection's floor (bytes no other client can take from it) may be.
const MAX_FLOOR: u64 = 8 << 20;
/// Buffers a busy connection keeps for reuse, in bytes.
const RETAINED_BUFFERS: usize = 16 << 20;
/// A connection that has received nothing for this long frees the buffers it kept.
pub(crate) const RELEASE_IDLE_BUFFERS: Duration = Duration::from_secs(1);
/// CACHE reads the range through in pieces of this size.
const CACHE_PIECE: u64 = 1 << 20;
/// BLOCK_STATUS asks the image about this much at a time.
const STATUS_WINDOW: u64 = 64 << 20;
/// A BLOCK_STATUS reply stops growing past this many descriptors per context (the client
/// asks again from where the reply ended).
const MAX_DESCRIPTORS: usize = 8192;
/// Input buffer: requests and small payloads come in with few system calls; large
/// payloads bypass it.
const INPUT_BUFFER: usize = 128 * 1024;
/// `Transmission::unflushed_since` when the connection changed nothing since its last flush.
const NO_CHANGES: u64 = u64::MAX;
/// How often a worker waiting for memory checks whether its connection is still wanted.
const RECHECK: Duration = Duration::from_millis(50);
/// A read-only request this large is not run for a client that has hung up (checking costs
/// a system call; smaller ones cost less to run than that matters).
const WORTH_CHECKING: u32 = 128 << 10;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The server's request memory: a floor for every connection plus a shared pool.
///
/// A connection holding `held` bytes has borrowed `held - floor` of them (if positive) from
/// the pool. With `max_connections` floors and the pool, the server never holds more than
/// `total` bytes of request data, one connection never more than [`CONNECTION_CAP`], and a
/// connection's first `floor` bytes are always available to it.
pub(crate) struct Memory {
    floor: u64,
    pool: u64,
    cap: u64,
    /// Bytes borrowed from the pool, over all connections.
    borrowed: Mutex<u64>,
    freed: Condvar,
}

/// One connection's holding in [`Memory`]; changed only under `Memory::borrowed`'s lock.
#[derive(Default)]
pub(crate) struct Share {
    held: AtomicU64,
}

impl Memory {
    /// `total` bytes for up to `max_connections` connections. Floors take at most half.
    pub fn new(total: u64, max_connections: usize) -> Memory {
        let floor = (total / 2 / max_connections.max(1) as u64).min(MAX_FLOOR);
        Memory {
            floor,
            pool: total - floor * max_connections as u64,
            cap: CONNECTION_CAP,
            borrowed: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    fn borrowed_at(&self, held: u64) -> u64 {
        held.saturating_sub(self.floor)
    }

    /// Reserves `n` bytes for `share`, waiting while they do not fit. A request larger than
    /// the connection's cap or the pool still runs, alone. Returns `None` (and reserves
    /// nothing) once `give_up` says the connection no longer needs it.
    fn acquire<'a>(
        &'a self,
        share: &'a Share,
        n: u64,
        give_up: impl Fn() -> bool,
    ) -> Option<Reservation<'a>> {
        let mut borrowed = lock(&self.borrowed);
        loop {
            let held = share.held.load(Ordering::Relaxed);
            let extra = self.borrowed_at(held + n) - self.borrowed_at(held);
            let fits_connection = held == 0 || held + n <= self.cap;
            let fits_pool = extra == 0 || *borrowed == 0 || *borrowed + extra <= self.pool;
            if n == 0 || (fits_connection && fits_pool) {
                share.held.store(held + n, Ordering::Relaxed);
                *borrowed += extra;
                return Some(Reservation {
                    memory: self,
                    share,
                    bytes: n,
                });
            }
            if give_up() {
                return None;
            }
            borrowed = self
                .freed
                .wait_timeout(borrowed, RECHECK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn release(&self, share: &Share, n: u64) {
        if n == 0 {
            return;
        }
        let mut borrowed = lock(&self.borrowed);
        let held = share.held.load(Ordering::Relaxed);
        *borrowed -= self.borrowed_at(held) - self.borrowed_at(held - n);
        share.held.store(held - n, Ordering::Relaxed);
        self.freed.notify_all();
    }
}

/// Bytes reserved in [`Memory`], given back on drop.
struct Reservation<'a> {
    memory: &'a Memory,
    share: &'a Share,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.memory.release(self.share, self.bytes);
    }
}

/// Buffers kept for the next requests of a busy connection.
#[derive(Default)]
struct Pool {
    free: Vec<Vec<u8>>,
    bytes: usize,
    /// The connection has received nothing for a while: returned buffers are freed.
    idle: bool,
}

/// A request that failed: the NBD error and a message for the client.
struct Failure {
    error: u32,
    message: String,
}

fn fail<T>(error: u32, message: impl Into<String>) -> Result<T, Failure> {
    Err(Failure {
        error,
        message: message.into(),
    })
}

/// The receiving side: a buffer over the socket, read without blocking and waited on with
/// `poll`, so that every wait has a deadline and idleness can be noticed.
struct Input {
    transport: Arc<dyn Transport>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Why reading stopped; once set, workers finish what they hold and exit.
    end_reason: Option<String>,
}

/// Why the input could not deliver bytes.
enum InputError {
    Eof,
    TimedOut,
    Io(io::Error),
}

impl Input {
    fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Reads what arrives into the buffer. Each read waits at most one tick; `on_tick` runs
    /// after a tick without data and decides whether to go on waiting.
    fn fill(
        &mut self,
        mut on_tick: impl FnMut() -> Result<(), InputError>,
    ) -> Result<(), InputError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        loop {
            match self.transport.read_some(&mut self.buf[self.end..]) {
                Ok(0) => return Err(InputError::Eof),
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => on_tick()?,
                Err(e) => return Err(InputError::Io(e)),
            }
        }
    }

    /// Fills `out` from the buffer and then straight from the socket, all of it before
    /// `deadline`.
    fn read_exact_by(
        &mut self,
        out: &mut [u8],
        deadline: Option<Instant>,
    ) -> Result<(), InputError> {
        let from_buffer = self.buffered().min(out.len());
        out[..from_buffer].copy_from_slice(&self.buf[self.start..self.start + from_buffer]);
        self.start += from_buffer;
        let mut done = from_buffer;
        while done < out.len() {
            match self.transport.read_some(&mut out[done..]) {
                Ok(0) => return Err(InputError::Eof),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(InputError::TimedOut);
                    }
                }
                Err(e) => return Err(InputError::Io(e)),
            }
        }
        Ok(())
    }
}

struct Output {
    transport: Arc<dyn Transport>,
    /// Set when a reply could not be written; nothing more is sent.
    broken: Option<String>,
}

/// Counters for the connection's log line.
#[derive(Default)]
pub(crate) struct Stats {
    pub requests: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
    /// Requests not run because the client had gone.
    pub dropped: AtomicU64,
    pub wrote: AtomicBool,
}

pub(crate) struct Transmission<'a> {
    /// Each request takes the export's image for the length of one image call, so that a
    /// snapshot can swap it between calls.
    export: &'a Export,
    size: u64,
    read_only: bool,
    structured: bool,
    contexts: MetaContexts,
    input: Mutex<Input>,
    output: Mutex<Output>,
    /// A handle on the connection to hang up with, whoever holds the locks.
    control: Arc<dyn Transport>,
    memory: &'a Memory,
    share: Share,
    pool: Mutex<Pool>,
    io_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    /// Requests read and not yet answered.
    in_flight: AtomicUsize,
    /// The client has gone (a reply could not be written, or it hung up): nothing more
    /// is read or run.
    aborted: AtomicBool,
    /// The client sent NBD_CMD_DISC: what it sent before still runs, whatever it does next.
    disconnected: AtomicBool,
    shutting_down: &'a AtomicBool,
    pub stats: Stats,
    /// The image's revert count before the first change this connection made since its
    /// last flush ([`NO_CHANGES`]: none). A flush that finds the count moved tells the
    /// client its writes were lost, even though the failed flush was another client's.
    unflushed_since: AtomicU64,
}

pub(crate) struct Params<'a> {
    pub export: &'a Export,
    pub read_only: bool,
    pub structured: bool,
    pub contexts: MetaContexts,
    pub memory: &'a Memory,
    pub shutting_down: &'a AtomicBool,
    /// A client must send a whole WRITE payload, and read a whole reply, within this.
    pub io_timeout: Option<Duration>,
    /// A client with nothing in flight that sends nothing for this long is disconnected.
    pub idle_timeout: Option<Duration>,
}

/// Read-only requests: their only effect is the reply, so a client that has gone does not
/// need them run.
fn only_replies(command: u16) -> bool {
    matches!(command, CMD_READ | CMD_CACHE | CMD_BLOCK_STATUS)
}

impl<'a> Transmission<'a> {
    pub fn new(transport: Arc<dyn Transport>, p: Params<'a>) -> io::Result<Transmission<'a>> {
        transport.set_read_tick()?;
        Ok(Transmission {
            export: p.export,
            size: p.export.image().virtual_size(),
            read_only: p.read_only,
            structured: p.structured,
            contexts: p.contexts,
            input: Mutex::new(Input {
                transport: Arc::clone(&transport),
                buf: vec![0u8; INPUT_BUFFER].into_boxed_slice(),
                start: 0,
                end: 0,
                end_reason: None,
            }),
            output: Mutex::new(Output {
                transport: Arc::clone(&transport),
                broken: None,
            }),
            control: transport,
            memory: p.memory,
            share: Share::default(),
            pool: Mutex::new(Pool::default()),
            io_timeout: p.io_timeout,
            idle_timeout: p.idle_timeout,
            in_flight: AtomicUsize::new(0),
            aborted: AtomicBool::new(false),
            disconnected: AtomicBool::new(false),
            shutting_down: p.shutting_down,
            stats: Stats::default(),
            unflushed_since: AtomicU64::new(NO_CHANGES),
        })
    }

    /// Serves requests with `workers` threads until the client disconnects, breaks the
    /// protocol, or the server shuts down. Returns why the connection ended.
    pub fn run(&self, workers: usize) -> String {
        std::thread::scope(|s| {
            for i in 1..workers.max(1) {
                // A worker that cannot be spawned only lowers the concurrency.
                let _ = std::thread::Builder::new()
                    .name(format!("nbd-worker-{i}"))
                    .spawn_scoped(s, || self.worker());
            }
            // This thread is a worker too, so the connection works even if no thread
            // could be spawned.
            self.worker();
        });
        self.release_buffers();
        let input_end = lock(&self.input).end_reason.take();
        let output_end = lock(&self.output).broken.take();
        // Workers that see the shutdown before any of them reads leave no reason behind.
        let mut end = output_end.or(input_end).unwrap_or_else(|| {
            if self.shutting_down.load(Ordering::Relaxed) {
                "server shutting down".into()
            } else {
                "connection closed".into()
            }
        });
        let dropped = self.stats.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            end.push_str(&format!(
                "; the client had gone: {dropped} of its requests not run, the rest of its queue dropped"
            ));
        }
        end
    }

    /// Hangs up at once: wakes the reader and makes pending writes fail.
    fn hang_up(&self) {
        self.control.shutdown(Shutdown::Both);
    }

    /// The client is gone: stop reading and running its requests.
    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        self.hang_up();
    }

    /// Why the connection stops reading, once `stopping` says it does.
    fn stop_reason(&self) -> &'static str {
        if self.shutting_down.load(Ordering::Relaxed) {
            "server shutting down"
        } else {
            "the client went away"
        }
    }

    fn stopping(&self) -> bool {
        self.aborted.load(Ordering::Relaxed) || self.shutting_down.load(Ordering::Relaxed)
    }

    fn worker(&self) {
        loop {
            let (req, buf, reservation) = {
                let mut input = lock(&self.input);
                if input.end_reason.is_some() {
                    return;
                }
                if self.stopping() {
                    input.end_reason = Some(self.stop_reason().into());
                    return;
                }
                match self.next_request(&mut input) {
                    Ok(r) => r,
                    Err(reason) => {
                        input.end_reason = Some(reason);
                        return;
                    }
                }
            };
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            self.export.stats.requests.fetch_add(1, Ordering::Relaxed);
            let mut buf = buf;
            if only_replies(req.command) && req.length >= WORTH_CHECKING && self.client_has_gone() {
                // Nobody will read the reply; a write still runs, it is the client's data.
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                self.abort();
            } else {
                self.handle(&req, &mut buf);
            }
            self.give_back(buf);
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            drop(reservation);
        }
    }

    /// True when the client has closed its side without NBD_CMD_DISC. (While the server
    /// shuts down it has closed the reading side itself, and answers what it has taken.)
    fn client_has_gone(&self) -> bool {
        !self.disconnected.load(Ordering::Relaxed)
            && !self.shutting_down.load(Ordering::Relaxed)
            && self.control.peer_closed()
    }

    /// A buffer of at least `n` bytes, reused when the connection kept one.
    fn take_buffer(&self, n: usize) -> Vec<u8> {
        if n == 0 {
            return Vec::new();
        }
        let mut pool = lock(&self.pool);
        pool.idle = false;
        let found = pool.free.iter().position(|b| b.len() >= n);
        let mut buf = match found.or_else(|| pool.free.len().checked_sub(1)) {
            Some(i) => {
                let b = pool.free.swap_remove(i);
                pool.bytes -= b.len();
                b
            }
            None => Vec::new(),
        };
        drop(pool);
        if buf.len() < n {
            buf.resize(n, 0);
        }
        buf
    }

    fn give_back(&self, buf: Vec<u8>) {
        if buf.is_empty() {
            return;
        }
        let mut pool = lock(&self.pool);
        if !pool.idle && pool.bytes + buf.len() <= RETAINED_BUFFERS {
            pool.bytes += buf.len();
            pool.free.push(buf);
        }
    }

    /// Frees the buffers kept for reuse (the connection is idle, or ending).
    fn release_buffers(&self) {
        let freed = {
            let mut pool = lock(&self.pool);
            pool.idle = true;
            pool.bytes = 0;
            std::mem::take(&mut pool.free)
        };
        if !freed.is_empty() {
            drop(freed);
            return_freed_memory();
        }
    }

    /// Runs after each tick the client sent nothing in while the next request was awaited:
    /// frees the kept buffers once the client has been quiet for a while, and ends an idle
    /// connection after the idle timeout. Ok: go on waiting.
    fn quiet_tick(&self, quiet_since: Instant) -> Result<(), InputError> {
        if self.stopping() {
            return Err(InputError::Eof);
        }
        let quiet = quiet_since.elapsed();
        if quiet >= RELEASE_IDLE_BUFFERS && !lock(&self.pool).idle {
            self.release_buffers();
        }
        // A client waiting for replies is not idle, however long they take.
        match self.idle_timeout {
            Some(t) if quiet >= t && self.in_flight.load(Ordering::SeqCst) == 0 => {
                Err(InputError::TimedOut)
            }
            _ => Ok(()),
        }
    }

    /// Reads the next request and its payload, after reserving the memory it needs.
    /// Errors are why the connection ends.
    fn next_request(
        &self,
        input: &mut Input,
    ) -> Result<(Request, Vec<u8>, Reservation<'_>), String> {
        let quiet_since = Instant::now();
        while input.buffered() < REQUEST_LEN {
            if let Err(e) = input.fill(|| self.quiet_tick(quiet_since)) {
                return Err(if self.stopping() {
                    self.stop_reason().into()
                } else {
                    match e {
                        InputError::Eof if input.buffered() == 0 => {
                            "client closed the connection without NBD_CMD_DISC".into()
                        }
                        InputError::Eof => {
                            "client closed the connection in the middle of a request".into()
                        }
                        InputError::TimedOut => format!(
                            "idle for {}s (--idle-timeout), disconnected",
                            self.idle_timeout.unwrap_or_default().as_secs()
                        ),
                        InputError::Io(e) => format!("reading a request failed: {e}"),
                    }
                });
            }
        }
        if self.stopping() {
            return Err(self.stop_reason().into());
        }
        let mut h = [0u8; REQUEST_LEN];
        h.copy_from_slice(&input.buf[input.start..input.start + REQUEST_LEN]);
        input.start += REQUEST_LEN;
        let req = Request::parse(&h);
        if req.magic != REQUEST_MAGIC {
            self.hang_up();
            return Err(format!(
                "protocol violation: bad request magic {:#010x}",
                req.magic
            ));
        }
        if req.command == CMD_DISC {
            self.disconnected.store(true, Ordering::SeqCst);
            return Err("client disconnected (NBD_CMD_DISC)".into());
        }
        let payload = if req.command == CMD_WRITE {
            req.length
        } else {
            0
        };
        if payload > MAX_BLOCK_SIZE {
            // Reading 4 GiB to stay in step is what a hostile client would want; the spec
            // allows hanging up on a payload this large.
            self.hang_up();
            return Err(format!("protocol violation: WRITE payload of {payload} bytes exceeds the {MAX_BLOCK_SIZE} byte maximum"));
        }
        let bytes = match req.command {
            CMD_WRITE => payload as u64,
            CMD_READ if req.length <= MAX_BLOCK_SIZE => req.length as u64,
            CMD_CACHE => (req.length as u64).min(CACHE_PIECE),
            _ => 0,
        };
        let Some(reservation) = self.memory.acquire(&self.share, bytes, || self.stopping()) else {
            return Err("the client went away while its request waited for memory".into());
        };
        let mut buf = self.take_buffer(bytes as usize);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if payload > 0 {
            let n = payload as usize;
            let deadline = self.io_timeout.map(|t| Instant::now() + t);
            if let Err(e) = input.read_exact_by(&mut buf[..n], deadline) {
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                self.give_back(buf);
                self.hang_up();
                return Err(match e {
                    InputError::TimedOut => format!(
                        "the client sent no more of a {n} byte WRITE payload for {}s (--io-timeout), disconnected",
                        self.io_timeout.unwrap_or_default().as_secs()
                    ),
                    InputError::Eof => format!("client went away in the middle of a {n} byte WRITE payload"),
                    InputError::Io(e) => format!(
                        "client went away in the middle of a {n} byte WRITE payload: {e}"
                    ),
                });
            }
        }
        Ok((req, buf, reservation))
    }

    fn handle(&self, req: &Request, buf: &mut Vec<u8>) {
        let allowed = allowed_flags(req.command, self.structured);
        let result = if req.flags & !allowed != 0 {
            fail(
                EINVAL,
                format!(
                    "flags {:#x} are not valid for {}",
                    req.flags & !allowed,
                    command_name(req.command)
                ),
            )
        } else {
            match req.command {
                CMD_READ => self.read(req, buf),
                CMD_WRITE => self.write(req, buf),
                CMD_FLUSH => self.flush().map(|()| self.send_ok(req.cookie)),
                CMD_TRIM => self.trim(req),
                CMD_WRITE_ZEROES => self.write_zeroes(req),
                CMD_CACHE => self.cache(req, buf),
                CMD_BLOCK_STATUS => self.block_status(req),
                other => fail(EINVAL, format!("unknown command {other}")),
            }
        };
        if let Err(f) = result {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            self.export.stats.errors.fetch_add(1, Ordering::Relaxed);
            self.send_error(req.cookie, f);
        }
    }

    /// Converts an image error into a failure, logging it unless the export has logged one
    /// since its last success (the client gets the errno and a short message; the full one,
    /// with the OS error, file and offset, names server paths).
    fn image_op<T>(&self, r: crate::Result<T>) -> Result<T, Failure> {
        r.map_err(|e| {
            let error = nbd_error(e.errno());
            if matches!(error, EIO | ENOSPC) {
                self.export.note_fault(&e);
            }
            Failure {
                error,
                message: e
                    .to_string()
                    .rsplit(": ")
                    .next()
                    .unwrap_or("error")
                    .to_string(),
            }
        })
    }

    /// Runs a change (WRITE, TRIM, WRITE_ZEROES) against the image, noting it as one the
    /// next flush must account for.
    fn change(
        &self,
        op: impl FnOnce(&crate::image::Image) -> crate::Result<()>,
    ) -> Result<(), Failure> {
        let image = self.export.image();
        // Read before the change: a revert between the two cannot be missed.
        let reverts = image.reverts();
        self.image_op(op(&image))?;
        drop(image);
        let _ = self.unflushed_since.compare_exchange(
            NO_CHANGES,
            reverts,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        Ok(())
    }

    /// FLUSH (and FUA): fails when the flush does, and also when it succeeds but the image
    /// went back to its durable state since this connection's first unflushed change, so
    /// that no client is told its lost writes are durable.
    fn flush(&self) -> Result<(), Failure> {
        let since = self.unflushed_since.swap(NO_CHANGES, Ordering::AcqRel);
        let image = self.export.image();
        self.image_op(image.flush())?;
        if since != NO_CHANGES && image.reverts() != since {
            return fail(
                EIO,
                "writes since the last flush were lost: a flush failed and the image went back to its last flushed state",
            );
        }
        drop(image);
        self.export.note_success();
        Ok(())
    }

    fn after_write(&self, req: &Request) -> Result<(), Failure> {
        self.stats.wrote.store(true, Ordering::Relaxed);
        if req.flags & CMD_FLAG_FUA != 0 {
            self.flush()?;
        }
        self.export.note_success();
        self.send_ok(req.cookie);
        Ok(())
    }

    /// READ and CACHE: at most the advertised maximum, inside the export (EINVAL otherwise).
    fn check_read_range(&self, req: &Request, command: &str) -> Result<(), Failure> {
        if req.length > MAX_BLOCK_SIZE {
            return fail(
                EINVAL,
                format!(
                    "{command} of {} bytes exceeds the {MAX_BLOCK_SIZE} byte maximum",
                    req.length
                ),
            );
        }
        if !in_range(req.offset, req.length as u64, self.size) {
            return fail(EINVAL, format!("{command} beyond the end of the export"));
        }
        Ok(())
    }

    fn read(&self, req: &Request, buf: &mut Vec<u8>) -> Result<(), Failure> {
        self.check_read_range(req, "READ")?;
        let n = req.length as usize;
        if buf.len() < n {
            buf.resize(n, 0);
        }
        let data = &mut buf[..n];
        self.image_op(self.export.image().read_at(data, req.offset))?;
        self.stats.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
        self.export
            .stats
            .bytes_read
            .fetch_add(n as u64, Ordering::Relaxed);
        if !self.structured {
            self.send(&[&simple_reply(0, req.cookie), data]);
        } else if n == 0 {
            self.send(&[&chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                req.cookie,
                0,
            )]);
        } else {
            let header = chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                n as u32 + 8,
            );
            self.send(&[&header, &req.offset.to_be_bytes(), data]);
        }
        Ok(())
    }

    fn write(&self, req: &Request, buf: &[u8]) -> Result<(), Failure> {
        if self.read_only {
            return fail(EPERM, "the export is read-only");
        }
        if !in_range(req.offset, req.length as u64, self.size) {
            return fail(ENOSPC, "WRITE beyond the end of the export");
        }
        let data = &buf[..req.length as usize];
        self.change(|image| image.write_at(data, req.offset))?;
        self.stats
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.export
            .stats
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.after_write(req)
    }

    fn trim(&self, req: &Request) -> Result<(), Failure> {
        if self.read_only {
            return fail(EPERM, "the export is read-only");
        }
        if !in_range(req.offset, req.length as u64, self.size) {
            return fail(EINVAL, "TRIM beyond the end of the export");
        }
        self.change(|image| image.discard(req.offset, req.length as u64))?;
        self.after_write(req)
    }

    /// WRITE_ZEROES is metadata-only for whole units (zero markers), so FAST_ZERO always
    /// holds. Without NO_HOLE the space the range held is released (discard); with it,
    /// nothing is punched.
    fn write_zeroes(&self, req: &Request) -> Result<(), Failure> {
        if self.read_only {
            return fail(EPERM, "the export is read-only");
        }
        if !in_range(req.offset, req.length as u64, self.size) {
            return fail(ENOSPC, "WRITE_ZEROES beyond the end of the export");
        }
        let (off, len) = (req.offset, req.length as u64);
        if req.flags & CMD_FLAG_NO_HOLE != 0 {
            self.change(|image| image.write_zeroes(off, len))?;
        } else {
            self.change(|image| image.discard(off, len))?;
        }
        self.after_write(req)
    }

    /// Reads the range through, so that it is in the page cache when the client asks.
    fn cache(&self, req: &Request, buf: &mut Vec<u8>) -> Result<(), Failure> {
        self.check_read_range(req, "CACHE")?;
        let end = req.offset + req.length as u64;
        let mut pos = req.offset;
        while pos < end {
            let n = (end - pos).min(CACHE_PIECE) as usize;
            if buf.len() < n {
                buf.resize(n, 0);
            }
            self.image_op(self.export.image().read_at(&mut buf[..n], pos))?;
            pos += n as u64;
        }
        self.send_ok(req.cookie);
        Ok(())
    }

    fn block_status(&self, req: &Request) -> Result<(), Failure> {
        if !self.structured || !self.contexts.any() {
            return fail(
                EINVAL,
                "BLOCK_STATUS needs a meta context selected with NBD_OPT_SET_META_CONTEXT",
            );
        }
        if req.length == 0 {
            return fail(EINVAL, "BLOCK_STATUS of zero bytes");
        }
        if !in_range(req.offset, req.length as u64, self.size) {
            return fail(EINVAL, "BLOCK_STATUS beyond the end of the export");
        }
        let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
        let end = req.offset + req.length as u64;
        let mut allocation = Descriptors::new(CONTEXT_ID_ALLOCATION);
        let mut layer = Descriptors::new(CONTEXT_ID_LAYER);
        let mut pos = req.offset;
        while pos < end {
            let window = (end - pos).min(STATUS_WINDOW);
            for e in self.image_op(self.export.image().block_status(pos, window))? {
                allocation.push(e.length, allocation_flags(&e));
                layer.push(e.length, layer_value(&e));
            }
            pos += window;
            if req_one || allocation.len().max(layer.len()) >= MAX_DESCRIPTORS {
                break;
            }
        }
        if req_one {
            allocation.keep_first();
            layer.keep_first();
        }
        let mut chunks: Vec<Vec<u8>> = Vec::with_capacity(2);
        if self.contexts.allocation {
            chunks.push(allocation.encode(req.cookie));
        }
        if self.contexts.layer {
            chunks.push(layer.encode(req.cookie));
        }
        if let Some(last) = chunks.last_mut() {
            last[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        }
        let parts: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
        self.send(&parts);
        Ok(())
    }

    fn send_ok(&self, cookie: u64) {
        self.send(&[&simple_reply(0, cookie)]);
    }

    fn send_error(&self, cookie: u64, f: Failure) {
        if !self.structured {
            self.send(&[&simple_reply(f.error, cookie)]);
            return;
        }
        let msg = truncate(&f.message, 1024).as_bytes();
        let header = chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            cookie,
            6 + msg.len() as u32,
        );
        let mut fixed = [0u8; 6];
        fixed[..4].copy_from_slice(&f.error.to_be_bytes());
        fixed[4..].copy_from_slice(&(msg.len() as u16).to_be_bytes());
        self.send(&[&header, &fixed, msg]);
    }

    /// Writes one whole reply. A reply that cannot be written ends the connection: the
    /// client would otherwise wait for it forever.
    fn send(&self, parts: &[&[u8]]) {
        let mut out = lock(&self.output);
        if out.broken.is_some() {
            return;
        }
        if let Err(e) = out.transport.write_all_vectored(parts, self.io_timeout) {
            out.broken = Some(if self.shutting_down.load(Ordering::Relaxed) {
                "server shutting down".into()
            } else if e.kind() == io::ErrorKind::TimedOut {
                format!(
                    "the client did not read a reply for {}s (--io-timeout), disconnected",
                    self.io_timeout.unwrap_or_default().as_secs()
                )
            } else {
                format!("writing a reply failed: {e}")
            });
            drop(out);
            self.abort();
        }
    }
}

/// Hands memory that was freed back to the system. The allocator keeps freed blocks of
/// buffers this size for reuse, which is right while a connection is busy and wrong once
/// it is idle: idle connections must not hold memory.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

/// `base:allocation`: data is allocated; zeros and unallocated ranges are holes that read
/// as zeros.
fn allocation_flags(e: &Extent) -> u32 {
    match e.kind {
        ExtentKind::Data => 0,
        ExtentKind::Zero | ExtentKind::Unallocated => STATE_HOLE | STATE_ZERO,
    }
}

/// `cowimg:layer`: 0 when no layer has the range, else 1 + the depth of the layer that
/// decides it (1 = the image served, 2 = its backing file, ...).
fn layer_value(e: &Extent) -> u32 {
    match e.kind {
        ExtentKind::Unallocated => 0,
        ExtentKind::Data | ExtentKind::Zero => e.depth + 1,
    }
}

/// Block status descriptors of one context, merged where the value repeats.
struct Descriptors {
    context: u32,
    list: Vec<(u32, u32)>,
}

impl Descriptors {
    fn new(context: u32) -> Descriptors {
        Descriptors {
            context,
            list: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.list.len()
    }

    /// Lengths fit in u32: they add up to at most the request's u32 length.
    fn push(&mut self, length: u64, flags: u32) {
        if length == 0 {
            return;
        }
        match self.list.last_mut() {
            Some((l, f)) if *f == flags => *l += length as u32,
            _ => self.list.push((length as u32, flags)),
        }
    }

    fn keep_first(&mut self) {
        self.list.truncate(1);
    }

    /// The chunk (header and payload), without the DONE flag.
    fn encode(&self, cookie: u64) -> Vec<u8> {
        let payload = 4 + 8 * self.list.len();
        let mut c = Vec::with_capacity(CHUNK_HEADER_LEN + payload);
        c.extend_from_slice(&chunk_header(
            0,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            payload as u32,
        ));
        c.extend_from_slice(&self.context.to_be_bytes());
        for (l, f) in &self.list {
            c.extend_from_slice(&l.to_be_bytes());
            c.extend_from_slice(&f.to_be_bytes());
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_merge_equal_neighbours() {
        let mut d = Descriptors::new(7);
        d.push(4096, 0);
        d.push(4096, 0);
        d.push(0, 3);
        d.push(512, 3);
        assert_eq!(d.list, vec![(8192, 0), (512, 3)]);
        let c = d.encode(9);
        assert_eq!(c.len(), 20 + 4 + 16);
        assert_eq!(u32::from_be_bytes([c[16], c[17], c[18], c[19]]), 4 + 16);
        assert_eq!(u32::from_be_bytes([c[20], c[21], c[22], c[23]]), 7);
    }

    #[test]
    fn a_connection_keeps_its_floor_when_others_have_taken_the_pool() {
        // 64 bytes for 4 connections: floors of 8, a pool of 32.
        let m = Memory::new(64, 4);
        assert_eq!((m.floor, m.pool), (8, 32));
        let greedy = Share::default();
        let held = m
            .acquire(&greedy, 40, || false)
            .expect("the floor and the pool");
        assert_eq!(*lock(&m.borrowed), 32);
        // The pool is empty, yet another connection gets its floor at once...
        let other = Share::default();
        let small = m
            .acquire(&other, 8, || false)
            .expect("the floor is its own");
        // ...but not more: waiting for the pool gives up when the connection is gone.
        assert!(m.acquire(&other, 1, || true).is_none());
        drop(held);
        assert_eq!(*lock(&m.borrowed), 0);
        let more = m
            .acquire(&other, 20, || false)
            .expect("the pool is free again");
        assert_eq!(*lock(&m.borrowed), 20);
        drop((small, more));
        assert_eq!(other.held.load(Ordering::Relaxed), 0);
        assert_eq!(*lock(&m.borrowed), 0);
    }

    #[test]
    fn a_request_larger_than_the_pool_still_runs_alone() {
        let m = Memory::new(64, 4);
        let s = Share::default();
        let r = m.acquire(&s, 100, || false).expect("runs alone");
        assert!(m.acquire(&Share::default(), 9, || true).is_none());
        drop(r);
        assert_eq!(*lock(&m.borrowed), 0);
    }

    #[test]
    fn layer_values_count_from_one_for_the_top_image() {
        let e = |kind, depth| Extent {
            offset: 0,
            length: 1,
            depth,
            kind,
            host_offset: None,
            compressed: false,
        };
        assert_eq!(layer_value(&e(ExtentKind::Data, 0)), 1);
        assert_eq!(layer_value(&e(ExtentKind::Zero, 1)), 2);
        assert_eq!(layer_value(&e(ExtentKind::Unallocated, 1)), 0);
        assert_eq!(allocation_flags(&e(ExtentKind::Zero, 0)), 3);
        assert_eq!(allocation_flags(&e(ExtentKind::Data, 2)), 0);
    }
}
