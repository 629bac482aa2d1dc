//! Wrong flags and bad input: one clear line on stderr naming the file, a non-zero exit,
//! never a panic; `check`'s exit codes; the lock between writers.
mod cli_support;
use cli_support::*;
use std::path::Path;

fn assert_one_line(run: &Run) {
    assert_eq!(run.stderr.lines().count(), 1, "{:?}", run.stderr);
}

#[test]
fn a_missing_file_fails_with_its_name_for_every_command() {
    let dir = tempdir();
    let d = dir.path();
    for args in [
        &["info", "nope.cow"][..],
        &["info", "--backing-chain", "nope.cow"],
        &["map", "nope.cow"],
        &["io", "nope.cow", "-c", "read 0 1"],
        &["check", "nope.cow"],
        &["commit", "nope.cow"],
        &["rebase", "-b", "", "nope.cow"],
        &["rebase", "-u", "-b", "", "nope.cow"],
        &["convert", "nope.cow", "out.raw"],
        &["resize", "nope.cow", "2M"],
        &["measure", "nope.cow"],
        &["serve", "--socket", "s.sock", "nope.cow"],
    ] {
        let run = cowimg_in(d, args);
        assert_fails(&run, 1, &["nope.cow", "No such file or directory"]);
        assert_one_line(&run);
        assert!(run.stderr.starts_with("cowimg: "), "{}", run.stderr);
    }
    // compare's 1 means "different", so its errors exit 2, as qemu-img compare's do.
    let run = cowimg_in(d, &["compare", "nope.cow", "nope.cow"]);
    assert_fails(&run, 2, &["nope.cow", "No such file or directory"]);
    assert_one_line(&run);
}

#[test]
fn bad_sizes_and_cluster_sizes_are_refused_before_anything_is_created() {
    let dir = tempdir();
    let d = dir.path();
    let run = cowimg_in(d, &["create", "-s", "12Q", "img.cow"]);
    assert_fails(&run, 1, &["invalid size '12Q'"]);
    let run = cowimg_in(d, &["create", "img.cow", "1.2.3"]);
    assert_fails(&run, 1, &["invalid size '1.2.3'"]);
    let run = cowimg_in(d, &["create", "-c", "3K", "-s", "1M", "img.cow"]);
    assert_fails(&run, 1, &["invalid cluster size '3K'", "power of two"]);
    let run = cowimg_in(d, &["create", "-c", "4M", "-s", "1M", "img.cow"]);
    assert_fails(&run, 1, &["power of two from 4K to 2M"]);
    let run = cowimg_in(d, &["create", "-s", "2E", "img.cow"]);
    assert_fails(&run, 1, &["img.cow", "exceeds the maximum"]);
    assert!(!d.join("img.cow").exists());
}

#[test]
fn unknown_flags_and_formats_exit_1_not_clap_s_2() {
    let dir = tempdir();
    let d = dir.path();
    let run = cowimg_in(d, &["info", "--bogus", "x.cow"]);
    assert_fails(&run, 1, &["--bogus"]);
    let run = cowimg_in(d, &["frobnicate"]);
    assert_fails(&run, 1, &["frobnicate"]);
    let run = cowimg_in(d, &["create", "-b", "x", "-F", "vmdk", "y.cow"]);
    assert_fails(&run, 1, &["unknown format 'vmdk'"]);
    let run = cowimg_in(d, &["convert", "-O", "vmdk", "x", "y"]);
    assert_fails(&run, 1, &["unknown output format 'vmdk'"]);
    let run = cowimg_in(d, &["io", "-U", "x.cow", "-c", "read 0 1"]);
    assert_fails(&run, 1, &["-U (force share) needs -r"]);
}

#[test]
fn every_command_has_help() {
    let dir = tempdir();
    for command in [
        "create", "io", "info", "map", "check", "commit", "rebase", "convert", "serve", "compare",
        "measure", "resize",
    ] {
        let out = cowimg_in(dir.path(), &[command, "--help"]).ok();
        assert!(out.contains("Usage: cowimg"), "{command}: {out}");
    }
}

/// Another `cowimg io` process that holds the image open (a writer, or a reader with
/// `-r`) until its stdin is closed. The lock is held by another process rather than by this
/// one, where the file descriptor could leak into children that other tests are spawning
/// at the same moment and keep the lock after it is dropped.
struct Holder {
    child: std::process::Child,
    /// Kept open: a holder whose stdout closes stops at its next line of output.
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Holder {
    /// Starts the holder and returns once it has answered a read: from then on it has the
    /// image open, with its lock. (Polling with writers instead raced: a probe that won
    /// the lock first made the holder fail and exit.)
    fn start(d: &Path, extra: &[&str]) -> Holder {
        use std::io::{BufRead, BufReader, Write};
        use std::process::{Command, Stdio};
        let mut args = vec!["io"];
        args.extend(extra);
        args.push("img.cow");
        let mut child = Command::new(env!("CARGO_BIN_EXE_cowimg"))
            .args(&args)
            .current_dir(d)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning the lock holder");
        child
            .stdin
            .as_mut()
            .expect("stdin")
            .write_all(b"read 0 1\n")
            .expect("asking the lock holder to read");
        let mut answer = String::new();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        stdout
            .read_line(&mut answer)
            .expect("reading the lock holder's answer");
        assert!(
            answer.starts_with("read 1/1 bytes"),
            "the lock holder did not open the image: {answer:?}"
        );
        Holder {
            child,
            _stdout: stdout,
        }
    }

    fn finish(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().expect("waiting for the lock holder");
        assert!(status.success(), "the lock holder failed: {status}");
    }
}

/// A writer that the holder's lock refuses.
fn refused_writer(d: &Path) -> Run {
    // A flush opens the image for writing but changes no data.
    cowimg_io(d, "img.cow", &["flush"])
}

#[test]
fn a_second_writer_is_refused_while_the_first_holds_the_lock() {
    let dir = tempdir();
    let d = dir.path();
    cowimg_in(d, &["create", "-s", "1M", "img.cow"]).ok();
    let writer = Holder::start(d, &[]);

    let run = refused_writer(d);
    assert_fails(&run, 1, &["img.cow", "could not get a write lock"]);
    assert_one_line(&run);
    // A reader needs the shared lock too; -U skips it.
    assert_fails(
        &cowimg_in(d, &["info", "img.cow"]),
        1,
        &["img.cow", "shared lock"],
    );
    assert_fails(
        &cowimg_in(d, &["map", "img.cow"]),
        1,
        &["img.cow", "shared lock"],
    );
    cowimg_in(d, &["info", "-U", "img.cow"]).ok();
    cowimg_in(d, &["map", "-U", "img.cow"]).ok();
    cowimg_in(d, &["io", "-r", "-U", "img.cow", "-c", "read -P 0 0 4k"]).ok();

    writer.finish();
    cowimg_io(d, "img.cow", &["write 0 4k"]).ok();
}

#[test]
fn the_image_in_use_error_names_the_flag_the_command_really_has() {
    let dir = tempdir();
    let d = dir.path();
    cowimg_in(d, &["create", "-s", "1M", "img.cow"]).ok();
    let writer = Holder::start(d, &[]);
    for command in [
        vec!["info", "img.cow"],
        vec!["map", "img.cow"],
        vec!["check", "img.cow"],
        vec!["measure", "img.cow"],
        vec!["compare", "img.cow", "img.cow"],
        vec!["convert", "-O", "raw", "img.cow", "out.raw"],
    ] {
        let run = cowimg_in(d, &command);
        assert!(
            run.stderr.contains("use -U (--force-share)"),
            "{command:?}: {}",
            run.stderr
        );
    }
    for command in [
        vec!["resize", "img.cow", "2M"],
        vec!["commit", "img.cow"],
        vec!["rebase", "-u", "-b", "", "img.cow"],
        vec!["check", "-r", "img.cow"],
    ] {
        let run = cowimg_in(d, &command);
        assert_fails(&run, 1, &["img.cow", "in use"]);
        assert!(
            !run.stderr.contains("force-share"),
            "{command:?}: {}",
            run.stderr
        );
    }
    let run = refused_writer(d);
    assert_fails(&run, 1, &["-r -U"]);
    writer.finish();
}

#[test]
fn a_reader_blocks_writers_but_not_other_readers() {
    let dir = tempdir();
    let d = dir.path();
    cowimg_in(d, &["create", "-s", "1M", "img.cow"]).ok();
    let reader = Holder::start(d, &["-r"]);
    let run = refused_writer(d);
    assert_fails(&run, 1, &["img.cow", "lock"]);
    cowimg_in(d, &["io", "-r", "img.cow", "-c", "read 0 1"]).ok();
    cowimg_in(d, &["info", "img.cow"]).ok();
    reader.finish();
    cowimg_io(d, "img.cow", &["write 0 1"]).ok();
}

fn check(d: &Path, args: &[&str]) -> Run {
    let mut all = vec!["check"];
    all.extend(args);
    cowimg_in(d, &all)
}

#[test]
fn check_exits_0_when_clean_and_3_for_leaks_until_repaired() {
    let dir = tempdir();
    let d = dir.path();
    cowimg_in(d, &["create", "-s", "4M", "img.cow"]).ok();
    cowimg_io(
        d,
        "img.cow",
        &["write -P 1 0 256K", "flush", "write -P 2 0 64K"],
    )
    .ok();
    let run = check(d, &["img.cow"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout
            .starts_with("No errors were found on the image.\n"),
        "{}",
        run.stdout
    );

    // Two cluster-sized blocks of bytes past the end that nothing references (written in
    // place: rewriting the whole file would fill its holes and leak those clusters too).
    let path = d.join("img.cow");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("opening");
    let end = file.metadata().expect("stat").len().next_multiple_of(65536);
    std::os::unix::fs::FileExt::write_all_at(&file, &random_bytes(2 * 65536, 3), end)
        .expect("appending");
    drop(file);
    let before = contents(d, "img.cow");

    let run = check(d, &["img.cow"]);
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert!(run.stdout.contains("2 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data."), "{}", run.stdout);
    let report = json(&check(d, &["--json", "img.cow"]).stdout);
    assert_eq!(report["leaks"], 2);
    assert_eq!(report["corruptions"], 0);

    let run = check(d, &["--repair", "img.cow"]);
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert!(run.stdout.contains("2 leaked clusters"), "{}", run.stdout);
    assert_eq!(check(d, &["img.cow"]).code, Some(0));
    assert_same_bytes(&contents(d, "img.cow"), &before, "repair changes no data");
}

#[test]
fn check_exits_2_when_both_header_slots_are_damaged_and_1_when_the_file_is_missing() {
    let dir = tempdir();
    let d = dir.path();
    cowimg_in(d, &["create", "-s", "4M", "img.cow"]).ok();
    // A write, a flush and a reopen or two until both slots have been written.
    for _ in 0..3 {
        cowimg_io(d, "img.cow", &["write 0 4k"]).ok();
    }
    let path = d.join("img.cow");
    let mut bytes = read_file(&path);
    bytes[100] ^= 0xff;
    bytes[4096 + 100] ^= 0xff;
    write_file(&path, &bytes);

    let run = check(d, &["img.cow"]);
    assert_eq!(run.code, Some(2), "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("ERROR img.cow"), "{}", run.stdout);
    assert!(
        run.stdout.contains("1 errors were found on the image."),
        "{}",
        run.stdout
    );
    let report = json(&check(d, &["--json", "img.cow"]).stdout);
    assert_eq!(report["corruptions"], 1);

    // Opening it for anything else fails with the file and offset named.
    let run = cowimg_in(d, &["info", "img.cow"]);
    assert_fails(&run, 1, &["img.cow", "offset"]);
    assert_one_line(&run);

    assert_fails(&check(d, &["gone.cow"]), 1, &["gone.cow"]);
}

#[test]
fn a_truncated_image_is_an_error_not_a_panic() {
    let dir = tempdir();
    let d = dir.path();
    cowimg_in(d, &["create", "-s", "4M", "img.cow"]).ok();
    cowimg_io(d, "img.cow", &["write 0 1M"]).ok();
    let path = d.join("img.cow");
    let len = std::fs::metadata(&path).expect("stat").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncating");
    for args in [
        &["info", "img.cow"][..],
        &["map", "img.cow"],
        &["io", "img.cow", "-c", "read 0 1M"],
    ] {
        let run = cowimg_in(d, args);
        assert_fails(&run, 1, &["img.cow"]);
    }
    assert_eq!(check(d, &["img.cow"]).code, Some(2));
    // The magic, then garbage.
    let mut junk = random_bytes(10000, 4);
    junk[..8].copy_from_slice(b"\x89COWIMG\n");
    write_file(&d.join("junk.cow"), &junk);
    assert_fails(
        &cowimg_in(d, &["info", "junk.cow"]),
        1,
        &["junk.cow", "offset"],
    );
}
