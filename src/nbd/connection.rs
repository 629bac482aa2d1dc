//! The transmission phase of one connection.
//!
//! A fixed set of worker threads share the connection (leader/follower, as nbdkit does):
//! whichever worker holds the input lock reads the next request header and its payload,
//! releases the lock, runs the request against the image and writes the reply under the
//! output lock with one `writev`. So requests run concurrently and are answered out of
//! order, no request is handed from thread to thread, and each worker reuses its own
//! buffer. Memory is bounded by byte budgets (per connection and server-wide) that a
//! request's payload or reply data must fit in before its payload is read.
use super::handshake::{MetaContexts, CONTEXT_ID_ALLOCATION, CONTEXT_ID_LAYER};
use super::protocol::*;
use super::socket::Socket;
use crate::image::{Extent, ExtentKind, Image};
use std::io::{self, BufReader, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Bytes of READ data or WRITE payload one connection may hold at once.
pub(crate) const CONNECTION_BUDGET: u64 = 64 << 20;
/// Buffers up to this size stay with their worker between requests; larger ones are
/// freed, so a burst of 32 MiB requests does not pin memory afterwards.
const RETAINED_BUFFER: usize = 2 << 20;
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pool of bytes that requests reserve before their data exists.
pub(crate) struct Budget {
    capacity: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    pub fn new(capacity: u64) -> Budget {
        Budget {
            capacity,
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Waits until `n` bytes fit. A request larger than the whole budget still runs, alone.
    fn acquire(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mut used = lock(&self.used);
        while *used > 0 && *used + n > self.capacity {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += n;
    }

    fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mut used = lock(&self.used);
        *used -= n;
        self.freed.notify_all();
    }
}

/// Bytes reserved in both budgets, given back on drop.
struct Reservation<'a> {
    budgets: [&'a Budget; 2],
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        for b in self.budgets {
            b.release(self.bytes);
        }
    }
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

struct Input {
    reader: BufReader<Socket>,
    /// Why reading stopped; once set, workers finish what they hold and exit.
    end: Option<String>,
}

struct Output {
    socket: Socket,
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
    pub wrote: AtomicBool,
}

pub(crate) struct Transmission<'a> {
    image: &'a Image,
    size: u64,
    read_only: bool,
    structured: bool,
    contexts: MetaContexts,
    input: Mutex<Input>,
    output: Mutex<Output>,
    /// A handle on the socket to hang up with, whoever holds the locks.
    control: Socket,
    budget: Budget,
    global: &'a Budget,
    shutting_down: &'a AtomicBool,
    pub stats: Stats,
    /// The first image error, logged once per connection.
    logged_image_error: AtomicBool,
}

pub(crate) struct Params<'a> {
    pub image: &'a Image,
    pub read_only: bool,
    pub structured: bool,
    pub contexts: MetaContexts,
    pub global: &'a Budget,
    pub shutting_down: &'a AtomicBool,
}

impl<'a> Transmission<'a> {
    pub fn new(socket: Socket, p: Params<'a>) -> io::Result<Transmission<'a>> {
        let control = socket.try_clone()?;
        let writer = socket.try_clone()?;
        Ok(Transmission {
            image: p.image,
            size: p.image.virtual_size(),
            read_only: p.read_only,
            structured: p.structured,
            contexts: p.contexts,
            input: Mutex::new(Input {
                reader: BufReader::with_capacity(INPUT_BUFFER, socket),
                end: None,
            }),
            output: Mutex::new(Output {
                socket: writer,
                broken: None,
            }),
            control,
            budget: Budget::new(CONNECTION_BUDGET),
            global: p.global,
            shutting_down: p.shutting_down,
            stats: Stats::default(),
            logged_image_error: AtomicBool::new(false),
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
        let input_end = lock(&self.input).end.take();
        let output_end = lock(&self.output).broken.take();
        output_end
            .or(input_end)
            .unwrap_or_else(|| "connection closed".into())
    }

    /// Hangs up at once: wakes the reader and makes pending writes fail.
    fn hang_up(&self) {
        self.control.shutdown(Shutdown::Both);
    }

    fn worker(&self) {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let (req, reservation) = {
                let mut input = lock(&self.input);
                if input.end.is_some() {
                    return;
                }
                match self.next_request(&mut input, &mut buf) {
                    Ok(r) => r,
                    Err(reason) => {
                        input.end = Some(reason);
                        return;
                    }
                }
            };
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            self.handle(&req, &mut buf);
            drop(reservation);
            if buf.capacity() > RETAINED_BUFFER {
                buf = Vec::new();
            }
        }
    }

    /// Reads the next request and its payload (into `buf`), after reserving the memory
    /// it needs. Errors are why the connection ends.
    fn next_request(
        &self,
        input: &mut Input,
        buf: &mut Vec<u8>,
    ) -> Result<(Request, Reservation<'_>), String> {
        let mut h = [0u8; REQUEST_LEN];
        if let Err(e) = input.reader.read_exact(&mut h) {
            return Err(if self.shutting_down.load(Ordering::Relaxed) {
                "server shutting down".into()
            } else if e.kind() == io::ErrorKind::UnexpectedEof {
                "client closed the connection without NBD_CMD_DISC".into()
            } else {
                format!("reading a request failed: {e}")
            });
        }
        let req = Request::parse(&h);
        if req.magic != REQUEST_MAGIC {
            self.hang_up();
            return Err(format!(
                "protocol violation: bad request magic {:#010x}",
                req.magic
            ));
        }
        if req.command == CMD_DISC {
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
        self.budget.acquire(bytes);
        self.global.acquire(bytes);
        let reservation = Reservation {
            budgets: [&self.budget, self.global],
            bytes,
        };
        if payload > 0 {
            let n = payload as usize;
            if buf.len() < n {
                buf.resize(n, 0);
            }
            if let Err(e) = input.reader.read_exact(&mut buf[..n]) {
                return Err(format!(
                    "client went away in the middle of a {n} byte WRITE payload: {e}"
                ));
            }
        }
        Ok((req, reservation))
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
                CMD_FLUSH => self
                    .image_op(self.image.flush())
                    .map(|()| self.send_ok(req.cookie)),
                CMD_TRIM => self.trim(req),
                CMD_WRITE_ZEROES => self.write_zeroes(req),
                CMD_CACHE => self.cache(req, buf),
                CMD_BLOCK_STATUS => self.block_status(req),
                other => fail(EINVAL, format!("unknown command {other}")),
            }
        };
        if let Err(f) = result {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            self.send_error(req.cookie, f);
        }
    }

    /// Converts an image error into a failure, logging the first one of the connection
    /// (the client gets the errno and a short message; the full one names server paths).
    fn image_op<T>(&self, r: crate::Result<T>) -> Result<T, Failure> {
        r.map_err(|e| {
            let error = nbd_error(e.errno());
            if error == EIO && !self.logged_image_error.swap(true, Ordering::Relaxed) {
                eprintln!("cowimg: {e}");
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

    fn after_write(&self, req: &Request) -> Result<(), Failure> {
        self.stats.wrote.store(true, Ordering::Relaxed);
        if req.flags & CMD_FLAG_FUA != 0 {
            self.image_op(self.image.flush())?;
        }
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
        self.image_op(self.image.read_at(data, req.offset))?;
        self.stats.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
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
        self.image_op(self.image.write_at(data, req.offset))?;
        self.stats
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
        self.image_op(self.image.discard(req.offset, req.length as u64))?;
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
            self.image_op(self.image.write_zeroes(off, len))?;
        } else {
            self.image_op(self.image.discard(off, len))?;
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
            self.image_op(self.image.read_at(&mut buf[..n], pos))?;
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
            for e in self.image_op(self.image.block_status(pos, window))? {
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
        if let Err(e) = out.socket.write_all_vectored(parts) {
            out.broken = Some(if self.shutting_down.load(Ordering::Relaxed) {
                "server shutting down".into()
            } else {
                format!("writing a reply failed: {e}")
            });
            drop(out);
            self.hang_up();
        }
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
    fn budget_lets_an_oversized_request_run_alone() {
        let b = Budget::new(10);
        b.acquire(25);
        b.release(25);
        b.acquire(4);
        b.acquire(6);
        assert_eq!(*lock(&b.used), 10);
    }

    #[test]
    fn layer_values_count_from_one_for_the_top_image() {
        let e = |kind, depth| Extent {
            offset: 0,
            length: 1,
            depth,
            kind,
            host_offset: None,
        };
        assert_eq!(layer_value(&e(ExtentKind::Data, 0)), 1);
        assert_eq!(layer_value(&e(ExtentKind::Zero, 1)), 2);
        assert_eq!(layer_value(&e(ExtentKind::Unallocated, 1)), 0);
        assert_eq!(allocation_flags(&e(ExtentKind::Zero, 0)), 3);
        assert_eq!(allocation_flags(&e(ExtentKind::Data, 2)), 0);
    }
}
