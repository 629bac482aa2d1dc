//! The CLI's side of FORMAT.md, "Opening": backing chains that loop, files that are not
//! regular files, and block devices as raw backing files.
mod cli_support;

use cli_support::{assert_fails, cowimg_in, random_bytes, read_file, tempdir, write_file, Run};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Far more than these commands need; far less than the unbounded ones took (a minute, or
/// forever for a FIFO).
const BOUND: Duration = Duration::from_secs(5);

/// Runs `cowimg ARGS` in `dir`, killing it when it outlives `BOUND`.
fn cowimg_bounded(dir: &Path, args: &[&str]) -> Run {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cowimg"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning cowimg");
    loop {
        if child.try_wait().expect("waiting").is_some() {
            break;
        }
        if start.elapsed() > BOUND {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cowimg {} still running after {BOUND:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("collecting output");
    let run = Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    eprintln!(
        "$ cowimg {} ({:?})\n-> {:?}\n{}{}",
        args.join(" "),
        start.elapsed(),
        run.code,
        run.stdout,
        run.stderr
    );
    run
}

#[test]
fn a_backing_chain_loop_made_through_the_cli_is_refused_quickly_naming_it() {
    let dir = tempdir();
    // With -u, create does not open the backing file, so a loop can be made.
    cowimg_in(
        dir.path(),
        &[
            "create", "-u", "-s", "1M", "-b", "b.cow", "-F", "cowimg", "a.cow",
        ],
    )
    .ok();
    cowimg_in(
        dir.path(),
        &[
            "create", "-u", "-s", "1M", "-b", "a.cow", "-F", "cowimg", "b.cow",
        ],
    )
    .ok();
    let run = cowimg_bounded(dir.path(), &["info", "--backing-chain", "a.cow"]);
    assert_fails(&run, 1, &["backing chain loops: a.cow -> b.cow -> a.cow"]);
    let run = cowimg_bounded(dir.path(), &["convert", "-O", "raw", "a.cow", "out.raw"]);
    assert_fails(&run, 1, &["backing chain loops: a.cow -> b.cow -> a.cow"]);
    let run = cowimg_bounded(dir.path(), &["map", "b.cow"]);
    assert_fails(&run, 1, &["backing chain loops: b.cow -> a.cow -> b.cow"]);
    // Without the chain, info still shows the image.
    cowimg_bounded(dir.path(), &["info", "a.cow"]).ok();

    // rebase refuses to make a loop: c -> d, then d -> c.
    cowimg_in(dir.path(), &["create", "-s", "1M", "d.cow"]).ok();
    cowimg_in(
        dir.path(),
        &["create", "-b", "d.cow", "-F", "cowimg", "c.cow"],
    )
    .ok();
    let run = cowimg_bounded(
        dir.path(),
        &["rebase", "-u", "-b", "c.cow", "-F", "cowimg", "d.cow"],
    );
    assert_fails(&run, 1, &["backing chain loops: d.cow -> c.cow -> d.cow"]);
    cowimg_bounded(dir.path(), &["info", "--backing-chain", "c.cow"]).ok();
}

#[test]
fn a_fifo_given_to_the_cli_is_refused_without_blocking() {
    let dir = tempdir();
    nix::unistd::mkfifo(
        &dir.path().join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .expect("mkfifo");
    let needle = "fifo: not a regular file or block device";
    for args in [
        &["info", "fifo"][..],
        &["convert", "-O", "raw", "fifo", "out.raw"],
        &["convert", "-f", "raw", "-O", "raw", "fifo", "out.raw"],
        &["create", "-b", "fifo", "-F", "raw", "top.cow"],
        &["check", "fifo"],
        &["serve", "--socket", "nbd.sock", "fifo"],
    ] {
        let run = cowimg_bounded(dir.path(), args);
        assert_ne!(run.code, Some(0), "{args:?} succeeded");
        assert!(run.stderr.contains(needle), "{args:?}: {}", run.stderr);
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    }
    // An overlay made with -u over the FIFO is refused when it is opened.
    cowimg_in(
        dir.path(),
        &[
            "create", "-u", "-s", "1M", "-b", "fifo", "-F", "raw", "over.cow",
        ],
    )
    .ok();
    let run = cowimg_bounded(dir.path(), &["convert", "-O", "raw", "over.cow", "o.raw"]);
    assert_fails(&run, 1, &[needle]);
}

/// A loop device attached for the test's duration.
struct LoopDevice(String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Attaches `file` to a free loop device, or says why it cannot (the test is then skipped,
/// except under CI, where it must run).
fn attach_loop(file: &Path) -> Option<LoopDevice> {
    let reason = if
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() } != 0 {
        "not root".to_string()
    } else {
        match Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
        {
            Ok(o) if o.status.success() => {
                let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
                return Some(LoopDevice(dev));
            }
            Ok(o) => format!("losetup failed: {}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => format!("losetup could not run: {e}"),
        }
    };
    cli_support::skip_or_fail(&format!("a loop device is needed: {reason}"));
    None
}

#[test]
fn a_loop_device_as_raw_backing_file_has_its_size_and_its_data() {
    let dir = tempdir();
    let size = 4usize << 20;
    let data = random_bytes(size, 7);
    let backing = dir.path().join("disk.img");
    write_file(&backing, &data);
    let Some(dev) = attach_loop(&backing) else {
        return;
    };
    let out = cowimg_in(
        dir.path(),
        &["create", "-b", &dev.0, "-F", "raw", "top.cow"],
    )
    .ok();
    assert!(out.contains(&format!("size={size}")), "{out}");
    let info = cowimg_in(dir.path(), &["info", "--backing-chain", "top.cow"]).ok();
    assert_eq!(
        info.matches(&format!("({size} bytes)")).count(),
        2,
        "both layers have the device's size: {info}"
    );
    let info = cowimg_in(dir.path(), &["info", &dev.0]).ok();
    assert!(info.contains(&format!("({size} bytes)")), "{info}");
    // Reads through the overlay return the device's data...
    cowimg_in(dir.path(), &["convert", "-O", "raw", "top.cow", "out.raw"]).ok();
    cli_support::assert_same_bytes(&read_file(&dir.path().join("out.raw")), &data, "overlay");
    // ... and so does the device as a source of its own.
    cowimg_in(dir.path(), &["convert", "-O", "raw", &dev.0, "dev.raw"]).ok();
    cli_support::assert_same_bytes(&read_file(&dir.path().join("dev.raw")), &data, "device");
    // The device is data from end to end (not an error, not a hole).
    let map = cowimg_in(dir.path(), &["map", "--json", "top.cow"]).ok();
    let extents = cli_support::json(&map);
    let extents = extents.as_array().expect("an array");
    assert!(
        extents.iter().all(|e| e["data"] == true),
        "the device is not all data: {map}"
    );
    let covered: u64 = extents
        .iter()
        .map(|e| e["length"].as_u64().expect("length"))
        .sum();
    assert_eq!(covered, size as u64, "{map}");
    // A commit writes into the device: data, and zeros (written, not punched).
    cli_support::cowimg_io(
        dir.path(),
        "top.cow",
        &["write -P 0x5a 0 64K", "write -z 1M 64K"],
    )
    .ok();
    cowimg_in(dir.path(), &["commit", "top.cow"]).ok();
    let mut expected = data.clone();
    expected[..64 << 10].fill(0x5a);
    expected[1 << 20..(1 << 20) + (64 << 10)].fill(0);
    let _ = std::fs::remove_file(dir.path().join("dev.raw"));
    cowimg_in(dir.path(), &["convert", "-O", "raw", &dev.0, "dev.raw"]).ok();
    cli_support::assert_same_bytes(
        &read_file(&dir.path().join("dev.raw")),
        &expected,
        "device after commit",
    );
}
