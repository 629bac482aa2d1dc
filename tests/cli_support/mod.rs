//! Helpers shared by the `cli_*` tests: running the binary, the qemu tools, and files.
#![allow(dead_code)] // each test binary uses a different part
#[path = "../skip_support/mod.rs"]
mod skip_support;
pub use skip_support::skip_or_fail;

use rand::{RngCore, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The output of one run, with the exit status and both streams as text.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(what: String, output: Output) -> Run {
        let run = Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        eprintln!("$ {what}\n-> {:?}\n{}{}", run.code, run.stdout, run.stderr);
        run
    }

    /// Asserts exit status 0 and returns stdout.
    pub fn ok(self) -> String {
        assert_eq!(self.code, Some(0), "command failed: {}", self.stderr);
        self.stdout
    }
}

/// A failing run: the exit code, and stderr that contains every `needle` and no panic.
#[track_caller]
pub fn assert_fails(run: &Run, code: i32, needles: &[&str]) {
    assert_eq!(run.code, Some(code), "stderr: {}", run.stderr);
    for needle in needles {
        assert!(
            run.stderr.contains(needle),
            "no {needle:?} in {:?}",
            run.stderr
        );
    }
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

/// Runs `cowimg ARGS` in `dir`.
pub fn cowimg_in(dir: &Path, args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_cowimg"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("spawning cowimg");
    Run::from(format!("cowimg {}", args.join(" ")), output)
}

/// Runs a qemu tool (qemu-io, qemu-img) in `dir`.
pub fn qemu_in(dir: &Path, tool: &str, args: &[&str]) -> Run {
    let output = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("spawning {tool}: {e}"));
    Run::from(format!("{tool} {}", args.join(" ")), output)
}

/// Whether `tool` can run. When it cannot, the test fails under CI (CI=true must exercise
/// everything) and is skipped with the reason printed otherwise.
pub fn have_tool(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        skip_or_fail(&format!("{tool} is not installed"));
    }
    found
}

/// `-c CMD` pairs for a list of qemu-io commands.
pub fn io_args<'a>(image: &'a str, commands: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["io", image];
    for c in commands {
        args.extend(["-c", c]);
    }
    args
}

/// Runs the commands through `cowimg io IMAGE`.
pub fn cowimg_io(dir: &Path, image: &str, commands: &[&str]) -> Run {
    cowimg_in(dir, &io_args(image, commands))
}

/// Runs the same commands through `qemu-io -f raw` on a raw reference file. cowimg's
/// discard promises zeros (a discarded range reads as zeros), while qemu's raw driver may
/// ignore a discard or keep unaligned edges; the reference therefore gets the zero write
/// that states cowimg's guarantee.
pub fn qemu_io_raw(dir: &Path, reference: &str, commands: &[&str]) -> Run {
    let translated: Vec<String> = commands
        .iter()
        .map(|c| match c.split_once(' ') {
            Some(("discard" | "trim", rest)) => format!("write -z {rest}"),
            _ => c.to_string(),
        })
        .collect();
    let mut args = vec!["-f", "raw", reference];
    for c in &translated {
        args.extend(["-c", c.as_str()]);
    }
    qemu_in(dir, "qemu-io", &args)
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("creating a temporary directory")
}

pub fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

pub fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The merged contents of `image` (any chain), via `cowimg convert -O raw`.
pub fn contents(dir: &Path, image: &str) -> Vec<u8> {
    let out: PathBuf = dir.join(format!("{image}.contents.raw"));
    let _ = std::fs::remove_file(&out);
    cowimg_in(
        dir,
        &[
            "convert",
            "-O",
            "raw",
            image,
            out.to_str().expect("utf-8 path"),
        ],
    )
    .ok();
    let bytes = read_file(&out);
    std::fs::remove_file(&out).expect("removing the converted copy");
    bytes
}

/// Asserts two images' bytes are equal, naming the first differing offset (a plain
/// `assert_eq!` on megabytes prints nothing useful).
pub fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at offset {i:#x}: got {:#04x}, expected {:#04x}",
            actual[i], expected[i]
        );
    }
}

/// Parses JSON output.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}
