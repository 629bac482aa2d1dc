//! End to end: an ext4 base image, a cowimg overlay on it served over NBD, attached as a
//! block device with nbdfuse + losetup, and a directory on that device used as the
//! upperdir of an overlayfs mount. The writes overlayfs makes (copy-ups, whiteouts,
//! renames) must survive a restart of the server and, after `cowimg commit`, be in the
//! base image itself. Needs root, nbdfuse, losetup, mkfs.ext4 and overlayfs.
mod nbd_support;

use nbd_support::*;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn sh(cmd: &mut Command) -> String {
    run(cmd)
}

/// Everything mounted or attached, undone in reverse order on drop, even when the test
/// fails half way.
#[derive(Default)]
struct Cleanup {
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
    fuse: Vec<(PathBuf, Child)>,
}

impl Cleanup {
    fn unmount(&mut self, path: &Path) {
        sh(Command::new("umount").arg(path));
        self.mounts.retain(|m| m != path);
    }

    fn detach(&mut self, dev: &str) {
        sh(Command::new("losetup").arg("-d").arg(dev));
        self.loops.retain(|l| l != dev);
    }

    /// Unmounts the nbdfuse mount and waits for nbdfuse to exit.
    fn stop_fuse(&mut self) {
        while let Some((dir, mut child)) = self.fuse.pop() {
            let _ = Command::new("umount").arg(&dir).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for m in self.mounts.drain(..).rev() {
            if Command::new("umount")
                .arg(&m)
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
            {
                let _ = Command::new("umount").arg("-l").arg(&m).status();
            }
        }
        for l in self.loops.drain(..).rev() {
            let _ = Command::new("losetup").arg("-d").arg(&l).status();
        }
        self.stop_fuse();
    }
}

/// Serves `image`, attaches it with nbdfuse and losetup, mounts the ext4 on it at
/// `dev_mnt`. Returns the server and the loop device.
fn attach(dir: &Path, image: &Path, dev_mnt: &Path, c: &mut Cleanup) -> (Server, String) {
    let server = Server::start(dir, image, &[]);
    let fuse_dir = dir.join("fuse");
    fs::create_dir_all(&fuse_dir).unwrap();
    let pidfile = dir.join("nbdfuse.pid");
    let _ = fs::remove_file(&pidfile);
    let child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(fuse_dir.join("disk"))
        .arg("--unix")
        .arg(&server.socket)
        .stdin(Stdio::null())
        .spawn()
        .expect("start nbdfuse");
    c.fuse.push((fuse_dir.clone(), child));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pidfile.exists() {
        assert!(
            Instant::now() < deadline,
            "nbdfuse did not start; server log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dev = sh(Command::new("losetup")
        .args(["-f", "--show"])
        .arg(fuse_dir.join("disk")))
    .trim()
    .to_string();
    c.loops.push(dev.clone());
    fs::create_dir_all(dev_mnt).unwrap();
    sh(Command::new("mount").arg(&dev).arg(dev_mnt));
    c.mounts.push(dev_mnt.to_path_buf());
    (server, dev)
}

fn detach(mut server: Server, dev: &str, dev_mnt: &Path, c: &mut Cleanup) {
    sh(&mut Command::new("sync"));
    c.unmount(dev_mnt);
    c.detach(dev);
    c.stop_fuse();
    server.stop();
}

/// Mounts overlayfs with its upper and work directories on `dev_mnt`. When that file system
/// is read-only, the upper directory becomes the top lower layer instead (its whiteouts
/// still hide what they deleted).
fn mount_overlay(lower: &Path, dev_mnt: &Path, merged: &Path, read_only: bool, c: &mut Cleanup) {
    fs::create_dir_all(merged).unwrap();
    let upper = dev_mnt.join("upper");
    let opts = if read_only {
        format!("lowerdir={}:{}", upper.display(), lower.display())
    } else {
        format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            dev_mnt.join("work").display()
        )
    };
    sh(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(merged));
    c.mounts.push(merged.to_path_buf());
}

fn is_whiteout(p: &Path) -> bool {
    fs::symlink_metadata(p)
        .map(|m| m.file_type().is_char_device() && m.rdev() == 0)
        .unwrap_or(false)
}

/// What the merged view must show after the changes.
fn assert_merged_view(merged: &Path) {
    assert_eq!(
        fs::read_to_string(merged.join("new.txt")).unwrap(),
        "created through overlayfs\n"
    );
    assert_eq!(
        fs::read_to_string(merged.join("a.txt")).unwrap(),
        "lower a\nappended through overlayfs\n"
    );
    assert!(!merged.join("b.txt").exists(), "renamed-away file is back");
    assert_eq!(
        fs::read_to_string(merged.join("b-renamed.txt")).unwrap(),
        "lower b\n"
    );
    assert!(!merged.join("dir/c.txt").exists(), "deleted file is back");
    assert_eq!(
        fs::read_to_string(merged.join("dir/d.txt")).unwrap(),
        "lower d\n"
    );
    assert_eq!(
        fs::read(merged.join("newdir/big.bin")).unwrap(),
        pattern(3 << 20, 0, 7)
    );
    assert_eq!(
        fs::read_to_string(merged.join("from-base.txt")).unwrap(),
        "upper file from the base image\n"
    );
}

/// What the upper directory itself must hold: copy-ups, new files and whiteouts.
fn assert_upper_dir(upper: &Path) {
    assert!(upper.join("new.txt").is_file());
    assert!(upper.join("a.txt").is_file(), "a.txt was not copied up");
    assert!(is_whiteout(&upper.join("b.txt")), "no whiteout for b.txt");
    assert!(
        is_whiteout(&upper.join("dir/c.txt")),
        "no whiteout for dir/c.txt"
    );
    assert!(upper.join("b-renamed.txt").is_file());
}

#[test]
fn overlayfs_upperdir_on_a_served_overlay_survives_restart_and_commit() {
    if !have_root() || !have_tool("nbdfuse") || !have_tool("losetup") || !have_tool("mkfs.ext4") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut c = Cleanup::default();

    // The base: ext4 with an upper directory that already holds a file, and a work dir.
    let base = dir.join("base.raw");
    fs::File::create(&base).unwrap().set_len(64 << 20).unwrap();
    sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&base));
    let base_mnt = dir.join("base-mnt");
    fs::create_dir_all(&base_mnt).unwrap();
    sh(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&base)
        .arg(&base_mnt));
    c.mounts.push(base_mnt.clone());
    fs::create_dir_all(base_mnt.join("upper")).unwrap();
    fs::create_dir_all(base_mnt.join("work")).unwrap();
    fs::write(
        base_mnt.join("upper/from-base.txt"),
        "upper file from the base image\n",
    )
    .unwrap();
    fs::write(base_mnt.join("notes.txt"), "base notes\n").unwrap();
    c.unmount(&base_mnt);
    // losetup -d happens on umount of a mount -o loop; nothing else to detach.

    // The lower directory overlayfs merges with the upper one.
    let lower = dir.join("lower");
    fs::create_dir_all(lower.join("dir")).unwrap();
    fs::write(lower.join("a.txt"), "lower a\n").unwrap();
    fs::write(lower.join("b.txt"), "lower b\n").unwrap();
    fs::write(lower.join("dir/c.txt"), "lower c\n").unwrap();
    fs::write(lower.join("dir/d.txt"), "lower d\n").unwrap();

    let overlay = dir.join("overlay.cow");
    create_overlay(&overlay, &base, cowimg::format::BackingFormat::Raw);
    let dev_mnt = dir.join("dev-mnt");
    let merged = dir.join("merged");

    // First session: change things through the merged mount.
    let (server, dev) = attach(dir, &overlay, &dev_mnt, &mut c);
    assert_eq!(
        fs::read_to_string(dev_mnt.join("notes.txt")).unwrap(),
        "base notes\n"
    );
    mount_overlay(&lower, &dev_mnt, &merged, false, &mut c);
    fs::write(merged.join("new.txt"), "created through overlayfs\n").unwrap();
    let mut a = fs::read_to_string(merged.join("a.txt")).unwrap();
    a.push_str("appended through overlayfs\n");
    fs::write(merged.join("a.txt"), a).unwrap();
    fs::rename(merged.join("b.txt"), merged.join("b-renamed.txt")).unwrap();
    fs::remove_file(merged.join("dir/c.txt")).unwrap();
    fs::create_dir(merged.join("newdir")).unwrap();
    fs::write(merged.join("newdir/big.bin"), pattern(3 << 20, 0, 7)).unwrap();
    assert_merged_view(&merged);
    c.unmount(&merged);
    assert_upper_dir(&dev_mnt.join("upper"));
    detach(server, &dev, &dev_mnt, &mut c);
    assert_check_clean(&overlay);
    // Nothing reached the base yet.
    let untouched = dir.join("base-check");
    fs::create_dir_all(&untouched).unwrap();
    sh(Command::new("mount")
        .args(["-o", "loop,ro"])
        .arg(&base)
        .arg(&untouched));
    c.mounts.push(untouched.clone());
    assert!(
        !untouched.join("upper/new.txt").exists(),
        "the base changed before commit"
    );
    c.unmount(&untouched);

    // Second session: everything is still there.
    let (server, dev) = attach(dir, &overlay, &dev_mnt, &mut c);
    mount_overlay(&lower, &dev_mnt, &merged, false, &mut c);
    assert_merged_view(&merged);
    c.unmount(&merged);
    assert_upper_dir(&dev_mnt.join("upper"));
    detach(server, &dev, &dev_mnt, &mut c);

    // Commit, then the base image alone holds the changes.
    sh(Command::new(env!("CARGO_BIN_EXE_cowimg"))
        .arg("commit")
        .arg(&overlay));
    let committed = dir.join("committed");
    fs::create_dir_all(&committed).unwrap();
    sh(Command::new("mount")
        .args(["-o", "loop,ro"])
        .arg(&base)
        .arg(&committed));
    c.mounts.push(committed.clone());
    assert_upper_dir(&committed.join("upper"));
    assert_eq!(
        fs::read_to_string(committed.join("notes.txt")).unwrap(),
        "base notes\n"
    );
    mount_overlay(&lower, &committed, &merged, true, &mut c);
    assert_merged_view(&merged);
    c.unmount(&merged);
    c.unmount(&committed);
    sh(Command::new("e2fsck").args(["-f", "-n"]).arg(&base));
}
