//! Crash simulation: every write and sync the image issues is logged; for every sync point
//! of the log, and for random subsets (and torn sectors) of the writes that followed it, the
//! durable bytes are rebuilt and opened. The image must open without repair and read
//! exactly the state of the last flush that completed before the crash, or of the flush in
//! progress, never a mix. Also: injected I/O errors, and a writer waiting on a failed flush.
mod lib_support;

use cowimg::image::Image;
use cowimg::storage::{MemStorage, Storage};
use cowimg::Error;
use lib_support::crash_log::{for_each_crash_image_variant, CrashImage, CrashStorage, LogOp};
use lib_support::{
    backing_content, fingerprint, fit, fresh_image_bytes, open_mem, raw_layer, read_all, Change,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A flush of the workload: the syncs done when it started and when it returned, and the
/// state it made durable.
struct FlushRecord {
    start_sync: usize,
    end_sync: usize,
    state: u64,
}

/// A workload's geometry.
#[derive(Clone, Copy, Debug)]
struct Workload {
    size: u64,
    cluster_size: u64,
    backing_len: Option<usize>,
    flushes: usize,
    seed: u64,
}

struct Recorded {
    initial: Vec<u8>,
    log: Vec<LogOp>,
    flushes: Vec<FlushRecord>,
    backing: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

/// The changes of one flush interval. Some intervals rewrite many clusters so that journal
/// records span several blocks and checkpoints come sooner.
fn interval_changes(rng: &mut StdRng, w: &Workload) -> Vec<Change> {
    let n = if rng.gen_bool(0.05) {
        12
    } else {
        rng.gen_range(1..=3)
    };
    (0..n)
        .map(|_| Change::random(rng, w.size, w.cluster_size))
        .collect()
}

/// Runs the workload on an image over `storage`, checking reads against the model as it
/// goes, and records the durable state of every flush.
fn run_workload<S: Storage + 'static>(
    w: &Workload,
    storage: Arc<S>,
    backing: Option<&Path>,
    syncs: impl Fn(&S) -> usize,
    mut on_error: impl FnMut(&Image, Error, &[FlushRecord], u64),
    before_close: impl FnOnce(&S),
) -> Vec<FlushRecord> {
    let mut rng = StdRng::seed_from_u64(w.seed);
    let backing_bytes = w
        .backing_len
        .map(|len| fit(&backing_content(w.seed, len), w.size as usize));
    let mut model = backing_bytes.unwrap_or_else(|| vec![0u8; w.size as usize]);
    let dynamic: Arc<dyn Storage> = storage.clone();
    let mut image = Image::open_storage(dynamic, Path::new("crash.cow"), false)
        .expect("opening the workload image");
    if let Some(b) = backing {
        image.attach_backing(raw_layer(b));
    }
    let mut flushes = vec![FlushRecord {
        start_sync: 0,
        end_sync: 0,
        state: fingerprint(&model),
    }];
    for _ in 0..w.flushes {
        for change in interval_changes(&mut rng, w) {
            if let Err(e) = change.apply_to_image(&image) {
                // The state a flush now would have made durable, had it happened.
                return {
                    on_error(&image, e, &flushes, fingerprint(&model));
                    flushes
                };
            }
            change.apply_to_model(&mut model);
        }
        let start_sync = syncs(&storage);
        let state = fingerprint(&model);
        if let Err(e) = image.flush() {
            on_error(&image, e, &flushes, state);
            return flushes;
        }
        flushes.push(FlushRecord {
            start_sync,
            end_sync: syncs(&storage),
            state,
        });
    }
    assert_eq!(
        fingerprint(&read_all(&image)),
        fingerprint(&model),
        "the workload image drifted from the model"
    );
    before_close(&storage);
    flushes
}

fn record(w: &Workload) -> Recorded {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = w.backing_len.map(|len| {
        let path = dir.path().join("base.raw");
        std::fs::write(&path, backing_content(w.seed, len)).expect("writing base.raw");
        path
    });
    let initial = fresh_image_bytes(w.size, w.cluster_size);
    let storage = Arc::new(CrashStorage::new(initial.clone()));
    let flushes = run_workload(
        w,
        storage.clone(),
        backing.as_deref(),
        CrashStorage::syncs,
        |_, e, _, _| panic!("the workload failed on storage that cannot fail: {e}"),
        |_| {},
    );
    Recorded {
        initial,
        log: storage.log(),
        flushes,
        backing,
        _dir: dir,
    }
}

/// The states a crash after `syncs` completed syncs may show: the last flush all of whose
/// syncs are among them, or the one after it if it had started.
fn allowed_states(flushes: &[FlushRecord], syncs: usize) -> (usize, Vec<u64>) {
    let last = flushes
        .iter()
        .rposition(|f| f.end_sync <= syncs)
        .expect("the initial state is always complete");
    let mut states = vec![flushes[last].state];
    if let Some(next) = flushes
        .get(last + 1)
        .filter(|next| next.start_sync <= syncs)
    {
        states.push(next.state);
    }
    (last, states)
}

/// What one crash image showed.
enum Outcome {
    /// Matched the allowed state at this index of `allowed_states`.
    State(usize),
}

fn open_crashed(
    bytes: Vec<u8>,
    rec: &Recorded,
    read_only: bool,
) -> Result<(Arc<MemStorage>, Image), Error> {
    let storage = Arc::new(MemStorage::new(bytes));
    let dynamic: Arc<dyn Storage> = storage.clone();
    let mut image = Image::open_storage(dynamic, Path::new("crashed.cow"), read_only)?;
    if let Some(b) = &rec.backing {
        image.attach_backing(raw_layer(b));
    }
    Ok((storage, image))
}

/// `cowimg check` on a crash image: a crash leaves at most leaks, never corruption.
fn check_finds_no_corruption(bytes: &[u8], rec: &Recorded, what: &str) {
    let path = rec._dir.path().join("crashed-for-check.cow");
    std::fs::write(&path, bytes).expect("writing the crash image");
    let report = cowimg::image::ops::check(&path, false)
        .unwrap_or_else(|e| panic!("{what}: check failed to run: {e}"));
    assert!(
        report.corruptions.is_empty(),
        "{what}: check reports corruption: {:?}",
        report.corruptions
    );
    std::fs::remove_file(&path).expect("removing the crash image");
}

fn check_crash_image(
    bytes: Vec<u8>,
    rec: &Recorded,
    syncs: usize,
    what: &str,
    continue_with: Option<&mut StdRng>,
    w: &Workload,
) -> Outcome {
    let (last, allowed) = allowed_states(&rec.flushes, syncs);
    if continue_with.is_some() {
        check_finds_no_corruption(&bytes, rec, what);
    }
    let (storage, image) = open_crashed(bytes, rec, continue_with.is_none())
        .unwrap_or_else(|e| panic!("{what}: the crashed image does not open: {e}"));
    let content = read_all(&image);
    let seen = fingerprint(&content);
    let Some(which) = allowed.iter().position(|&s| s == seen) else {
        let other = rec.flushes.iter().position(|f| f.state == seen);
        panic!("{what}: after {syncs} syncs the image reads neither flush {last} nor the one in progress (matches flush {other:?}: a mix or an old state)");
    };
    if let Some(rng) = continue_with {
        // Carry on from the crash: new writes and a flush land on top of whatever the crash
        // left in the journal, and a reopen shows them.
        let mut model = content;
        for _ in 0..3 {
            let change = Change::random(rng, w.size, w.cluster_size);
            change
                .apply_to_image(&image)
                .unwrap_or_else(|e| panic!("{what}: writing after the crash: {e}"));
            change.apply_to_model(&mut model);
        }
        image
            .flush()
            .unwrap_or_else(|e| panic!("{what}: flushing after the crash: {e}"));
        drop(image);
        let (_, again) = open_crashed(storage.contents(), rec, true)
            .unwrap_or_else(|e| panic!("{what}: reopening after the crash and a flush: {e}"));
        lib_support::assert_same_bytes(
            &read_all(&again),
            &model,
            &format!("{what}: written and flushed after the crash"),
        );
    }
    Outcome::State(which)
}

/// Replays the log to every sync point and checks crash images built from it.
fn check_every_sync_point(w: Workload) {
    let rec = record(&w);
    let total_syncs = rec
        .log
        .iter()
        .filter(|op| matches!(op, LogOp::Sync))
        .count();
    assert!(
        total_syncs > 2 * w.flushes / 2,
        "the workload synced only {total_syncs} times"
    );
    let mut rng = StdRng::seed_from_u64(w.seed ^ 0xc0ffee);
    let mut saw_in_progress = 0usize;
    let mut checked = 0usize;
    // For every sync point: nothing after it, everything up to the next, 4 random subsets and
    // 2 sets of torn sectors.
    for_each_crash_image_variant(
        &rec.initial,
        &rec.log,
        &mut rng,
        4,
        2,
        |image, variant, rng| {
            let CrashImage { syncs, what, bytes } = image;
            // Every few sync points, the last (most torn) variant also goes through `check` and
            // carries on writing.
            let continue_with = (syncs % 2 == 0 && variant.is_last()).then_some(rng);
            let Outcome::State(which) = check_crash_image(
                bytes,
                &rec,
                syncs,
                &format!("{w:?}: {what}"),
                continue_with,
                &w,
            );
            saw_in_progress += which;
            checked += 1;
        },
    );
    assert!(
        checked > total_syncs,
        "only {checked} crash images were checked"
    );
    // The simulation is only meaningful if some crashes did land on the flush in progress.
    assert!(
        saw_in_progress > 0,
        "no crash image showed the flush in progress"
    );
}

#[test]
fn crash_at_any_point_leaves_the_last_flush_or_the_one_in_progress_with_64k_clusters() {
    // About 1.2 journal fills: the run crosses a checkpoint.
    check_every_sync_point(Workload {
        size: 1024 * 1024,
        cluster_size: 64 * 1024,
        backing_len: Some(768 * 1024),
        flushes: 330,
        seed: 1,
    });
}

#[test]
fn crash_at_any_point_leaves_the_last_flush_or_the_one_in_progress_with_4k_clusters() {
    check_every_sync_point(Workload {
        size: 512 * 1024 + 1000,
        cluster_size: 4096,
        backing_len: Some(600 * 1024),
        flushes: 120,
        seed: 2,
    });
}

#[test]
fn crash_at_any_point_leaves_the_last_flush_or_the_one_in_progress_with_2m_clusters() {
    check_every_sync_point(Workload {
        size: 1024 * 1024,
        cluster_size: 2 * 1024 * 1024,
        backing_len: None,
        flushes: 80,
        seed: 3,
    });
}

#[test]
fn the_workload_crosses_a_checkpoint() {
    // Guards the premise of the 64K test: its log contains a header rewrite (a checkpoint).
    let w = Workload {
        size: 1024 * 1024,
        cluster_size: 64 * 1024,
        backing_len: Some(768 * 1024),
        flushes: 330,
        seed: 1,
    };
    let rec = record(&w);
    let header_writes = rec
        .log
        .iter()
        .filter(|op| matches!(op, LogOp::Write { offset, .. } if *offset < 8192))
        .count()
        // The initial header of a version-2 image is written with both slots at once.
        .saturating_sub(usize::from(lib_support::format_version() == 2));
    assert!(
        header_writes >= 1,
        "no checkpoint happened in {} flushes",
        w.flushes
    );
}

/// Which request to fail.
#[derive(Clone, Copy, Debug, PartialEq)]
enum FailOn {
    Write,
    Sync,
    Punch,
}

/// Memory storage that fails the n-th request of one kind with EIO.
struct FaultyStorage {
    mem: MemStorage,
    fail_on: FailOn,
    fail_at: usize,
    counts: [AtomicUsize; 3],
    syncs: AtomicUsize,
}

impl FaultyStorage {
    fn hit(&self, kind: FailOn) -> io::Result<()> {
        let n = self.counts[kind as usize].fetch_add(1, Ordering::SeqCst) + 1;
        if kind == self.fail_on && n == self.fail_at {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

impl Storage for FaultyStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.hit(FailOn::Write)?;
        self.mem.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.hit(FailOn::Sync)?;
        self.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.mem.len()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.hit(FailOn::Punch)?;
        self.mem.punch_hole(offset, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.mem.set_len(len)
    }
}

fn faulty(w: &Workload, fail_on: FailOn, fail_at: usize) -> Arc<FaultyStorage> {
    Arc::new(FaultyStorage {
        mem: MemStorage::new(fresh_image_bytes(w.size, w.cluster_size)),
        fail_on,
        fail_at,
        counts: Default::default(),
        syncs: AtomicUsize::new(0),
    })
}

#[test]
fn an_injected_io_error_fails_the_request_the_last_flush_survives_and_the_image_recovers() {
    let w = Workload {
        size: 512 * 1024,
        cluster_size: 16 * 1024,
        backing_len: Some(300 * 1024),
        flushes: 30,
        seed: 4,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    std::fs::write(&base, backing_content(w.seed, w.backing_len.unwrap_or(0)))
        .expect("writing base.raw");
    // A clean run counts the requests of each kind made before the image is closed (closing
    // writes too, but cannot report an error).
    let clean = faulty(&w, FailOn::Write, usize::MAX);
    let mut counts = [0usize; 3];
    run_workload(
        &w,
        clean,
        Some(&base),
        |s| s.syncs.load(Ordering::SeqCst),
        |_, e, _, _| panic!("clean run failed: {e}"),
        |s| {
            counts = [0, 1, 2].map(|i| s.counts[i].load(Ordering::SeqCst));
        },
    );
    let mut failures = 0;
    for fail_on in [FailOn::Write, FailOn::Sync, FailOn::Punch] {
        let total = counts[fail_on as usize];
        assert!(total > 0, "the workload made no {fail_on:?} request");
        for fail_at in 1..=total {
            let storage = faulty(&w, fail_on, fail_at);
            let mut outcome = None;
            let at_failure = storage.clone();
            run_workload(
                &w,
                storage.clone(),
                Some(&base),
                |s| s.syncs.load(Ordering::SeqCst),
                |image, e, flushes, pending| {
                    let message = e.to_string();
                    assert!(
                        message.contains("crash.cow") && message.contains("0x"),
                        "{fail_on:?} #{fail_at}: error without file and offset: {message}"
                    );
                    let contents = at_failure.mem.contents();
                    // The fault was one request: the image takes writes and flushes again
                    // (after a failed flush, from its last durable state).
                    image.write_at(b"x", 0).unwrap_or_else(|e| {
                        panic!("{fail_on:?} #{fail_at}: a write after the failure: {e}")
                    });
                    image.flush().unwrap_or_else(|e| {
                        panic!("{fail_on:?} #{fail_at}: a flush after the failure: {e}")
                    });
                    outcome = Some((flushes.last().map(|f| f.state), pending, contents));
                },
                |_| {},
            );
            let Some((last, pending, contents)) = outcome else {
                // A flush's punches only give space back once it is durable: their failure
                // is not the flush's, and the run (which checks the image against the
                // model at its end) went on.
                assert_eq!(
                    fail_on,
                    FailOn::Punch,
                    "{fail_on:?} #{fail_at}: the failing request did not surface as an error"
                );
                continue;
            };
            failures += 1;
            // The write and flush after the failure are durable.
            let after = open_mem(
                &Arc::new(MemStorage::new(storage.mem.contents())),
                "crash.cow",
                Some(raw_layer(&base)),
            )
            .unwrap_or_else(|e| panic!("{fail_on:?} #{fail_at}: reopening after recovery: {e}"));
            let mut first = [0u8; 1];
            after.read_at(&mut first, 0).unwrap();
            assert_eq!(
                &first, b"x",
                "{fail_on:?} #{fail_at}: the write after recovery"
            );
            // Reopen what had reached the storage when the request failed: the last completed
            // flush, or the one that failed if everything but its final step got through.
            let reopened = open_mem(
                &Arc::new(MemStorage::new(contents)),
                "crash.cow",
                Some(raw_layer(&base)),
            )
            .unwrap_or_else(|e| panic!("{fail_on:?} #{fail_at}: reopening after the error: {e}"));
            let seen = fingerprint(&read_all(&reopened));
            assert!(
                Some(seen) == last || seen == pending,
                "{fail_on:?} #{fail_at}: reopened image lost the last completed flush"
            );
        }
    }
    assert!(failures > 10, "only {failures} injected failures");
}

/// Storage whose next sync, once armed, blocks until released and then fails.
struct StallingStorage {
    mem: MemStorage,
    armed: Mutex<bool>,
    entered: std::sync::mpsc::SyncSender<()>,
    release: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Storage for StallingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.mem.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        let armed = std::mem::take(&mut *self.armed.lock().unwrap());
        if armed {
            let _ = self.entered.send(());
            let _ = self.release.lock().unwrap().recv();
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.mem.len()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mem.punch_hole(offset, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.mem.set_len(len)
    }
}

/// A write that must wait for the flush in progress (both slots of its unit are pinned)
/// does not wait forever when that flush fails: the image goes back to its durable state,
/// and the write lands on it.
#[test]
fn a_writer_waiting_on_a_flush_that_fails_is_not_left_hanging_and_lands_on_the_durable_state() {
    let (entered_tx, entered_rx) = std::sync::mpsc::sync_channel(1);
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let storage = Arc::new(StallingStorage {
        mem: MemStorage::new(fresh_image_bytes(1 << 20, 64 * 1024)),
        armed: Mutex::new(false),
        entered: entered_tx,
        release: Mutex::new(release_rx),
    });
    let dynamic: Arc<dyn Storage> = storage.clone();
    let image = Arc::new(
        Image::open_storage(dynamic, Path::new("stall.cow"), false).expect("opening stall.cow"),
    );
    // The unit becomes durable in slot A, then is rewritten into slot B.
    image.write_at(&[1u8; 4096], 0).expect("first write");
    image.flush().expect("first flush");
    image.write_at(&[2u8; 4096], 0).expect("second write");
    *storage.armed.lock().unwrap() = true;
    let flusher = {
        let image = image.clone();
        std::thread::spawn(move || image.flush())
    };
    entered_rx.recv().expect("the flush reaches its sync");
    // Slot A is durable and slot B is in flight: this write has to wait for the flush.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    {
        let image = image.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send(image.write_at(&[3u8; 4096], 0));
        });
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    release_tx.send(()).expect("releasing the sync");
    assert!(
        flusher.join().expect("flusher thread").is_err(),
        "the flush whose sync failed reported success"
    );
    let result = done_rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the waiting writer never returned (hang)");
    result.expect("the write after the revert");
    assert_eq!(image.reverts(), 1);
    image.flush().expect("a flush after the revert");
    let reopened = open_mem(
        &Arc::new(MemStorage::new(storage.mem.contents())),
        "stall.cow",
        None,
    )
    .expect("reopening");
    let mut buf = vec![0u8; 4096];
    reopened.read_at(&mut buf, 0).unwrap();
    // Version 1 makes the third write wait for the flush (both slots of its unit are
    // pinned), so it lands after the revert. Version 2 writes it to a new block at once;
    // the revert then takes it back with everything since the last completed flush, and
    // the revert count tells its writer so.
    if lib_support::format_version() == 2 {
        // The failed flush's record and data are in memory storage whole, so the state
        // gone back to may be that flush (2) or the one before (1), never the lost 3.
        assert!(
            buf == vec![2u8; 4096] || buf == vec![1u8; 4096],
            "the reverted image holds neither flushed state (first byte {})",
            buf[0]
        );
    } else {
        assert!(
            buf == vec![3u8; 4096],
            "the write after the revert is not durable (first byte {})",
            buf[0]
        );
    }
}
