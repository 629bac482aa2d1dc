//! Power-loss simulation shared by the crash suites (`crash`, `crash_resize`, `crash_v2`,
//! `upgrade_v2`): storage that logs every write, punch, length change and sync, and the
//! crash images a log allows.
use cowimg::storage::Storage;
use rand::rngs::StdRng;
use rand::Rng;
use std::io;
use std::sync::Mutex;

/// One request the image made of its storage, in order.
#[derive(Debug, Clone)]
pub enum LogOp {
    Write { offset: u64, data: Vec<u8> },
    Punch { offset: u64, len: u64 },
    SetLen(u64),
    Sync,
}

/// Storage that serves reads from the latest bytes (what a running system sees) and keeps
/// the log from which any crash state can be rebuilt. Safe to share between threads: every
/// request is logged in the order it took effect.
pub struct CrashStorage {
    inner: Mutex<CrashInner>,
    sync_delay: std::time::Duration,
}

struct CrashInner {
    current: Vec<u8>,
    log: Vec<LogOp>,
    syncs: usize,
}

impl CrashStorage {
    pub fn new(initial: Vec<u8>) -> Self {
        CrashStorage {
            inner: Mutex::new(CrashInner {
                current: initial,
                log: Vec::new(),
                syncs: 0,
            }),
            sync_delay: std::time::Duration::ZERO,
        }
    }
    /// Each sync takes `delay` (as an fdatasync does), so that concurrent callers overlap.
    /// The sync point is where it starts: what is written while it runs is not yet durable.
    pub fn with_sync_delay(initial: Vec<u8>, delay: std::time::Duration) -> Self {
        CrashStorage {
            sync_delay: delay,
            ..CrashStorage::new(initial)
        }
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, CrashInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Syncs completed so far.
    pub fn syncs(&self) -> usize {
        self.lock().syncs
    }
    pub fn log(&self) -> Vec<LogOp> {
        self.lock().log.clone()
    }
    pub fn contents(&self) -> Vec<u8> {
        self.lock().current.clone()
    }
}

/// Applies a punch the way a file does: zeros, never past the end.
fn punch(bytes: &mut [u8], offset: u64, len: u64) {
    let start = (offset as usize).min(bytes.len());
    let end = (offset.saturating_add(len) as usize).min(bytes.len());
    bytes[start..end].fill(0);
}

pub fn apply(bytes: &mut Vec<u8>, op: &LogOp) {
    match op {
        LogOp::Write { offset, data } => cowimg::storage::apply_write(bytes, data, *offset),
        LogOp::Punch { offset, len } => punch(bytes, *offset, *len),
        LogOp::SetLen(len) => bytes.resize(*len as usize, 0),
        LogOp::Sync => {}
    }
}

impl Storage for CrashStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let g = self.lock();
        let end = offset as usize + buf.len();
        if end > g.current.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end",
            ));
        }
        buf.copy_from_slice(&g.current[offset as usize..end]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut g = self.lock();
        cowimg::storage::apply_write(&mut g.current, buf, offset);
        g.log.push(LogOp::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        {
            let mut g = self.lock();
            g.log.push(LogOp::Sync);
            g.syncs += 1;
        }
        if !self.sync_delay.is_zero() {
            std::thread::sleep(self.sync_delay);
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut g = self.lock();
        punch(&mut g.current, offset, len);
        g.log.push(LogOp::Punch { offset, len });
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut g = self.lock();
        g.current.resize(len as usize, 0);
        g.log.push(LogOp::SetLen(len));
        Ok(())
    }
}

/// Tears a write or a punch: keeps a random subset of its 512-byte sectors (by absolute
/// offset).
pub fn torn(op: &LogOp, rng: &mut StdRng) -> Vec<LogOp> {
    let (offset, len) = match op {
        LogOp::Write { offset, data } => (*offset, data.len() as u64),
        LogOp::Punch { offset, len } => (*offset, *len),
        other => return vec![other.clone()],
    };
    let mut pieces = Vec::new();
    let mut pos = offset;
    while pos < offset + len {
        let next = ((pos / 512 + 1) * 512).min(offset + len);
        if rng.gen_bool(0.5) {
            pieces.push(match op {
                LogOp::Write { data, .. } => LogOp::Write {
                    offset: pos,
                    data: data[(pos - offset) as usize..(next - offset) as usize].to_vec(),
                },
                _ => LogOp::Punch {
                    offset: pos,
                    len: next - pos,
                },
            });
        }
        pos = next;
    }
    pieces
}

/// One disk a crash may leave.
pub struct CrashImage {
    /// Syncs that completed before the crash.
    pub syncs: usize,
    pub what: String,
    pub bytes: Vec<u8>,
}

/// Where a crash image stands among the images of its sync point, in the order
/// `for_each_crash_image` makes them: nothing after the sync, everything up to the next
/// one, the random subsets, then the torn sectors (the last, when there are tears).
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub index: usize,
    /// How many images this sync point has.
    pub count: usize,
}

impl Variant {
    /// The sync point's last image.
    pub fn is_last(&self) -> bool {
        self.index + 1 == self.count
    }
}

/// Calls `f` with every crash image of `log` over `initial`: for every sync point, the disk
/// with nothing of what followed it, with everything up to the next sync, with `subsets`
/// random subsets of those requests and with `tears` sets of torn sectors.
pub fn for_each_crash_image(
    initial: &[u8],
    log: &[LogOp],
    rng: &mut StdRng,
    subsets: usize,
    tears: usize,
    mut f: impl FnMut(CrashImage, &mut StdRng),
) {
    for_each_crash_image_variant(initial, log, rng, subsets, tears, |image, _, rng| {
        f(image, rng)
    });
}

/// `for_each_crash_image`, also telling `f` which of its sync point's images each one is.
/// The images, their order and the draws from `rng` are the same.
pub fn for_each_crash_image_variant(
    initial: &[u8],
    log: &[LogOp],
    rng: &mut StdRng,
    subsets: usize,
    tears: usize,
    mut f: impl FnMut(CrashImage, Variant, &mut StdRng),
) {
    let total_syncs = log.iter().filter(|op| matches!(op, LogOp::Sync)).count();
    let mut durable = initial.to_vec();
    let mut ops = log.iter();
    for k in 0..=total_syncs {
        // The requests between sync k and sync k+1: any subset may have reached the disk.
        let mut pending = Vec::new();
        for op in ops.by_ref() {
            if matches!(op, LogOp::Sync) {
                break;
            }
            pending.push(op.clone());
        }
        let mut variants: Vec<(String, Vec<LogOp>)> =
            vec![(format!("crash at sync {k}, nothing after it"), Vec::new())];
        if !pending.is_empty() {
            variants.push((
                format!("crash at sync {k}, everything after it"),
                pending.clone(),
            ));
            for v in 0..subsets {
                let subset: Vec<LogOp> = pending
                    .iter()
                    .filter(|_| rng.gen_bool(0.5))
                    .cloned()
                    .collect();
                variants.push((format!("crash at sync {k}, random subset {v}"), subset));
            }
            for v in 0..tears {
                let tear: Vec<LogOp> = pending.iter().flat_map(|op| torn(op, rng)).collect();
                variants.push((format!("crash at sync {k}, torn sectors {v}"), tear));
            }
        }
        let count = variants.len();
        for (index, (what, subset)) in variants.into_iter().enumerate() {
            let mut bytes = durable.clone();
            for op in &subset {
                apply(&mut bytes, op);
            }
            f(
                CrashImage {
                    syncs: k,
                    what,
                    bytes,
                },
                Variant { index, count },
                rng,
            );
        }
        for op in pending {
            apply(&mut durable, &op);
        }
    }
}
