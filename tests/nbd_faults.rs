//! Faults survived: a full file system under one export (ENOSPC through NBD, then space
//! freed, on the same connection), while another export on another file system never
//! notices; and a failed fdatasync that sends the image back to its durable state.
mod nbd_support;

use cowimg::image::{CreateOptions, Image};
use cowimg::storage::{MemStorage, Storage};
use nbd_support::*;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const CHUNK: usize = 1 << 20;

/// A small ext4 file system on a loop device, unmounted on drop.
struct SmallFs {
    mountpoint: PathBuf,
}

impl SmallFs {
    fn new(dir: &Path, megabytes: u64) -> SmallFs {
        let backing = dir.join("fs.img");
        let f = std::fs::File::create(&backing).unwrap();
        f.set_len(megabytes << 20).unwrap();
        drop(f);
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-O", "^has_journal"])
            .arg(&backing));
        let mountpoint = dir.join("mnt");
        std::fs::create_dir(&mountpoint).unwrap();
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&backing)
            .arg(&mountpoint));
        SmallFs { mountpoint }
    }

    fn free_bytes(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.mountpoint).unwrap();
        st.blocks_available() as u64 * st.fragment_size() as u64
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mountpoint).status();
    }
}

fn chunk(i: usize) -> Vec<u8> {
    pattern(CHUNK, (i * CHUNK) as u64, i as u8 + 1)
}

#[test]
fn a_full_disk_returns_enospc_and_the_same_connection_writes_again_once_space_is_freed() {
    if !have_root() || !have_tool("mkfs.ext4") || !have_tool("mount") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = SmallFs::new(dir.path(), 48);
    let small = fs.mountpoint.join("small.cow");
    create_image(&small, 64 << 20);
    // Leave about 12 MiB: the export fills it within its 64 MiB.
    let ballast = fs.mountpoint.join("ballast");
    let keep = 12 << 20;
    let fill = fs.free_bytes().saturating_sub(keep);
    run(Command::new("fallocate")
        .args(["-l", &fill.to_string()])
        .arg(&ballast));
    let other = dir.path().join("other.cow");
    create_image(&other, 64 << 20);
    let small_arg = format!("small={}", small.display());
    let other_arg = format!("other={}", other.display());
    let mut server = Server::start_with(
        dir.path(),
        &["--export", &small_arg, "--export", &other_arg],
    );

    // The other export writes all along, on its own file system.
    let stop = Arc::new(AtomicBool::new(false));
    let bystander = {
        let socket = server.socket.clone();
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut c = RawClient::connect(&socket);
            c.go_named("other").unwrap();
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) || rounds < 4 {
                let off = (rounds % 32) * 65536;
                assert_eq!(c.call(CMD_WRITE, 0, off, 65536, &[7; 65536]).error, 0);
                assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).error, 0);
                rounds += 1;
            }
            rounds
        })
    };

    let mut c = RawClient::connect(&server.socket);
    c.go_named("small").unwrap();
    let mut flushed = 0; // chunks [0, flushed) are durable
    let mut error = None;
    for i in 0..64 {
        let r = c.call(CMD_WRITE, 0, (i * CHUNK) as u64, CHUNK as u32, &chunk(i));
        if r.error != 0 {
            error = Some(("WRITE", r.error));
            break;
        }
        let r = c.call(CMD_FLUSH, 0, 0, 0, &[]);
        if r.error != 0 {
            error = Some(("FLUSH", r.error));
            break;
        }
        flushed = i + 1;
    }
    let (what, errno) = error.expect("the small file system never filled up");
    assert_eq!(errno, ENOSPC, "{what} failed with {errno}, not ENOSPC");
    assert!(flushed > 0, "nothing fitted before the disk was full");
    assert!(
        server.wait_for_log("No space left on device", std::time::Duration::from_secs(5)),
        "{}",
        server.log()
    );

    // Space comes back; the same connection carries on from the last flushed chunk.
    std::fs::remove_file(&ballast).unwrap();
    for i in flushed..flushed + 8 {
        let r = c.call(CMD_WRITE, 0, (i * CHUNK) as u64, CHUNK as u32, &chunk(i));
        assert_eq!(r.error, 0, "write of chunk {i} after space was freed");
    }
    assert_eq!(
        c.call(CMD_FLUSH, 0, 0, 0, &[]).error,
        0,
        "flush after space was freed"
    );
    for i in 0..flushed + 8 {
        let r = c.call(CMD_READ, 0, (i * CHUNK) as u64, CHUNK as u32, &[]);
        assert_eq!(r.error, 0);
        assert!(r.data == chunk(i), "chunk {i} reads back wrong");
    }
    stop.store(true, Ordering::Relaxed);
    assert!(bystander.join().expect("the other export saw an error") >= 4);
    drop(c);
    let log = server.log();
    let faults = log
        .lines()
        .filter(|l| l.contains("No space left on device"))
        .count();
    assert_eq!(faults, 1, "the fault is logged once:\n{log}");
    assert!(
        log.contains("small.cow") && log.contains("offset 0x"),
        "the log names the file and offset:\n{log}"
    );
    server.stop();
    assert_check_clean(&small);
    assert_check_clean(&other);
    for i in 0..flushed + 8 {
        assert!(
            read_image(&small, (i * CHUNK) as u64, CHUNK) == chunk(i),
            "chunk {i} on disk"
        );
    }
}

#[test]
fn a_flush_on_a_full_disk_succeeds_when_its_writes_needed_no_new_space() {
    if !have_root() || !have_tool("mkfs.ext4") || !have_tool("mount") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = SmallFs::new(dir.path(), 32);
    let img = fs.mountpoint.join("disk.cow");
    create_image(&img, 16 << 20);
    let arg = format!("disk={}", img.display());
    let server = Server::start_with(dir.path(), &["--export", &arg]);
    let mut c = RawClient::connect(&server.socket);
    c.go_named("disk").unwrap();
    // Both slots of the first cluster get blocks, and the journal is reserved.
    for round in 1..=2u8 {
        assert_eq!(c.call(CMD_WRITE, 0, 0, 65536, &[round; 65536]).error, 0);
        assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).error, 0);
    }
    // Now the file system is full to the last block.
    let ballast = fs.mountpoint.join("ballast");
    // Most of it at once (which may fail for the last blocks), the rest block by block.
    let _ = Command::new("fallocate")
        .args(["-l", &fs.free_bytes().to_string()])
        .arg(&ballast)
        .stderr(std::process::Stdio::null())
        .status();
    let mut filler = 0u64;
    while fs.free_bytes() > 0 && filler < 4096 {
        let _ = std::fs::write(fs.mountpoint.join(format!("f{filler}")), [0u8; 4096]);
        filler += 1;
    }
    assert_eq!(fs.free_bytes(), 0, "the file system did not fill up");
    // A rewrite of that cluster goes to blocks the file already has (version 1: the cluster's
    // other slot; version 2: the blocks the second flush freed, which stay in the file for
    // reuse, FORMAT-v2.md "Allocation"), and its flush appends a record to the reserved
    // journal: neither needs space.
    assert_eq!(c.call(CMD_WRITE, 0, 0, 65536, &[3; 65536]).error, 0);
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).error, 0, "{}", server.log());
    assert_eq!(c.call(CMD_READ, 0, 0, 65536, &[]).data, vec![3; 65536]);
    // A write that needs more space than the file holds free (version 2 keeps the 64 KiB
    // the last flush freed) gets ENOSPC, and nothing before it is lost.
    assert_eq!(
        c.call(CMD_WRITE, 0, 8 << 20, 1 << 20, &[4; 1 << 20]).error,
        ENOSPC
    );
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).error, 0, "{}", server.log());
    assert_eq!(c.call(CMD_READ, 0, 0, 65536, &[]).data, vec![3; 65536]);
    drop(c);
    drop(server);
    assert_eq!(read_image(&img, 0, 65536), vec![3; 65536]);
    assert_eq!(read_image(&img, 8 << 20, 65536), vec![0; 65536]);
    assert_check_clean(&img);
}

/// Memory storage that models a disk under a page cache: writes land in the cache, a
/// sync makes the cache durable, and a sync that fails (once armed) loses what was not yet
/// durable, though the cache still shows it until it is dropped (`wont_need`), as Linux's
/// does after a writeback error.
struct FailingSync {
    cache: std::sync::Mutex<MemStorage>,
    durable: std::sync::Mutex<Vec<u8>>,
    armed: AtomicBool,
    lost: AtomicBool,
}

impl FailingSync {
    fn cache(&self) -> std::sync::MutexGuard<'_, MemStorage> {
        self.cache.lock().unwrap()
    }
}

impl Storage for FailingSync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.cache().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.cache().write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.lost.store(true, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        *self.durable.lock().unwrap() = self.cache().contents();
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.cache().len()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.cache().punch_hole(offset, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.cache().set_len(len)
    }
    fn wont_need(&self, _offset: u64, _len: u64) {
        if self.lost.swap(false, Ordering::SeqCst) {
            *self.cache() = MemStorage::new(self.durable.lock().unwrap().clone());
        }
    }
}

#[test]
fn a_failed_fdatasync_sends_the_image_back_to_its_last_flush_and_it_takes_writes_again() {
    let mem = MemStorage::new(Vec::new());
    let opts = CreateOptions {
        size: Some(1 << 20),
        cluster_size: 64 * 1024,
        backing: None,
        ..Default::default()
    };
    Image::create_on(&mem, Path::new("fsync.cow"), &opts).unwrap();
    let storage = Arc::new(FailingSync {
        cache: std::sync::Mutex::new(MemStorage::new(mem.contents())),
        durable: std::sync::Mutex::new(mem.contents()),
        armed: AtomicBool::new(false),
        lost: AtomicBool::new(false),
    });
    let dynamic: Arc<dyn Storage> = storage.clone();
    let image = Image::open_storage(dynamic, Path::new("fsync.cow"), false).unwrap();
    image.write_at(&[1; 8192], 0).unwrap();
    image.flush().unwrap();
    image.write_at(&[2; 4096], 0).unwrap();
    image.write_at(&[2; 4096], 65536).unwrap();
    storage.armed.store(true, Ordering::SeqCst);
    let e = image.flush().expect_err("the flush whose fdatasync failed");
    assert_eq!(e.errno(), libc::EIO);
    assert!(
        e.to_string()
            .contains("went back to the last flushed state"),
        "{e}"
    );
    assert_eq!(image.reverts(), 1);
    // The image shows its last flushed state, not the writes the disk lost.
    let mut buf = vec![0u8; 8192];
    image.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![1; 8192]);
    image.read_at(&mut buf[..4096], 65536).unwrap();
    assert_eq!(buf[..4096], [0; 4096]);
    // It takes writes and flushes again, and they are durable.
    image.write_at(&[3; 4096], 131072).unwrap();
    image.flush().unwrap();
    drop(image);
    let durable = storage.durable.lock().unwrap().clone();
    let reopened = Image::open_storage(
        Arc::new(MemStorage::new(durable)),
        Path::new("fsync.cow"),
        true,
    )
    .unwrap();
    reopened.read_at(&mut buf[..4096], 131072).unwrap();
    assert_eq!(buf[..4096], [3; 4096]);
    reopened.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![1; 8192], "the flush before the failure survived");
}
