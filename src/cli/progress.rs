//! The `-p` progress of the long operations (commit, convert, rebase, compare, check).
//!
//! On a terminal (stderr), an indicatif bar. Otherwise qemu-img's own format on stdout, so
//! that scripts and logs that parse `qemu-img -p` read cowimg the same: `    (12.34/100%)`
//! followed by `\r`, printed whenever the figure advanced by a whole percent, and a final
//! `    (100.00/100%)\r` and newline when the operation ends.
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};

pub struct Progress {
    mode: Mode,
}

enum Mode {
    Hidden,
    Bar(ProgressBar),
    /// The percentage (in hundredths) printed last.
    Lines {
        printed: Option<u64>,
    },
}

impl Progress {
    /// A progress display when `shown` (`-p` without `-q`), nothing otherwise.
    pub fn new(shown: bool) -> Progress {
        let mode = if !shown {
            Mode::Hidden
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(0);
            let style = ProgressStyle::with_template(
                "{bar:40} {percent:>3}% {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            Mode::Bar(bar)
        } else {
            Mode::Lines { printed: None }
        };
        Progress { mode }
    }

    /// The callback the library operations take: (bytes done, bytes total).
    pub fn update(&mut self, done: u64, total: u64) {
        match &mut self.mode {
            Mode::Hidden => {}
            Mode::Bar(bar) => {
                bar.set_length(total);
                bar.set_position(done);
            }
            Mode::Lines { printed } => {
                let now = hundredths(done, total);
                // qemu-img prints when the figure moved by at least one percent.
                if printed.is_none_or(|last| now >= last + 100) {
                    *printed = Some(now);
                    print_line(now);
                }
            }
        }
    }

    pub fn finish(self) {
        match self.mode {
            Mode::Hidden => {}
            Mode::Bar(bar) => bar.finish(),
            Mode::Lines { .. } => {
                print_line(10_000);
                let mut out = std::io::stdout().lock();
                // Progress is best effort: a closed stdout must not fail the operation.
                let _ = out.write_all(b"\n").and_then(|()| out.flush());
            }
        }
    }
}

/// `done / total` in hundredths of a percent, rounded as printf's `%.2f` rounds; an empty
/// operation is complete.
fn hundredths(done: u64, total: u64) -> u64 {
    if total == 0 {
        return 10_000;
    }
    let total = u128::from(total);
    ((u128::from(done).min(total) * 20_000 + total) / (2 * total)) as u64
}

/// qemu-img's line: `printf("    (%3.2f/100%%)\r", ...)`.
fn print_line(hundredths: u64) {
    let mut out = std::io::stdout().lock();
    let line = format!("    ({}.{:02}/100%)\r", hundredths / 100, hundredths % 100);
    let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
}

#[cfg(test)]
mod tests {
    use super::hundredths;

    #[test]
    fn percentages_are_rounded_to_hundredths_as_qemu_img_prints_them_and_an_empty_copy_is_complete()
    {
        assert_eq!(hundredths(0, 300), 0);
        assert_eq!(hundredths(200, 300), 6667);
        assert_eq!(hundredths(1, 30_000), 0);
        assert_eq!(hundredths(300, 300), 10_000);
        assert_eq!(hundredths(0, 0), 10_000);
        assert_eq!(hundredths(u64::MAX, u64::MAX), 10_000);
    }
}
