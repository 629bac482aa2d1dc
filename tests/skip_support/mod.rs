//! Skipping an end-to-end test that cannot run here: under CI it fails instead, and
//! elsewhere the skip is recorded for the test command's summary.
use std::io::Write;

/// Fails the test under CI (CI=true must exercise everything); elsewhere prints why it is
/// skipped and records it, and the caller returns.
pub fn skip_or_fail(reason: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{reason} (required when CI is set)");
    }
    eprintln!("SKIPPED: {reason}");
    record_skip(reason);
}

/// Appends "test name: reason" to the file `COWIMG_SKIP_LOG` names, so the test command can
/// list skipped tests in its summary (libtest hides a passing test's output).
pub fn record_skip(reason: &str) {
    let Some(path) = std::env::var_os("COWIMG_SKIP_LOG") else {
        return;
    };
    let test = std::thread::current()
        .name()
        .unwrap_or("unknown test")
        .to_string();
    // The suite: the test binary's name without cargo's hash.
    let suite = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|s| {
            s.rsplit_once('-')
                .map_or(s.clone(), |(name, _)| name.to_string())
        })
        .unwrap_or_default();
    let line = format!("{suite}::{test}: {reason}\n");
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
}
